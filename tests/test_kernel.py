"""mx_instnorm.kernel (pure NumPy) against a float64 NumPy reference and
finite differences."""
import itertools

import numpy as np
import pytest

from mx_instnorm.kernel import instance_norm_backward, instance_norm_forward, instance_norm_stats

from conftest import (DTYPES, FD_LARGE_TOL, FD_TOL, LARGE_SHAPES_AXES, OFFSET_TOL, SHAPES_AXES,
                      assert_close, random_inputs, ref_backward, ref_forward, tol)



# ------------------------------------------------------------------ forward --

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES_AXES + LARGE_SHAPES_AXES)
def test_forward_matches_reference(rng, shape, axis, dtype):
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    eps = 1e-3
    y, mean, rstd = instance_norm_forward(x, gamma, beta, eps=eps, axis=axis)
    y_ref, mean_ref, var_ref = ref_forward(x, gamma, beta, eps, axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, dtype)
    n, c = shape[0], shape[axis]
    assert mean.shape == (n, c) and rstd.shape == (n, c)
    # The statistics are kept in the accumulation dtype (float32 for float16).
    assert_close(mean, mean_ref.reshape(n, c), np.float32 if dtype == np.float16 else dtype)
    assert_close(rstd, (1 / np.sqrt(var_ref + eps)).reshape(n, c),
                 np.float32 if dtype == np.float16 else dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((3, 5, 7), 1), ((2, 6, 5, 4), -1), ((2, 3, 4, 5, 6), 2)]
                         + LARGE_SHAPES_AXES[:2])
def test_stats_match_reference(rng, shape, axis, dtype):
    x, _, _ = random_inputs(rng, shape, axis, dtype)
    mean, rstd = instance_norm_stats(x, eps=1e-2, axis=axis)
    _, mean_ref, var_ref = ref_forward(x, np.ones(shape[axis]), np.zeros(shape[axis]), 1e-2, axis)
    n, c = shape[0], shape[axis]
    acc = np.float32 if dtype == np.float16 else dtype
    assert_close(mean, mean_ref.reshape(n, c), acc)
    assert_close(rstd, (1 / np.sqrt(var_ref + 1e-2)).reshape(n, c), acc)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_forward_mixed_precision_params(rng, dtype):
    """float32 gamma/beta with float16 data (and float64 params with float32
    data) are accepted and used at their own precision."""
    x, gamma, beta = random_inputs(rng, (2, 4, 9), 1, dtype, param_dtype=np.float64)
    gamma32 = gamma.astype(np.float32)
    y, _, _ = instance_norm_forward(x, gamma32, beta.astype(np.float32), eps=1e-3)
    assert y.dtype == dtype
    assert_close(y, ref_forward(x, gamma32, beta.astype(np.float32), 1e-3)[0], dtype)


@pytest.mark.parametrize("size", [50, 5000])
@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_outlier_first_element(rng, dtype, layout, size):
    """The shift is each instance's first element: make that element lie far
    out (the re-centring branch) and the rest sit on a large offset."""
    shape, axis = ((3, 4, size), 1) if layout == "rows" else ((3, size, 4), -1)
    x = 1e3 + rng.standard_normal(shape)
    if layout == "rows":
        x[:, ::2, 0] += 200.0
    else:
        x[:, 0, ::2] += 200.0
    x = x.astype(dtype)
    gamma, beta = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    y, mean, rstd = instance_norm_forward(x, gamma.astype(dtype), beta.astype(dtype),
                                          eps=1e-5, axis=axis)
    y_ref, mean_ref, var_ref = ref_forward(x, gamma.astype(dtype), beta.astype(dtype), 1e-5, axis)
    np.testing.assert_allclose(y, y_ref, **OFFSET_TOL[np.dtype(dtype)]["y"])
    np.testing.assert_allclose(mean, mean_ref.reshape(3, 4), **OFFSET_TOL[np.dtype(dtype)]["mean"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((3, 4, 6, 7), 1), ((3, 6, 7, 4), 3),
                                        ((2, 5, 4, 3, 3), 2)] + LARGE_SHAPES_AXES[:3])
def test_property_zero_mean_unit_variance(rng, shape, axis, dtype):
    """eps=0, gamma=1, beta=0: every instance of y has mean 0 and biased
    variance 1."""
    x, _, _ = random_inputs(rng, shape, axis, dtype)
    x = x * 7.0 + 100.0
    c = shape[axis]
    y, _, _ = instance_norm_forward(x.astype(dtype), np.ones(c, dtype), np.zeros(c, dtype),
                                    eps=0.0, axis=axis)
    red = tuple(i for i in range(1, len(shape)) if i != axis % len(shape))
    y64 = y.astype(np.float64)
    atol = tol(dtype)["atol"]
    np.testing.assert_allclose(y64.mean(axis=red), 0.0, atol=atol)
    np.testing.assert_allclose(y64.var(axis=red), 1.0, atol=10 * atol)


# ----------------------------------------------------------------- backward --

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES_AXES + LARGE_SHAPES_AXES)
def test_backward_matches_reference(rng, shape, axis, dtype):
    x, gamma, _ = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    eps = 1e-3
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, gamma, eps, axis)
    # Once with the statistics forward returned, once recomputing them.
    _, mean, rstd = instance_norm_forward(x, gamma, np.zeros_like(gamma), eps=eps, axis=axis)
    for stats in ((mean, rstd), (None, None)):
        dx, dgamma, dbeta = instance_norm_backward(dy, x, gamma, *stats, eps=eps, axis=axis)
        assert dx.dtype == x.dtype and dx.shape == x.shape
        assert dgamma.shape == dbeta.shape == (shape[axis],)
        assert_close(dx, dx_ref, dtype, "dx")
        # dgamma/dbeta sum over N * M terms: compare relative to their size.
        scale = np.sqrt(np.prod(shape) / shape[axis])
        assert_close(dgamma / scale, dg_ref / scale, dtype, "dgamma")
        assert_close(dbeta / scale, db_ref / scale, dtype, "dbeta")


def _central_difference(f, arr, idx, h):
    """(f(arr[idx] + h) - f(arr[idx] - h)) / 2h, restoring arr[idx]."""
    orig = arr[idx]
    arr[idx] = orig + h
    up = f()
    arr[idx] = orig - h
    down = f()
    arr[idx] = orig
    return (up - down) / (2 * h)


@pytest.mark.parametrize("shape,axis", [((2, 3, 5), 1), ((2, 3, 4), -1), ((2, 3, 2, 3), 2),
                                        ((1, 2, 3, 2, 2), 2)])
def test_backward_matches_finite_differences(rng, shape, axis):
    """Central differences of L = sum(w * y(x, gamma, beta)), all float64,
    against the kernel's backward with dy = w."""
    x, gamma, beta = random_inputs(rng, shape, axis, np.float64)
    w = rng.standard_normal(shape)
    eps = 1e-3

    def loss(x_, g_, b_):
        y, _, _ = instance_norm_forward(x_, g_, b_, eps=eps, axis=axis)
        return float(np.sum(w * y))

    def numeric(arr, f):
        grad = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            grad[idx] = _central_difference(f, arr, idx, 1e-6)
        return grad

    f = lambda: loss(x, gamma, beta)  # noqa: E731
    dx, dgamma, dbeta = instance_norm_backward(w, x, gamma, eps=eps, axis=axis)
    np.testing.assert_allclose(dx, numeric(x, f), **FD_TOL)
    np.testing.assert_allclose(dgamma, numeric(gamma, f), **FD_TOL)
    np.testing.assert_allclose(dbeta, numeric(beta, f), **FD_TOL)


@pytest.mark.parametrize("shape,axis", [((2, 3, 50, 70), 1), ((2, 50, 70, 3), -1)])
def test_backward_matches_finite_differences_large(rng, shape, axis):
    """As above on a large tensor, at 24 random coordinates of x and every
    entry of gamma and beta."""
    x, gamma, beta = random_inputs(rng, shape, axis, np.float64)
    w = rng.standard_normal(shape)
    eps = 1e-3
    h = 1e-5

    def loss():
        return float(np.sum(w * instance_norm_forward(x, gamma, beta, eps=eps, axis=axis)[0]))

    def central(arr, idx):
        return _central_difference(loss, arr, idx, h)

    dx, dgamma, dbeta = instance_norm_backward(w, x, gamma, eps=eps, axis=axis)
    flat = rng.choice(x.size, 24, replace=False)
    for idx in zip(*np.unravel_index(flat, shape)):
        np.testing.assert_allclose(dx[idx], central(x, idx), **FD_LARGE_TOL["x"])
    for c in range(shape[axis]):
        np.testing.assert_allclose(dgamma[c], central(gamma, c), **FD_LARGE_TOL["params"])
        np.testing.assert_allclose(dbeta[c], central(beta, c), **FD_LARGE_TOL["params"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backward_mixed_precision_params(rng, dtype):
    """float32 gamma with float16 data: dgamma/dbeta come back in gamma's
    dtype, dx in the data's."""
    x, gamma, _ = random_inputs(rng, (3, 4, 11), 1, dtype, param_dtype=np.float32)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dgamma, dbeta = instance_norm_backward(dy, x, gamma, eps=1e-3)
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, gamma, 1e-3)
    assert dx.dtype == dtype and dgamma.dtype == dbeta.dtype == np.float32
    assert_close(dx, dx_ref, dtype)
    assert_close(dgamma / 6, dg_ref / 6, np.float32)
    assert_close(dbeta / 6, db_ref / 6, np.float32)


# ---------------------------------------------------------------------- req --

REQ_LAYOUTS = [((2, 3, 5, 4), 1), ((2, 5, 4, 3), -1), ((2, 3, 4, 5), 2),
               ((2, 7, 31, 41), 1), ((2, 31, 41, 7), -1), ((2, 7, 31, 41), 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", REQ_LAYOUTS)
@pytest.mark.parametrize("req", ["write", "inplace", "add", "null"])
def test_forward_req(rng, shape, axis, dtype, req):
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    y_ref, mean_ref, _ = ref_forward(x, gamma, beta, 1e-3, axis)
    prior = rng.standard_normal(shape).astype(dtype)
    out = prior.copy()
    y, mean, _ = instance_norm_forward(x, gamma, beta, eps=1e-3, axis=axis, out=out, req=req)
    if req == "null":
        assert y is None
        np.testing.assert_array_equal(out, prior)
    else:
        assert y is out
        want = y_ref + prior.astype(np.float64) if req == "add" else y_ref
        assert_close(out, want, dtype)
    # Statistics come back whatever req is.
    assert_close(mean, mean_ref.reshape(mean.shape), np.float32 if dtype == np.float16 else dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", REQ_LAYOUTS)
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("req", ["write", "inplace", "add", "null"])
def test_backward_req_each_output(rng, shape, axis, dtype, which, req):
    """``req`` applied to one of dx/dgamma/dbeta ('write' on the others)."""
    x, gamma, _ = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    refs = ref_backward(dy, x, gamma, 1e-3, axis)
    c = shape[axis]
    priors = [rng.standard_normal(shape).astype(dtype),
              rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)]
    bufs = [p.copy() for p in priors]
    reqs = ["write"] * 3
    reqs[which] = req
    got = instance_norm_backward(dy, x, gamma, eps=1e-3, axis=axis, dx=bufs[0],
                                 dgamma=bufs[1], dbeta=bufs[2], req=tuple(reqs))
    scale = [1.0, np.sqrt(np.prod(shape) / c), np.sqrt(np.prod(shape) / c)]
    for i in range(3):
        if reqs[i] == "null":
            assert got[i] is None
            np.testing.assert_array_equal(bufs[i], priors[i])
            continue
        assert got[i] is bufs[i]
        want = refs[i] + (priors[i].astype(np.float64) if reqs[i] == "add" else 0)
        assert_close(bufs[i] / scale[i], want / scale[i], dtype, "output %d" % i)


def test_bad_req_rejected(rng):
    x, gamma, beta = random_inputs(rng, (2, 3, 4), 1, np.float32)
    with pytest.raises(ValueError, match="'sum'"):
        instance_norm_forward(x, gamma, beta, req="sum")
    with pytest.raises(ValueError, match="'sum'"):
        instance_norm_backward(x, x, gamma, req=("write", "sum", "write"))


# ----------------------------------------------------------------- aliasing --

ALIAS_CASES = [((2, 3, 5, 4), 1, None), ((2, 5, 4, 3), -1, None), ((2, 3, 4, 5), 2, None),
               ((4, 8, 33, 17), 1, None), ((4, 33, 17, 8), 3, None), ((4, 8, 33, 17), 2, None),
               ((4, 8, 33, 17), 1, 64), ((4, 33, 17, 8), 3, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,block_bytes", ALIAS_CASES)
def test_forward_in_place(rng, shape, axis, block_bytes, dtype):
    """``out=x``: the result overwrites the input and is still right
    (including when the work is split into many small blocks)."""
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    y_ref, _, _ = ref_forward(x, gamma, beta, 1e-3, axis)
    buf = x.copy()
    y, _, _ = instance_norm_forward(buf, gamma, beta, eps=1e-3, axis=axis, out=buf,
                                    block_bytes=block_bytes)
    assert y is buf
    assert_close(buf, y_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,block_bytes", ALIAS_CASES)
@pytest.mark.parametrize("dx_req", ["write", "add"])
def test_backward_dx_aliases_dy(rng, shape, axis, block_bytes, dtype, dx_req):
    """``dx=dy``: the gradient overwrites (or, with 'add', adds onto) the
    incoming gradient it is computed from."""
    x, gamma, _ = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, gamma, 1e-3, axis)
    if dx_req == "add":
        dx_ref = dx_ref + dy.astype(np.float64)
    buf = dy.copy()
    dx, dgamma, dbeta = instance_norm_backward(buf, x, gamma, eps=1e-3, axis=axis, dx=buf,
                                               req=(dx_req, "write", "write"),
                                               block_bytes=block_bytes)
    assert dx is buf
    assert_close(buf, dx_ref, dtype, "dx")
    scale = np.sqrt(np.prod(shape) / shape[axis])
    assert_close(dgamma / scale, dg_ref / scale, dtype, "dgamma")
    assert_close(dbeta / scale, db_ref / scale, dtype, "dbeta")


# -------------------------------------------------------------- determinism --

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "middle"])
def test_bitwise_determinism_threads_blocks(rng, dtype, layout):
    """Bitwise identical results for every thread count and block size, on a
    tensor big enough (> 512 KiB) to be split over threads and blocks."""
    shape, axis = {"NCHW": ((4, 16, 64, 64), 1), "NHWC": ((4, 64, 64, 16), 3),
                   "middle": ((4, 8, 16, 32, 16), 2)}[layout]
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    assert x.nbytes > 512 * 1024 or dtype == np.float16
    if dtype == np.float16:
        # float16 at the same element count is only 512 KiB: double it.
        x = np.concatenate([x, x[::-1] * 0.5], axis=0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert x.nbytes > 512 * 1024
    results = []
    for threads, block in itertools.product((1, 2, 3), (64, 4096, None)):
        y, mean, rstd = instance_norm_forward(x, gamma, beta, eps=1e-3, axis=axis,
                                              num_threads=threads, block_bytes=block)
        grads = instance_norm_backward(dy, x, gamma, mean, rstd, eps=1e-3, axis=axis,
                                       num_threads=threads, block_bytes=block)
        results.append(((threads, block), [y, mean, rstd] + list(grads)))
    (_, first) = results[0]
    for key, arrays in results[1:]:
        for name, a, b in zip(("y", "mean", "rstd", "dx", "dgamma", "dbeta"), first, arrays):
            assert np.array_equal(a, b), "%s differs for threads/block %s" % (name, key)
    # And the shared answer is the right one.
    assert_close(first[0], ref_forward(x, gamma, beta, 1e-3, axis)[0], dtype)

