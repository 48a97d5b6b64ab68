"""Graph conversions: rewriting exported graphs (Symbols, ``-symbol.json``)
between mx_instnorm's two node kinds (:mod:`.backends`), to MXNet's
built-in operator (:mod:`.native`) and to ONNX (:mod:`.onnx_export`).
Depends on :mod:`mx_instnorm.operator`; the operator layer never imports it.
"""
from .backends import COMPILED_NAME, to_compiled, to_custom
from .native import export_native, to_native

__all__ = ["COMPILED_NAME", "to_compiled", "to_custom", "export_native", "to_native"]
