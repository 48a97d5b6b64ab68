"""Edge cases: constant instances, NaN, empty batch, spatial size 1, eps=0,
float16 magnitudes, strided NumPy arrays."""
import numpy as np
import pytest

import mxnet as mx

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm
from mx_instnorm.kernel import instance_norm_backward, instance_norm_forward

from conftest import DTYPES, assert_close, random_inputs, ref_backward, ref_forward, tol


def _nd(a):
    return mx.nd.array(a, dtype=a.dtype)


def _constant_instances(rng, shape, axis, dtype):
    """Every instance constant, at a different random value each."""
    axis = axis % len(shape)
    stats_shape = [1] * len(shape)
    stats_shape[0], stats_shape[axis] = shape[0], shape[axis]
    values = rng.uniform(-50, 50, stats_shape)
    return np.broadcast_to(values, shape).astype(dtype)


def _expected_beta(beta, shape, axis, dtype):
    ps = [1] * len(shape)
    ps[axis % len(shape)] = shape[axis]
    return np.broadcast_to(beta.reshape(ps), shape).astype(dtype)


# --------------------------------------------------------- constant input --

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 3, 7), 1), ((2, 5, 4, 3), -1), ((2, 3, 4, 5), 2)])
def test_constant_input_gives_beta_nd(path, rng, shape, axis, dtype):
    x = _constant_instances(rng, shape, axis, dtype)
    _, gamma, beta = random_inputs(rng, shape, axis, dtype)
    y = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta), axis=axis).asnumpy()
    assert np.array_equal(y, _expected_beta(beta, shape, axis, dtype))


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_input_gives_beta_gluon(path, rng, dtype, hybridize):
    shape = (2, 3, 4, 5)
    x = _constant_instances(rng, shape, 1, dtype)
    _, gamma, beta = random_inputs(rng, shape, 1, dtype)
    block = InstanceNorm(scale=True, in_channels=3)
    block.cast(dtype)
    block.initialize()
    block.gamma.set_data(_nd(gamma))
    block.beta.set_data(_nd(beta))
    if hybridize:
        block.hybridize()
    y = block(_nd(x)).asnumpy()
    assert np.array_equal(y, _expected_beta(beta, shape, 1, dtype))


def test_constant_input_gradients(path, rng):
    """Zero variance: x_hat = 0 and rstd = 1/sqrt(eps), so
    dx = gamma / sqrt(eps) * (dy - mean(dy)), dgamma = 0, dbeta = sum(dy)."""
    shape = (2, 3, 6)
    x = _constant_instances(rng, shape, 1, np.float64)
    _, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    dy = rng.standard_normal(shape)
    nds = [_nd(a) for a in (x, gamma, beta)]
    for a in nds:
        a.attach_grad()
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(*nds, eps=1e-2)
    y.backward(_nd(dy))
    dx_r, dg_r, db_r = ref_backward(dy, x, gamma, 1e-2)
    np.testing.assert_allclose(
        dx_r, gamma[None, :, None] / np.sqrt(1e-2) * (dy - dy.mean(axis=2, keepdims=True)),
        **tol(np.float64))  # the reference agrees with the closed form
    assert_close(nds[0].grad.asnumpy(), dx_r, np.float64)
    np.testing.assert_allclose(nds[1].grad.asnumpy(), 0.0, atol=tol(np.float64)["atol"])
    assert_close(nds[2].grad.asnumpy(), db_r, np.float64)


# --------------------------------------------------------------------- NaN --

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1)])
def test_nan_stays_in_its_instance(path, rng, shape, axis, dtype):
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    nan_n, nan_c = 1, 2
    idx = [nan_n] + [slice(None)] * (len(shape) - 1)
    idx[axis % len(shape)] = nan_c
    first = [nan_n] + [0] * (len(shape) - 1)
    first[axis % len(shape)] = nan_c
    x[tuple(first)] = np.nan
    nds = [_nd(a) for a in (x, gamma, beta)]
    for a in nds:
        a.attach_grad()
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(*nds, axis=axis)
    y.backward(_nd(dy))
    y = y.asnumpy()
    poisoned = np.zeros(shape, bool)
    poisoned[tuple(idx)] = True
    assert np.isnan(y[poisoned]).all()
    assert np.isfinite(y[~poisoned]).all()
    y_ref = ref_forward(x, gamma, beta, 1e-3, axis)[0]
    assert_close(y[~poisoned], y_ref[~poisoned], dtype)
    dx = nds[0].grad.asnumpy()
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, gamma, 1e-3, axis)
    assert np.isfinite(dx[~poisoned]).all()
    assert_close(dx[~poisoned], dx_ref[~poisoned], dtype)
    dgamma, dbeta = nds[1].grad.asnumpy(), nds[2].grad.asnumpy()
    others = np.arange(shape[axis]) != nan_c
    s = np.sqrt(np.prod(shape) / shape[axis])
    assert_close(dgamma[others] / s, dg_ref[others] / s, dtype)
    # dbeta = sum(dy) does not depend on x at all.
    assert_close(dbeta / s, db_ref / s, dtype)


# ------------------------------------------------------------- empty batch --

@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(path, dtype):
    """MXNet 1.x treats a 0 in a shape as "unknown" unless NumPy shape
    semantics are on (even relu fails on such arrays without them)."""
    gamma = np.array([1.5, -2.0, 0.5], dtype)
    beta = np.array([0.1, 0.2, 0.3], dtype)
    with mx.util.np_shape(True):
        x = mx.nd.array(np.zeros((0, 3, 4)), dtype=dtype)
        g, b = _nd(gamma), _nd(beta)
        for a in (x, g, b):
            a.attach_grad()
        g.grad[:] = 7  # must be overwritten (grad_req 'write')
        b.grad[:] = 7
        with mx.autograd.record():
            y = mx_instnorm.nd.InstanceNorm(x, g, b)
        y.backward(mx.nd.array(np.zeros((0, 3, 4)), dtype=dtype))
        assert y.shape == (0, 3, 4) and y.dtype == dtype
        assert y.asnumpy().size == 0
        assert x.grad.shape == (0, 3, 4)
        assert np.array_equal(g.grad.asnumpy(), np.zeros(3, dtype))
        assert np.array_equal(b.grad.asnumpy(), np.zeros(3, dtype))


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_empty_batch_gluon(path, hybridize):
    """The block on an empty batch (NumPy shape semantics, as above):
    empty output, backward runs, parameter gradients are zero."""
    with mx.util.np_shape(True):
        block = InstanceNorm(scale=True, in_channels=3)
        block.initialize()
        if hybridize:
            block.hybridize()
        x = mx.nd.array(np.zeros((0, 3, 4)))
        x.attach_grad()
        with mx.autograd.record():
            y = block(x)
        y.backward()
        assert y.shape == (0, 3, 4)
        assert x.grad.shape == (0, 3, 4)
        assert np.array_equal(block.gamma.grad().asnumpy(), np.zeros(3, np.float32))
        assert np.array_equal(block.beta.grad().asnumpy(), np.zeros(3, np.float32))


@pytest.mark.parametrize("record", [False, True], ids=["plain", "recording"])
def test_empty_batch_legacy_shape_rules(path, record):
    """Under MXNet's default (legacy) shape rules the nd function still
    returns an empty result of the right shape (MXNet's own ops, even relu,
    and the built-in InstanceNorm, fail or crash here; gradients cannot be
    attached to such an array)."""
    x = mx.nd.array(np.zeros((0, 3, 4)))
    gamma, beta = mx.nd.array([1.5, -2.0, 0.5]), mx.nd.array([0.1, 0.2, 0.3])
    if record:
        with mx.autograd.record():
            y = mx_instnorm.nd.InstanceNorm(x, gamma, beta)
    else:
        y = mx_instnorm.nd.InstanceNorm(x, gamma, beta)
    assert y.shape == (0, 3, 4) and y.dtype == np.float32
    assert y.asnumpy().shape == (0, 3, 4)


@pytest.mark.parametrize("axis", [1, -1])
def test_empty_batch_kernel(axis):
    x = np.zeros((0, 4, 3), np.float32)
    c = x.shape[axis]
    y, mean, rstd = instance_norm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32),
                                          axis=axis)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, c)
    dx, dgamma, dbeta = instance_norm_backward(x, x, np.ones(c, np.float32), axis=axis)
    assert dx.shape == x.shape
    assert np.array_equal(dgamma, np.zeros(c)) and np.array_equal(dbeta, np.zeros(c))


# --------------------------------------------------------- spatial size 1 --

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 3, 1), 1), ((4, 3, 1, 1), 1), ((2, 1, 1, 5), -1)])
def test_spatial_size_one_gives_beta(path, rng, shape, axis, dtype):
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    y = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta), axis=axis).asnumpy()
    assert np.array_equal(y, _expected_beta(beta, shape, axis, dtype))


# ------------------------------------------------------------------- eps=0 --

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 3, 8), 1), ((2, 4, 3, 5), -1)])
def test_eps_zero(path, rng, shape, axis, dtype):
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    nds = [_nd(a) for a in (x, gamma, beta)]
    for a in nds:
        a.attach_grad()
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(*nds, eps=0, axis=axis)
    y.backward(_nd(dy))
    assert np.isfinite(y.asnumpy()).all()
    assert_close(y.asnumpy(), ref_forward(x, gamma, beta, 0.0, axis)[0], dtype)
    s = np.sqrt(np.prod(shape) / shape[axis])
    for a, r, sc in zip(nds, ref_backward(dy, x, gamma, 0.0, axis), (1, s, s)):
        assert_close(a.grad.asnumpy() / sc, r / sc, dtype)


# ----------------------------------------------------- float16 magnitudes --

def test_float16_large_magnitude(path, rng):
    """float16 data near its range (sums of squares would overflow float16):
    statistics are accumulated in float32."""
    shape = (2, 3, 16, 16)
    x = (rng.standard_normal(shape) * 2e4).clip(-6e4, 6e4).astype(np.float16)
    gamma = np.ones(3, np.float16)
    beta = np.zeros(3, np.float16)
    y = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta)).asnumpy()
    assert np.isfinite(y).all()
    assert_close(y, ref_forward(x, gamma, beta, 1e-3)[0], np.float16)


# ------------------------------------------------- strided NumPy (kernel) --

def _strided_x(rng, dtype):
    base = rng.standard_normal((5, 3, 2, 8)).astype(dtype)
    x = base.transpose(2, 1, 3, 0)[:, :, ::2, :]  # (2, 3, 4, 5), not C-contiguous
    assert not x.flags.c_contiguous
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_strided,out_kind", [(True, None), (True, "contiguous"),
                                                (False, "strided"), (True, "strided")])
def test_kernel_forward_non_contiguous(rng, dtype, x_strided, out_kind):
    """Transposed / sliced views as x and out."""
    x = _strided_x(rng, dtype)
    if not x_strided:
        x = np.ascontiguousarray(x)
    gamma, beta = rng.uniform(0.5, 1.5, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    out = {None: None, "contiguous": np.zeros((2, 3, 4, 5), dtype),
           "strided": np.zeros((2, 3, 4, 10), dtype)[..., ::2]}[out_kind]
    y, _, _ = instance_norm_forward(x, gamma, beta, eps=1e-3, out=out)
    if out is not None:
        assert y is out
    assert_close(y, ref_forward(x, gamma, beta, 1e-3)[0], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_strided,dx_kind", [(True, None), (False, "strided"),
                                               (True, "strided")])
def test_kernel_backward_non_contiguous(rng, dtype, x_strided, dx_kind):
    """Transposed / sliced views as x, dy and dx ('add' into a strided dx)."""
    x = _strided_x(rng, dtype)
    if not x_strided:
        x = np.ascontiguousarray(x)
    gamma = rng.uniform(0.5, 1.5, 3).astype(dtype)
    dy = rng.standard_normal((4, 3, 2, 5)).astype(dtype).transpose(2, 1, 0, 3)
    dx_ref = ref_backward(dy, x, gamma, 1e-3)[0]
    if dx_kind is None:
        dx, _, _ = instance_norm_backward(dy, x, gamma, eps=1e-3)
    else:
        dx = np.ones((2, 3, 4, 10), dtype)[..., 1::2]
        instance_norm_backward(dy, x, gamma, eps=1e-3, dx=dx, req=("add", "write", "write"))
        dx_ref = dx_ref + 1.0
    assert_close(dx, dx_ref, dtype)


# ------------------------------------------------------- extreme magnitudes --
# float32 data around 1e30 (float64 around 1e300) has a sum of squares beyond
# the dtype's range; the variance used to overflow and y came out as beta.

def _scaled_reference(x, gamma, beta, eps, axis):
    """float64 forward on the data divided by each instance's max |x|
    (eps divided by its square), so that nothing overflows even at 1e300."""
    x = x.astype(np.float64)
    ax = axis % x.ndim
    red = tuple(i for i in range(1, x.ndim) if i != ax)
    top = np.abs(x).max(axis=red, keepdims=True)
    xs = x / top
    d = xs - xs.mean(axis=red, keepdims=True)
    rstd_s = 1 / np.sqrt((d * d).mean(axis=red, keepdims=True) + eps / top / top)
    pshape = [1] * x.ndim
    pshape[ax] = -1
    y = d * rstd_s * np.reshape(gamma, pshape) + np.reshape(beta, pshape)
    return y, (xs.mean(axis=red, keepdims=True) * top), rstd_s / top


EXTREME = [(np.float32, 1e30), (np.float32, 1e37), (np.float64, 1e300)]
EXTREME_SHAPES = [((2, 3, 50), 1),        # small path
                  ((2, 3, 6000), 1),      # row blocks
                  ((2, 900, 5), -1),      # channels-last slabs
                  ((2, 3, 30, 70), 2)]    # transposed to rows


@pytest.mark.parametrize("dtype,scale", EXTREME, ids=["f32-1e30", "f32-1e37", "f64-1e300"])
@pytest.mark.parametrize("shape,axis", EXTREME_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("req", ["write", "add"])
def test_kernel_extreme_magnitudes(rng, dtype, scale, shape, axis, req):
    x = (rng.standard_normal(shape) + 0.5) * scale
    # One instance of ordinary size beside the huge ones: it must not change.
    x[0, ..., 0] = rng.standard_normal(x[0, ..., 0].shape)
    x = x.astype(dtype)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.standard_normal(channels).astype(dtype)
    out = np.full(shape, 0.25, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        y, mean, rstd = instance_norm_forward(x, gamma, beta, 1e-3, axis, out=out, req=req,
                                              block_bytes=8192)
    want, want_mean, want_rstd = _scaled_reference(x, gamma, beta, 1e-3, axis)
    if req == "add":
        want = want + 0.25
    assert np.isfinite(y).all()
    assert_close(y, want, dtype)
    np.testing.assert_allclose(mean.ravel(), np.moveaxis(want_mean, axis % len(shape), 1)
                               .reshape(-1), rtol=tol(dtype)["rtol"])
    np.testing.assert_allclose(rstd.ravel(), np.moveaxis(want_rstd, axis % len(shape), 1)
                               .reshape(-1), rtol=tol(dtype)["rtol"])


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e30), (np.float64, 1e300)],
                         ids=["f32-1e30", "f64-1e300"])
@pytest.mark.parametrize("shape,axis", EXTREME_SHAPES, ids=lambda v: str(v))
def test_kernel_extreme_magnitudes_backward(rng, dtype, scale, shape, axis):
    """dx scales as 1/s: compared with the float64 reference on x / s for
    each instance's own s = max|x| (eps / s^2 vanishes next to var(x / s))."""
    x = ((rng.standard_normal(shape) + 0.5) * scale).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, shape[axis]).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ax = axis % len(shape)
    red = tuple(i for i in range(1, len(shape)) if i != ax)
    top = np.abs(x.astype(np.float64)).max(axis=red, keepdims=True)
    want = ref_backward(dy.astype(np.float64), x / top, gamma.astype(np.float64), 0.0, axis)
    want_dx = want[0] / top
    with np.errstate(over="ignore", invalid="ignore"):
        _, mean, rstd = instance_norm_forward(x, gamma, gamma, 1e-3, axis)
        for stats in ((mean, rstd), (None, None)):
            dx, dgamma, dbeta = instance_norm_backward(dy, x, gamma, *stats, eps=1e-3,
                                                       axis=axis)
            assert_close(dx * top, want_dx * top, dtype)
            assert_close(dgamma, want[1], dtype)
            assert_close(dbeta, want[2], dtype)


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e30), (np.float64, 1e300)],
                         ids=["f32-1e30", "f64-1e300"])
@pytest.mark.parametrize("shape,axis", [((2, 3, 40), 1), ((2, 3, 6000), 1)], ids=str)
def test_operator_extreme_magnitudes(rng, path, dtype, scale, shape, axis):
    x = ((rng.standard_normal(shape) + 0.5) * scale).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, shape[axis]).astype(dtype)
    beta = rng.standard_normal(shape[axis]).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        y = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta), eps=1e-3, axis=axis)
        got = y.asnumpy()
    assert np.isfinite(got).all()
    assert_close(got, _scaled_reference(x, gamma, beta, 1e-3, axis)[0], dtype)


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e30), (np.float64, 1e300)],
                         ids=["f32-1e30", "f64-1e300"])
def test_operator_extreme_magnitudes_backward(rng, path, dtype, scale):
    """Every implementation's backward at magnitudes whose squares overflow
    (the generic path rescales by a power of two, as the NumPy kernel)."""
    shape, axis = (2, 3, 40), 1
    x = ((rng.standard_normal(shape) + 0.5) * scale).astype(dtype)
    x[1, 2] = rng.standard_normal(40).astype(dtype)  # one ordinary instance
    gamma = rng.uniform(0.5, 1.5, shape[axis]).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    top = np.abs(x.astype(np.float64)).max(axis=2, keepdims=True)
    want = ref_backward(dy.astype(np.float64), x / top, gamma.astype(np.float64), 0.0, axis)
    data, g, b = _nd(x), _nd(gamma), _nd(gamma)
    for arr in (data, g, b):
        arr.attach_grad()
    with np.errstate(over="ignore", invalid="ignore"):
        with mx.autograd.record():
            y = mx_instnorm.nd.InstanceNorm(data, g, b, eps=0.0, axis=axis)
        y.backward(_nd(dy))
        dx = data.grad.asnumpy()
    assert np.isfinite(dx).all()
    assert_close(dx * top, want[0], dtype)
    assert_close(g.grad.asnumpy(), want[1], dtype)
    assert_close(b.grad.asnumpy(), want[2], dtype)


def test_operator_nan_and_inf_stay_in_their_instance(rng, path):
    x = rng.standard_normal((2, 3, 50)).astype(np.float32)
    x[0, 1, 5] = np.nan
    x[1, 2, 7] = np.inf
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        y = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta), eps=1e-3).asnumpy()
    assert np.isnan(y[0, 1]).all() and np.isnan(y[1, 2]).all()
    for n, c in [(0, 0), (0, 2), (1, 0), (1, 1)]:
        assert_close(y[n, c], ref_forward(x[n:n + 1, c:c + 1], gamma[:1], beta[:1], 1e-3)[0][0, 0],
                     np.float32)


def test_nan_and_inf_stay_in_their_instance(rng):
    """A NaN or an inf makes its own instance NaN and leaves the others alone
    (the overflow recompute must not spread it)."""
    x = rng.standard_normal((2, 3, 9000)).astype(np.float32)
    x[0, 1, 5] = np.nan
    x[1, 2, 7] = np.inf
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        y = instance_norm_forward(x, gamma, beta, 1e-3)[0]
    assert np.isnan(y[0, 1]).all() and np.isnan(y[1, 2]).all()
    clean = [(0, 0), (0, 2), (1, 0), (1, 1)]
    for n, c in clean:
        assert_close(y[n, c], ref_forward(x[n:n + 1, c:c + 1], gamma[:1], beta[:1], 1e-3)[0][0, 0],
                     np.float32)
