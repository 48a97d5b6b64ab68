"""Process integration, the top layer: routing MXNet's own entry points to
mx_instnorm (:mod:`.patch`), the before-fork drain (:mod:`._fork`) and the
explanation for graph files that name a compiled operator that is not
loaded (:mod:`.load_hook`) and the entry in MXNet's AMP lists (:mod:`.amp`). Imports every layer below; none imports it.
"""
from . import _fork
from . import amp as _amp
from .load_hook import install_load_hook
from .patch import is_patched, patch_mxnet, patched_mxnet, unpatch_mxnet

__all__ = ["install", "is_patched", "patch_mxnet", "patched_mxnet", "unpatch_mxnet"]


def install():
    """What ``import mx_instnorm`` sets up once per process: the before-fork
    drain, the AMP list entry and, where the compiled operator is not
    loaded, the load hook."""
    _fork.install()
    _amp.register()
    install_load_hook()
