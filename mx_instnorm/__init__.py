"""mx_instnorm: a drop-in InstanceNorm for Apache MXNet 1.x.

``import mx_instnorm`` registers the CustomOp once, under :data:`OP_TYPE`.

* :func:`mx_instnorm.nd.InstanceNorm`, :func:`mx_instnorm.sym.InstanceNorm`
* :class:`mx_instnorm.gluon.InstanceNorm`

Layers, with imports pointing one way: :mod:`mx_instnorm.kernel` (NumPy
only) -> :mod:`mx_instnorm.operator` (MXNet glue) -> :mod:`mx_instnorm.gluon`.
"""
from ._version import __version__
from .operator import OP_TYPE, register as _register

_register()

from . import gluon, kernel, nd, sym  # noqa: E402  (after registration)

__all__ = ["__version__", "OP_TYPE", "gluon", "kernel", "nd", "sym"]

from .operator.native import export_native, to_native  # noqa: E402

__all__ += ["to_native", "export_native"]

# mx.onnx.export_model converts our op where onnx is installed (a no-op, and
# no onnx import, where it is not).
from .operator import onnx_export as _onnx_export  # noqa: E402

_onnx_export.register()
