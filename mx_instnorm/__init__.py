"""mx_instnorm: a drop-in InstanceNorm for Apache MXNet 1.x.

``import mx_instnorm`` registers the Python CustomOp once, under
:data:`OP_TYPE`, loads the compiled operator where it was built (its name is
:data:`COMPILED_OP`, None where it is not loaded), and, where MXNet's ONNX
exporter is importable, registers our converters.

* :func:`mx_instnorm.nd.InstanceNorm`, :func:`mx_instnorm.sym.InstanceNorm`
* :class:`mx_instnorm.gluon.InstanceNorm`, :func:`mx_instnorm.gluon.swap_instance_norm`
* :func:`patch_mxnet`, :func:`unpatch_mxnet`, :func:`patched_mxnet`: MXNet's
  own ``InstanceNorm`` entry points (``F.InstanceNorm``) routed to ours
* :func:`backend`, :func:`backend_reason`: which backend computes, and why
* :func:`explain_errors`: our message first in an ``MXNetError`` raised by
  MXNet's inference of a graph holding the CustomOp
* :func:`from_native`: exported graphs of MXNet's built-in InstanceNorm
  computed by ours (the inverse of :func:`to_native`)
* :func:`library_path`: the compiled library, for ``MXLoadLib`` in C/C++
* :func:`to_native`, :func:`export_native`: graphs without our op;
  :func:`to_custom`, :func:`to_compiled`: graphs between our two backends

Layers, with imports pointing one way: :mod:`mx_instnorm.kernel` (NumPy and
C++ kernels, no MXNet) -> :mod:`mx_instnorm.operator` (MXNet glue) ->
:mod:`mx_instnorm.graphs` (graph conversions) -> :mod:`mx_instnorm.gluon`
(the block, and ``swap_instance_norm``, which also converts a SymbolBlock's
graph) -> :mod:`mx_instnorm.integration` (patching MXNet, fork and
load hooks) and the command line.
"""
# MXNet 1.9.1 needs NumPy names that newer NumPy removed: the installed .pth
# adds them when mxnet is imported first; this covers installs without it
# (pip install --target, the source tree on PYTHONPATH).
import mx_instnorm_numpy_compat as _numpy_compat

_numpy_compat.install()

from ._version import __version__  # noqa: E402
from .operator import OP_TYPE, explain_errors, register as _register
from .operator.backend import backend, backend_reason
from .operator.backend import compiled_op as _compiled_op
from .operator.compiled import library_path as _compiled_library_path
from .graphs import export_native, from_native, to_compiled, to_custom, to_native
from .graphs import onnx_export as _onnx_export
from . import integration as _integration
from .integration import is_patched, patch_mxnet, patched_mxnet, unpatch_mxnet

_register()
# The compiled library is loaded now (also when MX_INSTNORM_BACKEND=python,
# which only changes what backend() picks, and may change within a process).
COMPILED_OP = _compiled_op()


def library_path():
    """The path of the compiled library this process loaded, or None.

    For programs without Python: C and C++ load it with MXNet's
    ``MXLoadLib(path, 0)`` before reading a graph that names
    :data:`COMPILED_OP` (docs/deploy.md, "C and C++ without Python").
    None where the compiled operator is not loaded (not built, or refused:
    ``backend_reason()`` says why).

    >>> path = library_path()
    >>> path is None or path.endswith("libmx_instnorm.so")
    True
    """
    return _compiled_library_path() if COMPILED_OP is not None else None


# The before-fork drain; where the library is not loaded, a graph file naming
# its op fails with an explanation.
_integration.install()
# mx.onnx.export_model converts our ops where onnx is installed (a no-op, and
# no onnx import, where it is not).
_onnx_export.register()

from . import gluon, kernel, nd, sym  # noqa: E402  (after registration)

__all__ = ["__version__", "OP_TYPE", "COMPILED_OP", "backend", "backend_reason", "explain_errors",
           "gluon", "kernel", "nd", "sym", "patch_mxnet", "unpatch_mxnet",
           "patched_mxnet", "is_patched", "from_native", "to_native", "export_native",
           "to_custom", "to_compiled", "library_path"]
