"""Graph files that name the compiled operator where it is not loaded.

Where the compiled operator is not available, ``import mx_instnorm`` wraps
``mx.sym.load`` and ``mx.sym.load_json`` (and so ``SymbolBlock.imports``,
``Module.load`` and ``mx.model.load_checkpoint``) so that a graph with
compiled nodes fails with an ``MXNetError`` that says why and names the fix
(:func:`mx_instnorm.to_custom`) instead of MXNet's "operator not
registered".
"""
import functools

import mxnet as mx

from ..graphs.backends import COMPILED_NAME
from ..operator import backend

__all__ = ["install_load_hook"]


def _explain(err):
    if COMPILED_NAME not in str(err):
        return err
    return mx.MXNetError(
        "this graph uses mx_instnorm's compiled operator %s, which is not available "
        "in this process (%s). Convert the graph to the Python backend with "
        "mx_instnorm.to_custom(path_or_json), which returns a Symbol, or reinstall "
        "mx_instnorm where a C++ compiler is available (pip install mx_instnorm "
        "builds it). MXNet said: %s"
        % (COMPILED_NAME, backend.backend_reason(), str(err).strip().splitlines()[0]))


def _hooked(original):
    @functools.wraps(original)
    def load(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except mx.MXNetError as err:
            explained = _explain(err)
            if explained is err:
                raise
            raise explained from err
    load.__wrapped_by_mx_instnorm__ = True
    return load


def install_load_hook():
    """Wraps ``mx.sym.load``/``load_json`` so that a graph naming the
    compiled operator, where it is not available, fails with an explanation
    (a no-op where the compiled operator is loaded)."""
    if backend.compiled_op() is not None:
        return
    for module in (mx.symbol, mx.symbol.symbol):
        for attr in ("load", "load_json"):
            fn = getattr(module, attr)
            if not getattr(fn, "__wrapped_by_mx_instnorm__", False):
                setattr(module, attr, _hooked(fn))
