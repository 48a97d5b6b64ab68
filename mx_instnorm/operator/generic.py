r"""The generic path: InstanceNorm in ``mx.nd`` operators, on any context.

The CustomOp's path where the NumPy kernel cannot run: arrays on a GPU, or
any context with ``MX_INSTNORM_PATH=generic`` (see
:func:`mx_instnorm.operator.backend.implementation`). It computes the
formulas of the derivation in :mod:`mx_instnorm.kernel.instance_norm`
("The derivation") with its symbols, on the arrays' own context:

* ``K`` (each instance's first element), ``d = x - K``, ``mu = mean(d)``,
  two-pass ``var = mean((d - mu)**2)``, ``rstd = 1 / sqrt(var + eps)``,
  ``xhat = (d - mu) rstd``, ``y = gamma xhat + beta``;
* backward ``dx = k (g - c1 - xhat c2)``, ``k = gamma rstd``,
  ``dgamma = sum(g xhat)``, ``dbeta = sum(g)``;
* the module docstring's one overflow strategy for the Python paths: the
  instances whose ``var`` is not finite are recomputed with the data
  scaled by a power of two, ``s = 2**-e`` with ``e = floor(log2 max|x|) +
  1`` (exact), and ``rstd = s / sqrt(var_s + eps s**2)``. Deciding whether
  any instance overflowed costs one small synchronous read of ``var``
  (``N * C`` values).

float16 data is computed in float32 (``acc``), as everywhere.

Examples
--------
>>> import mxnet as mx
>>> from mx_instnorm.operator import generic
>>> x = mx.nd.array([[[1.1, 2.2]], [[3.3, 4.4]]])
>>> y = generic.forward(x, mx.nd.array([1.5]), mx.nd.array([0.5]), 1e-3, 1)
>>> print(y.asnumpy().round(5))
[[[-0.99753  1.99753]]
<BLANKLINE>
 [[-0.99753  1.99753]]]
"""
import mxnet as mx
import numpy as np

from ._params import BFLOAT16

__all__ = ["forward", "backward"]


def _reduce_axes(ndim, axis):
    """The instance axes: every axis but the batch axis 0 and ``axis``."""
    return tuple(i for i in range(1, ndim) if i != axis)


def _param_shape(ndim, axis, channels):
    shape = [1] * ndim
    shape[axis] = channels
    return tuple(shape)


def _two_pass(x, red):
    """``(d - mu, var)`` of the derivation, for every instance of ``x``."""
    K = x
    for a in red:
        K = mx.nd.slice_axis(K, axis=a, begin=0, end=1)
    d = mx.nd.broadcast_sub(x, K)
    centred = mx.nd.broadcast_sub(d, mx.nd.mean(d, axis=red, keepdims=True))
    return centred, mx.nd.mean(mx.nd.square(centred), axis=red, keepdims=True)


def cast(arr, dtype):
    """``arr.astype(dtype)``; to and from bfloat16 MXNet casts with
    ``amp_cast`` (round to nearest even)."""
    if np.dtype(arr.dtype) == BFLOAT16 or np.dtype(dtype) == BFLOAT16:
        return mx.nd.amp_cast(arr, dtype=dtype)
    return arr.astype(dtype)


def normalized(x, eps, red):
    """``(xhat, rstd)`` for every instance of ``x`` (reduced over ``red``),
    in the accumulation dtype; ``rstd`` keeps the reduced axes (size 1)."""
    if np.dtype(x.dtype) in (np.dtype(np.float16), BFLOAT16):
        x = cast(x, np.float32)
    centred, var = _two_pass(x, red)
    finite = np.isfinite(var.asnumpy())
    if finite.all():
        rstd = mx.nd.rsqrt(var + eps)
        return mx.nd.broadcast_mul(centred, rstd), rstd
    # The squares overflowed somewhere: those instances again, scaled by
    # s = 2**-e; the others keep s = 1 (their results are unchanged).
    finite = mx.nd.array(finite, ctx=var.context, dtype=var.dtype)
    top = mx.nd.max(mx.nd.abs(x), axis=red, keepdims=True)
    e = mx.nd.floor(mx.nd.log2(top)) + 1
    s = mx.nd.where(finite, mx.nd.ones_like(var), mx.nd.power(2.0, -e))
    centred, var = _two_pass(mx.nd.broadcast_mul(x, s), red)
    rstd_s = mx.nd.rsqrt(var + eps * mx.nd.square(s))
    return mx.nd.broadcast_mul(centred, rstd_s), rstd_s * s


def forward(x, gamma, beta, eps, axis):
    """``y`` of the derivation, in the accumulation dtype.

    ``x`` has rank >= 3 and no zero-size axis; ``axis`` is the channel axis,
    already normalized (``1 <= axis < x.ndim``).
    """
    ndim = x.ndim
    pshape = _param_shape(ndim, axis, x.shape[axis])
    xhat, _ = normalized(x, eps, _reduce_axes(ndim, axis))
    acc = xhat.dtype
    return mx.nd.broadcast_add(
        mx.nd.broadcast_mul(xhat, cast(gamma, acc).reshape(pshape)),
        cast(beta, acc).reshape(pshape))


def backward(g, x, gamma, eps, axis, want=(True, True, True)):
    """``(dx, dgamma, dbeta)`` of the derivation, in the accumulation dtype;
    an entry is None where ``want`` says it is not needed."""
    ndim = x.ndim
    red = _reduce_axes(ndim, axis)
    xhat, rstd = normalized(x, eps, red)
    acc = xhat.dtype
    g = cast(g, acc)
    gxhat = g * xhat
    dx = dgamma = dbeta = None
    if want[0]:
        pshape = _param_shape(ndim, axis, x.shape[axis])
        c1 = mx.nd.mean(g, axis=red, keepdims=True)
        c2 = mx.nd.mean(gxhat, axis=red, keepdims=True)
        k = mx.nd.broadcast_mul(cast(gamma, acc).reshape(pshape), rstd)
        dx = mx.nd.broadcast_mul(
            k, mx.nd.broadcast_sub(g, c1) - mx.nd.broadcast_mul(xhat, c2))
    param_axes = tuple(i for i in range(ndim) if i != axis)
    if want[1]:
        dgamma = mx.nd.sum(gxhat, axis=param_axes)
    if want[2]:
        dbeta = mx.nd.sum(g, axis=param_axes)
    return dx, dgamma, dbeta
