"""mx_instnorm: a drop-in InstanceNorm for Apache MXNet 1.x.

``import mx_instnorm`` registers the CustomOp once, under :data:`OP_TYPE`,
and, where MXNet's ONNX exporter is importable, our converter for it.

* :func:`mx_instnorm.nd.InstanceNorm`, :func:`mx_instnorm.sym.InstanceNorm`
* :class:`mx_instnorm.gluon.InstanceNorm`, :func:`mx_instnorm.gluon.swap_instance_norm`
* :func:`to_native`, :func:`export_native`: graphs without our op

Layers, with imports pointing one way: :mod:`mx_instnorm.kernel` (NumPy
only) -> :mod:`mx_instnorm.operator` (MXNet glue) -> :mod:`mx_instnorm.gluon`.
"""
from ._version import __version__
from .operator import OP_TYPE, register as _register
from .operator import onnx_export as _onnx_export
from .operator.native import export_native, to_native

_register()
# mx.onnx.export_model converts our op where onnx is installed (a no-op, and
# no onnx import, where it is not).
_onnx_export.register()

from . import gluon, kernel, nd, sym  # noqa: E402  (after registration)

__all__ = ["__version__", "OP_TYPE", "gluon", "kernel", "nd", "sym",
           "to_native", "export_native"]
