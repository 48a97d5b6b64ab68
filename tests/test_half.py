"""float16 and bfloat16 data: results against a float64 NumPy reference
computed from the already rounded inputs, forward and backward, through nd,
sym and Gluon, on both backends; the rounding of every result to the
nearest half-precision value (ties to even); bitwise identical results for
every thread count; type inference and the messages that name bfloat16.

NumPy has no bfloat16: MXNet 1.9 stores it as ``np.dtype([('bfloat16',
np.uint16)])``. The bfloat16 rounding reference below works on the float32
bit patterns, independently of the code under test.
"""
import json

import numpy as np
import pytest

import mxnet as mx
import mx_instnorm
from mx_instnorm.gluon import InstanceNorm

from conftest import ref_backward, ref_forward

BF16 = np.dtype([("bfloat16", np.uint16)])
EPS = 1e-3


def to_bf16_bits(values):
    """float32 values rounded to the nearest bfloat16 (ties to even), as
    uint16 bit patterns; finite values only."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    lower = bits & 0xFFFF
    upper = bits >> 16
    round_up = (lower > 0x8000) | ((lower == 0x8000) & (upper & 1 == 1))
    return (upper + round_up).astype(np.uint16)


def bf16_bits_to_f64(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(
        np.float64)


def nd_bf16(values):
    """A bfloat16 NDArray holding ``values`` rounded to nearest even."""
    return mx.nd.amp_cast(mx.nd.array(np.asarray(values, np.float32)), dtype=BF16)


def as_f64(arr):
    """An NDArray of any float dtype, bfloat16 included, as float64 NumPy."""
    if arr.dtype == BF16:
        arr = mx.nd.amp_cast(arr, dtype=np.float32)
    return arr.asnumpy().astype(np.float64)


def rounded(rng, shape, dtype, scale=1.0, offset=0.0):
    """Random data rounded to ``dtype`` ('bfloat16' or a NumPy float), as
    (NDArray, float64 values it holds)."""
    x = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    if dtype == "bfloat16":
        arr = nd_bf16(x)
    else:
        arr = mx.nd.array(x, dtype=dtype)
    return arr, as_f64(arr)


# The result is rounded once to the data's dtype: half an ulp relative,
# plus float32 accumulation noise; gradients of sums over instances carry
# the rounding of dy and x too.
HALF_TOL = {"float16": dict(rtol=2e-3, atol=2e-3), "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}
HALF_DTYPES = ("float16", "bfloat16")
SHAPES = [((2, 3, 5, 7), 1), ((2, 37, 41, 6), -1), ((3, 5, 4001), 1), ((2, 3, 4, 5, 6), 2)]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_nd_forward_backward(rng, dtype, param_dtype, shape, axis):
    x, xr = rounded(rng, shape, dtype, 2.0, 3.0)
    c = shape[axis]
    pd = dtype if param_dtype == "same" else "float32"
    gamma, gr = rounded(rng, (c,), pd, 0.5, 1.0)
    beta, br = rounded(rng, (c,), pd)
    dy, dyr = rounded(rng, shape, dtype)
    for a in (x, gamma, beta):
        a.attach_grad()
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(x, gamma, beta, eps=EPS, axis=axis)
    y.backward(dy)
    assert y.dtype == x.dtype and y.shape == shape
    assert gamma.grad.dtype == gamma.dtype
    np.testing.assert_allclose(as_f64(y), ref_forward(xr, gr, br, EPS, axis)[0],
                               **HALF_TOL[dtype])
    dx_r, dg_r, db_r = ref_backward(dyr, xr, gr, EPS, axis)
    # dx is O(rstd * gamma); parameter gradients are sums over N * M terms.
    np.testing.assert_allclose(as_f64(x.grad), dx_r, **HALF_TOL[dtype])
    m = np.sqrt(xr.size / c)
    np.testing.assert_allclose(as_f64(gamma.grad) / m, dg_r / m, **HALF_TOL[dtype])
    np.testing.assert_allclose(as_f64(beta.grad) / m, db_r / m, **HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_output_rounds_to_nearest_even(dtype):
    """With gamma = 0 every output element is beta, rounded once to the
    data's dtype: ties, subnormals, overflow to inf and the largest
    finite values must round exactly as IEEE round-to-nearest-even does."""
    if dtype == "float16":
        beta = np.array([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2.0 ** -25, 3 * 2.0 ** -26,
                         2.0 ** -24 * 1.5, 65519.0, 65520.0, -1e6, 6.1e-5, -3.3e-7,
                         0.1, -0.0], np.float32)
        want = beta.astype(np.float16).astype(np.float64)
    else:
        beta = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1e-39, -2.5e-40, 3.3895e38,
                         3.4e38, 0.1, -7.77, 1 + 2.0 ** -8 + 2.0 ** -20, 1e30, -1e-30,
                         -0.0], np.float32)
        want = bf16_bits_to_f64(to_bf16_bits(beta))
    c = beta.size
    x = np.random.default_rng(3).standard_normal((2, c, 33)).astype(np.float32)
    xa = nd_bf16(x) if dtype == "bfloat16" else mx.nd.array(x, dtype=dtype)
    y = mx_instnorm.nd.InstanceNorm(xa, mx.nd.zeros(c), mx.nd.array(beta), eps=EPS)
    got = as_f64(y)
    np.testing.assert_array_equal(got, np.broadcast_to(want.reshape(1, c, 1), got.shape))


def test_float16_every_value_widens_exactly():
    """Instances made of every finite float16 value of one range (normals
    of each binade, subnormals): a wrong widening of any of them moves the
    mean and variance."""
    bits = np.arange(0, 0x7C00, dtype=np.uint16)
    values = bits.view(np.float16)
    ranges = [values[:1024], values[1024:2048], values[0x3C00:0x4000], values[0x7800:0x7C00]]
    x = np.stack([np.concatenate([r, -r[::3]]) for r in
                  (np.resize(r, 1024) for r in ranges)])[None]  # (1, 4, 1366)
    xa = mx.nd.array(x, dtype=np.float16)
    ones = mx.nd.ones(4)
    y = mx_instnorm.nd.InstanceNorm(xa, ones, mx.nd.zeros(4), eps=0.0)
    want = ref_forward(x.astype(np.float64), np.ones(4), np.zeros(4), 0.0)[0]
    np.testing.assert_allclose(as_f64(y), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sym_and_gluon(rng, dtype):
    shape, c = (2, 4, 9, 11), 4
    x, xr = rounded(rng, shape, dtype, 1.5, -2.0)
    dy, dyr = rounded(rng, shape, dtype)
    # Gluon, imperative and hybridized: float32 parameters, half data.
    block = InstanceNorm(scale=True, epsilon=EPS, in_channels=c)
    block.initialize()
    block.gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, c)))
    block.beta.set_data(mx.nd.array(rng.standard_normal(c)))
    gr, br = block.gamma.data().asnumpy(), block.beta.data().asnumpy()
    want = ref_forward(xr, gr, br, EPS)[0]
    for hybridize in (False, True):
        if hybridize:
            block.hybridize()
        x.attach_grad()
        with mx.autograd.record():
            y = block(x)
        y.backward(dy)
        assert y.dtype == x.dtype
        np.testing.assert_allclose(as_f64(y), want, **HALF_TOL[dtype])
        np.testing.assert_allclose(as_f64(x.grad), ref_backward(dyr, xr, gr, EPS)[0],
                                   **HALF_TOL[dtype])
        assert block.gamma.data().dtype == np.float32
    # sym, bound to the arrays.
    s = mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), name="n", eps=EPS)
    ex = s.bind(mx.cpu(), {"x": x, "n_gamma": mx.nd.array(gr), "n_beta": mx.nd.array(br)})
    y = ex.forward()[0]
    assert y.dtype == x.dtype
    np.testing.assert_allclose(as_f64(y), ref_forward(xr, gr, br, EPS)[0], **HALF_TOL[dtype])


def _half_graph(dtype, **kwargs):
    """Our op after a cast of a float32 variable ``x`` to ``dtype``
    (``Symbol.infer_type`` takes no bfloat16 argument types)."""
    data = mx.sym.amp_cast(mx.sym.var("x"), dtype=BF16 if dtype == "bfloat16" else dtype)
    return mx_instnorm.sym.InstanceNorm(data, name="n", **kwargs)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_param_dtype_inferred_float32(dtype):
    """Half data gets float32 gamma/beta unless they are given otherwise
    (what AMP keeps its parameters in)."""
    half = BF16 if dtype == "bfloat16" else np.dtype(np.float16)
    args, outs, _ = _half_graph(dtype).infer_type(x=np.float32)
    assert [np.dtype(a) for a in args] == [np.float32] * 3
    assert np.dtype(outs[0]) == half
    if dtype == "float16":
        args, _, _ = _half_graph(dtype).infer_type(x=np.float32, n_gamma=np.float16)
        assert [np.dtype(a) for a in args] == [np.float32, np.float16, np.float16]


def test_bfloat16_messages(rng):
    """What is refused names bfloat16 (not 'unknown' or a structured
    dtype)."""
    x = nd_bf16(rng.standard_normal((2, 3, 4)))
    with pytest.raises(TypeError, match=r"gamma/beta dtype float64 does not match data "
                                        r"dtype bfloat16 \(allowed: bfloat16, float32\)"):
        mx_instnorm.nd.InstanceNorm(x, mx.nd.ones(3, dtype="float64"),
                                    mx.nd.zeros(3, dtype="float64"))
    with pytest.raises(TypeError, match="gamma and beta must have the same dtype, got "
                                        "gamma bfloat16 and beta float32"):
        mx_instnorm.nd.InstanceNorm(x, nd_bf16(np.ones(3)), mx.nd.zeros(3))
    if mx_instnorm.backend() == "compiled":
        # The library's type inference: it used to say "got unknown".
        with pytest.raises(mx.MXNetError, match="does not match data dtype bfloat16"):
            _half_graph("bfloat16").infer_type(x=np.float32, n_gamma=np.float64)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 8, 96, 96), 1), ((2, 96, 96, 40), -1)])
def test_bitwise_identical_across_thread_counts(rng, monkeypatch, dtype, shape, axis):
    if mx_instnorm.backend() != "compiled":
        pytest.skip("threads are the compiled kernel's")
    x, _ = rounded(rng, shape, dtype, 3.0, 10.0)
    c = shape[axis]
    gamma, beta = mx.nd.array(rng.uniform(0.5, 1.5, c)), mx.nd.array(rng.standard_normal(c))
    dy, _ = rounded(rng, shape, dtype)
    results = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("MX_INSTNORM_NUM_THREADS", threads)
        xa = x.copy()
        g = gamma.copy()
        for a in (xa, g):
            a.attach_grad()
        with mx.autograd.record():
            y = mx_instnorm.nd.InstanceNorm(xa, g, beta, axis=axis)
        y.backward(dy)
        results.append([a.asnumpy().view(np.uint8) if a.dtype == BF16 else
                        a.asnumpy() for a in (y, xa.grad, g.grad)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def _half_results(x, gamma, beta, dy, axis):
    xa, g = x.copy(), gamma.copy()
    for a in (xa, g):
        a.attach_grad()
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(xa, g, beta, eps=EPS, axis=axis)
    y.backward(dy)
    return [a.asnumpy() for a in (y, xa.grad, g.grad)]


@pytest.mark.parametrize("shape,axis", [((2, 4, 4001), 1), ((3, 4, 37, 61), 1),
                                        ((2, 4, 5000), 1), ((2, 61, 300), -1)])
def test_float16_f16c_and_portable_paths_agree(rng, monkeypatch, shape, axis):
    """The compiled kernel converts float16 with F16C where the CPU has it
    and with portable integer code otherwise (MX_INSTNORM_HALF_SCALAR=1
    forces the latter): both must give the same bits, and outputs that are
    the float64 reference rounded once to float16 (ties to even), up to the
    float32 arithmetic's noise. Gammas from 1e-6 to 3e4 put outputs among
    the subnormals and past the largest finite value; lengths of 4001 and
    5000 cross the kernel's 2048-element chunks and leave odd tails."""
    if mx_instnorm.backend() != "compiled":
        pytest.skip("the conversions are the compiled kernel's")
    c = shape[axis]
    x, xr = rounded(rng, shape, "float16", 2.0, 3.0)
    gamma_np = np.resize(np.array([1e-6, 3e-5, 1.0, 3e4], np.float32), c)
    gamma, beta = mx.nd.array(gamma_np), mx.nd.array(rng.standard_normal(c) * 1e-6)
    dy, _ = rounded(rng, shape, "float16")
    fast = _half_results(x, gamma, beta, dy, axis)
    monkeypatch.setenv("MX_INSTNORM_HALF_SCALAR", "1")
    portable = _half_results(x, gamma, beta, dy, axis)
    for a, b in zip(fast, portable):
        np.testing.assert_array_equal(a.view(np.uint16) if a.dtype == np.float16 else a,
                                      b.view(np.uint16) if b.dtype == np.float16 else b)
    y = fast[0]
    assert np.isinf(y).any() and ((y != 0) & (np.abs(y) < 2.0 ** -14)).any()
    want = ref_forward(xr, gamma_np.astype(np.float64), as_f64(beta), EPS, axis)[0]
    want16 = want.astype(np.float16)
    # float32 arithmetic may put a value on the other side of a rounding
    # boundary: then it is the neighbouring float16, never further.
    same = (y == want16) | (np.isinf(y) & np.isinf(want16) & (np.sign(y) == np.sign(want16)))
    assert same.mean() > 0.99
    finite = np.isfinite(want16) & np.isfinite(y)
    ulps = np.abs(y[finite].view(np.int16).astype(np.int32) -
                  want16[finite].view(np.int16).astype(np.int32))
    assert ulps.max() <= 1


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 4, 4001), 1), ((2, 61, 300), -1)])
def test_grad_req_add_in_place(rng, monkeypatch, dtype, shape, axis):
    """Leaves marked grad_req='add': the compiled operator adds into the
    leaves' own buffers (old + new in float32, rounded once to the dtype).
    After two passes the data's gradient is its initial value plus twice
    the float64 reference; on float16 the F16C and portable paths give the
    same bits (chunks of 2048 and channels-last rows, with odd tails)."""
    c = shape[axis]
    x, xr = rounded(rng, shape, dtype, 2.0, 3.0)
    gamma, gr = rounded(rng, (c,), "float32", 0.5, 1.0)
    beta = mx.nd.zeros(c)
    dy, dyr = rounded(rng, shape, dtype)
    start, start_r = rounded(rng, shape, dtype)

    def two_passes():
        xa, ga = x.copy(), gamma.copy()
        xa.attach_grad("add")
        ga.attach_grad("add")
        start.copyto(xa.grad)
        ga.grad[:] = 0.5
        mx.nd.waitall()
        for _ in range(2):
            with mx.autograd.record():
                y = mx_instnorm.nd.InstanceNorm(xa, ga, beta, eps=EPS, axis=axis)
            if mx_instnorm.backend() == "compiled":
                node = [n for n in json.loads(mx.autograd.get_symbol(y).tojson())["nodes"]
                        if n["op"] == "mx_instnorm_InstanceNorm"][0]
                assert node["attrs"]["__mx_instnorm_grads__"].startswith("+"), node
            y.backward(dy)
        return xa.grad.asnumpy(), as_f64(xa.grad), ga.grad.asnumpy()

    raw, got_x, got_g = two_passes()
    dx_r, dg_r, _ = ref_backward(dyr, xr, gr, EPS, axis)
    # Two roundings to the dtype, one per pass.
    tol = {k: 2 * v for k, v in HALF_TOL[dtype].items()}
    np.testing.assert_allclose(got_x, start_r + 2 * dx_r, **tol)
    m = np.sqrt(xr.size / c)
    np.testing.assert_allclose(got_g / m, (0.5 + 2 * dg_r) / m, **HALF_TOL[dtype])
    if dtype == "float16" and mx_instnorm.backend() == "compiled":
        monkeypatch.setenv("MX_INSTNORM_HALF_SCALAR", "1")
        portable = two_passes()
        np.testing.assert_array_equal(raw.view(np.uint16), portable[0].view(np.uint16))
        np.testing.assert_array_equal(got_g, portable[2])
