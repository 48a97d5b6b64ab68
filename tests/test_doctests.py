"""The docstring examples run, and give what they print.

The examples print NumPy scalars as NumPy 1.x does (``True``, ``0.5``);
NumPy 2 prints ``np.True_``, ``np.float64(0.5)`` unless told to print as
1.25 did, which these tests do (the values are checked either way).
"""
import doctest
import importlib

import numpy as np
import pytest

MODULES = [
    "mx_instnorm.kernel.instance_norm",
    "mx_instnorm.operator._params",
    "mx_instnorm.operator.backend",
    "mx_instnorm.operator.generic",
    "mx_instnorm.operator.functions",
    "mx_instnorm.integration.patch",
    "mx_instnorm.gluon.instance_norm",
    "mx_instnorm.gluon.swap",
    "mx_instnorm.graphs.adopt",
    "mx_instnorm.graphs.backends",
    "mx_instnorm.graphs.native",
    "mx_instnorm.graphs.rewrite",
    "mx_instnorm_numpy_compat",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(name)
    saved = np.get_printoptions()
    if int(np.__version__.split(".")[0]) >= 2:
        np.set_printoptions(legacy="1.25")
    try:
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE,
                                 verbose=False)
    finally:
        np.set_printoptions(**saved)
    assert result.attempted > 0, "%s has no examples" % name
    assert result.failed == 0, "%d of %d examples failed in %s" % (
        result.failed, result.attempted, name)
