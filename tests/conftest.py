"""Shared references, tolerances and fixtures for the mx_instnorm tests.

The references here are written from the formula alone, in float64 NumPy,
and never call mx_instnorm: every test compares the code under test with
one of them, with MXNet's built-in InstanceNorm (float32, axis=1), with
finite differences, or with the documented examples.
"""
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():
    # MXNet 1.9.1's own import-time DeprecationWarnings (NumPy aliases,
    # distutils): not ours, and they bury the test report.
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx

import mx_instnorm  # noqa: F401  (registers the CustomOp)

DTYPES = (np.float16, np.float32, np.float64)

# One tolerance table, keyed by dtype: (rtol, atol) for comparing the code
# under test with the float64 reference evaluated on the same (already
# rounded) inputs. Values are normalized (O(1)) or sums of O(1) terms.
TOL = {
    # float64 computes in float64: only accumulation-order noise is left.
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12),
    # float32 accumulates in float32 over up to a few thousand elements
    # per instance: about 1e-6 relative error, 1e-5 leaves a margin.
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5),
    # float16 results are rounded to float16 (unit roundoff 4.9e-4), and
    # float16 inputs to a later stage (dy in a chain) carry that rounding
    # too: a few float16 ulps of an O(1) value.
    np.dtype(np.float16): dict(rtol=2e-3, atol=2e-3),
}

# Comparisons with MXNet's built-in float32 InstanceNorm: both sides carry
# float32 rounding (the built-in its own one-pass statistics), so the
# difference is up to about twice float32 noise on O(1) values, a little
# more on gradients, which sum over whole instances.
BUILTIN_TOL = dict(rtol=1e-4, atol=1e-4)

# float32 results after several float32 stages (two layers, a graph bound
# by a Module or a SymbolBlock, gradients summed over two passes, a forked
# child, MXNet's np-shape mode) against a float64 reference: each stage's
# rounding carries into the next, as with the built-in.
CHAIN_TOL = dict(rtol=1e-4, atol=1e-4)

# The same float32 computation by two routes (imperative and hybridized, a
# parameter file's round trip, a swap there and back): only the order of
# operations differs.
SAME_TOL = dict(rtol=1e-6, atol=1e-6)

# float64 analytic gradients against central differences with step 1e-6
# (truncation ~h^2, cancellation ~1e-16/h: both far below these).
FD_TOL = dict(rtol=1e-5, atol=1e-7)
# The same on a large tensor with step 1e-5, one coordinate at a time: dx
# entries are small differences of large sums; dgamma/dbeta are not.
FD_LARGE_TOL = {"x": dict(rtol=1e-4, atol=1e-6), "params": dict(rtol=1e-6, atol=1e-6)}

# Data with an offset of 1e3 and outliers: the float32 input itself carries
# about 6e-5 absolute rounding, so y's error is bounded by the deviations'
# relative precision (absolute); the instance means must be near exact.
OFFSET_TOL = {
    np.dtype(np.float32): dict(y=dict(rtol=0, atol=1e-4), mean=dict(rtol=1e-6)),
    np.dtype(np.float64): dict(y=dict(rtol=0, atol=1e-10), mean=dict(rtol=1e-12)),
}

# The documented example outputs are printed with 5 decimals and carry the
# built-in's float32 noise.
DOC_ATOL = 5e-7


def scaled(tolerance, want):
    """``tolerance`` with its ``atol`` scaled by the reference's largest
    magnitude (at least 1): for values well above O(1), such as outputs of
    convolutions."""
    scale = max(1.0, float(np.abs(np.asarray(want, np.float64)).max()))
    return dict(tolerance, atol=tolerance["atol"] * scale)

# Shapes (rank 3 to 5, odd sizes) with a channel axis each.
SHAPES_AXES = [
    ((3, 5, 7), 1),
    ((3, 5, 7), 2),
    ((3, 5, 7), -1),
    ((2, 3, 1, 9), 1),
    ((2, 3, 1, 9), 2),
    ((2, 3, 4, 5), 3),
    ((2, 3, 4, 5, 6), 1),
    ((2, 3, 4, 5, 6), 2),   # a middle axis of a rank-5 tensor
    ((2, 3, 4, 5, 6), -1),
]

# Larger tensors (1e4 to 6e4 elements, odd sizes): implementations may
# take a different route for small and for large inputs (whole-tensor
# NumPy calls vs blocks of instances, threads), so both sizes are tested.
LARGE_SHAPES_AXES = [
    ((2, 6, 37, 41), 1),
    ((2, 37, 41, 6), -1),
    ((2, 5, 21, 9, 11), 2),
    ((3, 5, 4001), 1),
    ((3, 4001, 5), 2),
]

# Rank 3-5, odd sizes, channel axis 1: what the built-in accepts.
BUILTIN_SHAPES = [(3, 5, 7), (2, 3, 1, 9), (2, 3, 5, 7), (2, 3, 4, 5, 3), (2, 8, 33, 35)]


def tol(dtype):
    """The tolerance entry for ``dtype``."""
    return TOL[np.dtype(dtype)]


def assert_close(got, want, dtype, err_msg=""):
    """``got`` (any dtype) against a float64 reference, at ``dtype``'s
    tolerance; NaN must match NaN."""
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               err_msg=err_msg, **tol(dtype))


# --------------------------------------------------------------- reference --

def _axes(ndim, axis):
    axis = axis % ndim
    return axis, tuple(i for i in range(1, ndim) if i != axis)


def _pshape(ndim, axis, channels):
    shape = [1] * ndim
    shape[axis] = channels
    return shape


def ref_forward(x, gamma, beta, eps, axis=1):
    """Naive float64 instance norm: returns ``(y, mean, var)``; mean/var keep
    the reduced axes (size 1)."""
    x = np.asarray(x, np.float64)
    axis, red = _axes(x.ndim, axis)
    mean = x.mean(axis=red, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    ps = _pshape(x.ndim, axis, x.shape[axis])
    g = np.asarray(gamma, np.float64).reshape(ps)
    b = np.asarray(beta, np.float64).reshape(ps)
    y = (x - mean) / np.sqrt(var + eps) * g + b
    return y, mean, var


def ref_backward(dy, x, gamma, eps, axis=1):
    """Closed-form float64 gradients ``(dx, dgamma, dbeta)`` of
    ``sum(dy * y)``."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axis, red = _axes(x.ndim, axis)
    m = int(np.prod([x.shape[i] for i in red]))
    mean = x.mean(axis=red, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    ps = _pshape(x.ndim, axis, x.shape[axis])
    g = np.asarray(gamma, np.float64).reshape(ps)
    not_c = tuple(i for i in range(x.ndim) if i != axis)
    dbeta = dy.sum(axis=not_c)
    dgamma = (dy * xhat).sum(axis=not_c)
    dxhat = dy * g
    dx = rstd / m * (m * dxhat - dxhat.sum(axis=red, keepdims=True)
                     - xhat * (dxhat * xhat).sum(axis=red, keepdims=True))
    return dx, dgamma, dbeta


def random_inputs(rng, shape, axis, dtype, param_dtype=None):
    """Random, non-constant data with a per-instance offset and scale, and
    random gamma (away from 0) and beta, already rounded to their dtypes."""
    param_dtype = dtype if param_dtype is None else param_dtype
    axis = axis % len(shape)
    c = shape[axis]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0) + rng.uniform(-3, 3)
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.standard_normal(c)
    return x.astype(dtype), gamma.astype(param_dtype), beta.astype(param_dtype)


# ---------------------------------------------------------------- fixtures --

@pytest.fixture
def rng():
    """A seeded generator, fresh for each test."""
    return np.random.default_rng(20240611)


@pytest.fixture(autouse=True)
def _seed_mxnet():
    mx.random.seed(1234)
    yield


# ---------------------------------------------------------------- backends --
#
# Every test that runs MXNet operators runs once per backend: "compiled" (the
# C++ operator, skipped with the loader's reason where it is not built) and
# "python" (the CustomOp). Tests that take the ``path`` fixture run on the
# Python backend once per computation path as well. The pure-NumPy kernel
# tests, and the modules below that pick backends themselves, run once.
BACKENDS = ("compiled", "python")
PATHS = ("fast", "generic")
_SINGLE_BACKEND_MODULES = {"test_kernel", "test_compiled", "test_compat", "test_backends",
                           "test_layers", "test_shim_safety"}


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rpartition(".")[2]
    if module in _SINGLE_BACKEND_MODULES:
        return
    if "path" in metafunc.fixturenames:
        combos = [("compiled", "fast")] + [("python", p) for p in PATHS]
        metafunc.parametrize(("mx_backend", "path"), combos, indirect=True,
                             ids=["compiled"] + ["python-%s" % p for p in PATHS])
    else:
        metafunc.parametrize("mx_backend", BACKENDS, indirect=True)


@pytest.fixture(autouse=True)
def mx_backend(request, monkeypatch):
    """The backend the test runs on (None where the module is not
    parametrized): ``MX_INSTNORM_BACKEND`` is set for the test and the
    subprocesses it starts."""
    name = getattr(request, "param", None)
    if name is None:
        return None
    if name == "compiled" and mx_instnorm.operator.backend.compiled_op() is None:
        monkeypatch.setenv("MX_INSTNORM_BACKEND", "auto")
        pytest.skip("compiled backend unavailable: "
                    + mx_instnorm.operator.backend.backend_reason())
    monkeypatch.setenv("MX_INSTNORM_BACKEND", name)
    assert mx_instnorm.backend() == name
    return name


@pytest.fixture
def path(request, monkeypatch, mx_backend):
    """Runs the test under each computation path of the Python backend:
    ``fast`` (the NumPy kernel on views of MXNet's memory) and ``generic``
    (mx.nd operators). The path is chosen per ``create_operator`` call, so
    setting the variable here is enough. On the compiled backend the
    parameter is ``fast`` and the variable is left alone."""
    if request.param == "generic":
        monkeypatch.setenv("MX_INSTNORM_PATH", "generic")
    else:
        monkeypatch.delenv("MX_INSTNORM_PATH", raising=False)
    expected = "generic" if request.param == "generic" else "numpy"
    assert mx_instnorm.operator.implementation("cpu", custom_op=True) == expected
    return request.param
