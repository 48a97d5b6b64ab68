"""The docstring examples run, and give what they print."""
import doctest
import importlib

import pytest

MODULES = [
    "mx_instnorm.kernel.instance_norm",
    "mx_instnorm.operator._params",
    "mx_instnorm.operator.functions",
    "mx_instnorm.gluon.instance_norm",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, "%s has no examples" % name
    assert result.failed == 0, "%d of %d examples failed in %s" % (
        result.failed, result.attempted, name)
