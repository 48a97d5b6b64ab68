"""Graph conversions: rewriting exported graphs (Symbols, ``-symbol.json``)
from MXNet's built-in InstanceNorm to ours (:mod:`.adopt`), between
mx_instnorm's two node kinds (:mod:`.backends`), to MXNet's built-in
operator (:mod:`.native`) and to ONNX (:mod:`.onnx_export`). Every rewrite
is a table of patterns for the one JSON walk in :mod:`.rewrite`.
Depends on :mod:`mx_instnorm.operator`; the operator layer never imports it.
"""
from .adopt import from_native
from .backends import COMPILED_NAME, to_compiled, to_custom
from .native import export_native, to_native

__all__ = ["COMPILED_NAME", "from_native", "to_compiled", "to_custom",
           "export_native", "to_native"]
