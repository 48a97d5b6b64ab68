"""Routing MXNet's own ``InstanceNorm`` entry points to mx_instnorm.

Code that calls ``F.InstanceNorm(...)`` in its own ``hybrid_forward`` (MXNet's
MSG-Net style-transfer example, turicreate's style transfer) holds no
``nn.InstanceNorm`` block that :func:`mx_instnorm.gluon.swap_instance_norm`
could replace. :func:`patch_mxnet` replaces, process-wide and until
:func:`unpatch_mxnet`:

* ``mx.nd.InstanceNorm`` and ``mx.sym.InstanceNorm`` (``F.InstanceNorm`` in
  every HybridBlock, imperative or hybridized) by functions with the
  built-in's exact signature (``data, gamma, beta, eps=0.001, out, name``;
  no ``axis``: the channel axis is 1) that run mx_instnorm's operator;
* optionally (``gluon=True``) ``mx.gluon.nn.InstanceNorm`` by
  :class:`mx_instnorm.gluon.InstanceNorm`, for blocks constructed after
  the patch.

Names bound before the patch (``from mxnet.gluon.nn import InstanceNorm``
at module level, a saved ``mx.nd.InstanceNorm``) keep the built-in. Graphs
built while patched contain mx_instnorm's operator and need
``import mx_instnorm`` where they are loaded, like any of its graphs.
"""
import contextlib

import mxnet as mx

from ..operator.functions import nd_instance_norm, sym_instance_norm

__all__ = ["patch_mxnet", "unpatch_mxnet", "patched_mxnet", "is_patched"]

# (module, attribute) pairs that hold each entry point: the namespace users
# call (mx.nd, which F is) and the generated-op module it re-exports from.
_ND = ((mx.ndarray, "InstanceNorm"), (mx.ndarray.op, "InstanceNorm"))
_SYM = ((mx.symbol, "InstanceNorm"), (mx.symbol.op, "InstanceNorm"))
_GLUON = ((mx.gluon.nn, "InstanceNorm"), (mx.gluon.nn.basic_layers, "InstanceNorm"))

_saved = {}  # (module, attribute) -> the original object, while patched


def _nd_InstanceNorm(data=None, gamma=None, beta=None, eps=0.001, out=None,
                     name=None, **kwargs):
    """mx_instnorm's InstanceNorm with ``mx.nd.InstanceNorm``'s signature."""
    _no_extra(kwargs)
    return nd_instance_norm(data, gamma, beta, eps=eps, axis=1, out=out, name=name)


def _sym_InstanceNorm(data=None, gamma=None, beta=None, eps=0.001, name=None,
                      attr=None, out=None, **kwargs):
    """mx_instnorm's InstanceNorm with ``mx.sym.InstanceNorm``'s signature."""
    _no_extra(kwargs)
    if out is not None:
        raise TypeError("out is not supported for Symbols")
    with mx.AttrScope(**(attr or {})):
        return sym_instance_norm(data, gamma, beta, eps=eps, axis=1, name=name)


def _no_extra(kwargs):
    if kwargs:
        raise TypeError("InstanceNorm got unexpected keyword arguments %s "
                        "(accepted: data, gamma, beta, eps, out, name)"
                        % ", ".join(sorted(kwargs)))


_nd_InstanceNorm.__name__ = _sym_InstanceNorm.__name__ = "InstanceNorm"


def _swap(places, replacement):
    for module, attr in places:
        if (module, attr) not in _saved:
            _saved[(module, attr)] = getattr(module, attr)
        setattr(module, attr, replacement)


def patch_mxnet(gluon=False):
    """Makes MXNet's ``InstanceNorm`` entry points run mx_instnorm.

    Parameters
    ----------
    gluon : bool, default False
        Also replace ``mx.gluon.nn.InstanceNorm`` with
        :class:`mx_instnorm.gluon.InstanceNorm` (same constructor).

    Notes
    -----
    Idempotent; :func:`unpatch_mxnet` restores the originals. The
    replacements keep the built-in's signature and defaults (``eps=1e-3``,
    channel axis 1) and accept every dtype mx_instnorm does.

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> builtin = mx.nd.InstanceNorm
    >>> mx_instnorm.patch_mxnet()
    >>> mx.nd.InstanceNorm is builtin
    False
    >>> x = mx.nd.array([[[1.1, 2.2]], [[3.3, 4.4]]], dtype='float64')
    >>> print(mx.nd.InstanceNorm(x, mx.nd.ones(1, dtype='float64'),
    ...                          mx.nd.zeros(1, dtype='float64')).asnumpy().round(4))
    [[[-0.9984  0.9984]]
    <BLANKLINE>
     [[-0.9984  0.9984]]]
    >>> mx_instnorm.unpatch_mxnet()
    >>> mx.nd.InstanceNorm is builtin
    True
    """
    _swap(_ND, _nd_InstanceNorm)
    _swap(_SYM, _sym_InstanceNorm)
    if gluon:
        from ..gluon import InstanceNorm
        _swap(_GLUON, InstanceNorm)


def unpatch_mxnet():
    """Restores every entry point :func:`patch_mxnet` replaced."""
    for (module, attr), original in list(_saved.items()):
        setattr(module, attr, original)
        del _saved[(module, attr)]


def is_patched():
    """Whether :func:`patch_mxnet` is in effect."""
    return bool(_saved)


@contextlib.contextmanager
def patched_mxnet(gluon=False):
    """:func:`patch_mxnet` for the duration of a ``with`` block.

    The previous state is restored on exit, also when the block was already
    patched on entry (then nothing changes).

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> with mx_instnorm.patched_mxnet():
    ...     mx_instnorm.is_patched()
    True
    >>> mx_instnorm.is_patched()
    False
    """
    if _saved:
        yield
        return
    patch_mxnet(gluon=gluon)
    try:
        yield
    finally:
        unpatch_mxnet()
