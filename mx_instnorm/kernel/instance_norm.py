r"""Instance normalization in pure NumPy: the numerical kernel of mx_instnorm.

Nothing here imports MXNet. The operator glue hands this module NumPy views
of MXNet's memory, and the outputs are written in place.

Layout
------
Data of rank >= 3, batch axis 0 and channel axis ``axis`` is viewed, without
copying, as ``(N, A, C, B)``: ``A`` is the product of the axes between the
batch and the channel axis, ``B`` the product of those after it. Instance
``(n, c)`` is ``x[n, :, c, :]``, of ``M = A * B`` elements. Two layouts run
without any copy:

* channels first (``A == 1``, e.g. NCHW): every instance is a contiguous row
  of the ``(N*C, B)`` matrix; blocks of rows are normalized at a time;
* channels last (``B == 1``, e.g. NHWC): every instance is a column of the
  ``(A, C)`` slab ``x[n]``; one slab is normalized at a time.

Any other channel axis is transposed to channels first and back. (``A``
is only ever this layout dimension; the accumulation dtype is ``acc``.)

The derivation
--------------
This section is the one statement of the maths for every implementation:
this module (NumPy), ``instance_norm.cc`` (C++, the compiled backend) and
:mod:`mx_instnorm.operator.generic` (``mx.nd`` operators, the CustomOp's
generic path). Each uses these symbols for these quantities; the docs
point here instead of repeating it.

========== ================================================================
symbol     meaning (per instance ``(n, c)``, sums over its ``M`` elements)
========== ================================================================
``M``      ``A * B``, the instance's element count
``K``      the shift: the instance's first element, ``x[n, 0, c, 0]``
``d``      ``x - K``, the shifted data (never ``x - mean``)
``mu``     ``mean(d)``: the mean of the *shifted* data
``mean``   ``K + mu``: the instance's mean, as returned
``var``    ``mean((d - mu)**2)``: the biased variance
``rstd``   ``1 / sqrt(var + eps)`` (``eps`` inside the root, as MXNet's
           code has it, not its docstring)
``xhat``   ``(d - mu) * rstd``, the normalized data
``y``      ``gamma[c] * xhat + beta[c]``
``g``      ``dL/dy``, the incoming gradient (``dy``)
``c1``     ``sum(g) / M``
``c2``     ``sum(g * xhat) / M = rstd * (sum(g d) - mu sum(g)) / M``
``k``      ``gamma[c] * rstd``
``b1``     ``rstd * c2`` (C++ ``DxCoef::b1``)
``b0``     ``b1 * mu - c1`` (C++ ``DxCoef::b0``)
``acc``    the accumulation dtype (:func:`accumulation_dtype`; ``AccT`` in the C++): float32
           for float16 and bfloat16 data, the data's own otherwise
========== ================================================================

Forward
~~~~~~~
.. math::

    d_j = x_j - K, \quad \mu = \frac{1}{M}\sum_j d_j, \quad
    \mathrm{var} = \frac{1}{M}\sum_j (d_j - \mu)^2, \quad
    r = \frac{1}{\sqrt{\mathrm{var} + \epsilon}},

    \hat{x}_j = (d_j - \mu)\, r, \qquad y_j = \gamma_c \hat{x}_j + \beta_c .

``r`` is ``rstd``. Since ``d - mu = x - mean`` exactly in real arithmetic,
this is the textbook formula; the shift only changes rounding. For data
with a large common offset ``d`` is exact or nearly so, and ``mu`` and
``var`` keep their digits: ``y`` is computed from ``(x - K) - mu``, never
from ``x - mean``. A one-pass ``E[x^2] - E[x]^2`` on ``x`` loses every digit
when the offset is large against the spread; on ``d`` it does not, as long
as ``K`` is not far out in its instance. ``var`` by implementation:

* NumPy, small inputs (at most ``_SMALL_ELEMS`` elements) and the generic
  path: two-pass, ``var = mean((d - mu)**2)``;
* NumPy blocks: ``var = mean(d * d) - mu**2`` (BLAS sums, one pass fewer),
  recomputed two-pass for the instances with ``mu**2 > 16 var`` (``K`` more
  than 4 standard deviations from the mean), where the difference would
  cancel;
* C++: two-pass within cache-sized chunks, the chunks' ``(count, mu, m2)``
  merged in double with Chan's formula.

Sums over long rows go through BLAS dots (NumPy), sums down the columns of
a channels-last slab through 128-row chunks. Everything is accumulated in
``acc``.

Overflow: one strategy, a power-of-two scale
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
An instance whose sum of squares overflows (float32 values beyond about
1e19, float64 beyond about 1e154) would get ``var = inf``, ``rstd = 0``
and ``y = beta``. The Python paths (this module and the generic path)
instead recompute exactly those instances (non-finite ``var``) with the
data scaled by ``s = 2**-e``, ``e`` such that ``2**(e-1) <= max|x| < 2**e``
(a power of two, so ``x s`` is exact), and scale the statistics back::

    mean = (K_s + mu_s) / s,    rstd = s / sqrt(var_s + eps s**2)

where ``K_s``, ``mu_s``, ``var_s`` are the symbols above computed on
``x s``; ``xhat`` is the same on either scale. Here the blocks mark such an
instance with ``rstd = 0`` (no finite variance gives it) and write ``y = 0``
(add 0); the driver recomputes only the marked instances. Normal data pays
one ``rstd.all()`` per call (the generic path one small read of ``var``).
The C++ kernel detects the same instances (non-finite ``var`` or ``mu``)
but recomputes them in double, dividing the deviations ``d - mu`` by their
largest magnitude ``s' = max|d - mu|`` (not a power of two, so that
division rounds, in double, below the float32 and float16 results'
precision; for float64 data it can cost an ulp or two):
``rstd = 1 / (s' sqrt(mean(((d - mu)/s')**2) + eps / s'**2))``. NaN or inf
in an instance gives NaN there only, on every path.

Backward
~~~~~~~~
With ``g = dL/dy``, sums over the ``M`` elements of one instance (and over
the batch for the parameters):

.. math::

    \frac{\partial L}{\partial \beta_c} = \sum_n \sum_j g_j, \qquad
    \frac{\partial L}{\partial \gamma_c} = \sum_n \sum_j g_j \hat{x}_j .

Because :math:`\partial \mu / \partial x_j = 1/M` and
:math:`\partial r / \partial x_j = -r^3 (d_j - \mu) / M`,

.. math::

    \frac{\partial L}{\partial x_j}
      = k \left(g_j - c_1 - \hat{x}_j c_2\right)
      = k \left(g_j - b_1 d_j + b_0\right), \qquad k = \gamma_c r,

    c_1 = \frac{1}{M}\sum_i g_i, \quad
    c_2 = \frac{1}{M}\sum_i g_i \hat{x}_i, \quad
    b_1 = r c_2, \quad b_0 = b_1 \mu - c_1 .

(``xhat c2 = b1 (d - mu)``.) This module and the generic path evaluate the
first form: NumPy with ``xhat c2`` as ``(x - mean) * (rstd c2)``, from the
``mean``/``rstd`` its forward saved (or recomputes); the C++ kernel the
second, with ``d``, ``mu``, ``sum(g)`` and ``sum(g d)`` from one fused pass
over ``(g, x)`` (it saves no statistics), keeping ``k`` apart from ``b0``,
``b1`` because their products underflow float32 for data around 1e30.

Three implementations
---------------------
This module is the Python backend's CPU kernel. The compiled backend's
kernel, ``mx_instnorm/kernel/instance_norm.cc``, and the generic ``mx.nd``
path, :mod:`mx_instnorm.operator.generic`, compute the formulas above with
the symbols above. None is the others' reference: the tests compare each
with float64 NumPy written in the tests, with MXNet's built-in operator and
with finite differences.

Determinism
-----------
Every instance is reduced by the same calls in the same order whatever
the block size or thread count, and the per-channel parameter gradients are
summed over the batch in batch order after all blocks are done, so results
are bitwise identical for every ``num_threads`` and ``block_bytes``.

Examples
--------
>>> import numpy as np
>>> x = np.array([[[1.1, 2.2]], [[3.3, 4.4]]], dtype=np.float32)
>>> y, mean, rstd = instance_norm_forward(
...     x, np.array([1.5], np.float32), np.array([0.5], np.float32), eps=1e-3)
>>> np.round(y, 5)
array([[[-0.99753,  1.99753]],
<BLANKLINE>
       [[-0.99753,  1.99753]]], dtype=float32)
>>> np.round(mean, 5)
array([[1.65],
       [3.85]], dtype=float32)
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "SUPPORTED_DTYPES",
    "DEFAULT_BLOCK_BYTES",
    "accumulation_dtype",
    "canonical_shape",
    "default_num_threads",
    "instance_norm_forward",
    "instance_norm_stats",
    "instance_norm_backward",
]

SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

# A block's working set is about three times this (input, scratch, output);
# 256 KiB keeps it inside a 1-2 MiB L2 cache.
DEFAULT_BLOCK_BYTES = 256 * 1024

# Below this many input bytes a second thread costs more than it saves.
_PARALLEL_MIN_BYTES = 512 * 1024

_REQS = ("write", "add", "null")

def accumulation_dtype(dtype):
    """The dtype statistics and sums are accumulated in: float32 for
    float16 data (float16 sums overflow at 65504 and keep 11 bits),
    otherwise the data's own dtype."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def canonical_shape(shape, axis):
    """``(N, A, C, B)`` for data of ``shape`` with channel axis ``axis``.

    >>> canonical_shape((2, 3, 4, 5), 1)
    (2, 1, 3, 20)
    >>> canonical_shape((2, 4, 5, 3), -1)
    (2, 20, 3, 1)
    """
    ndim = len(shape)
    if ndim < 3:
        raise ValueError("InstanceNorm needs data of rank >= 3, got rank %d "
                         "(shape %s)" % (ndim, tuple(shape)))
    ax = axis + ndim if axis < 0 else axis
    if not 0 < ax < ndim:
        raise ValueError("axis %d is out of range or the batch axis for data "
                         "of rank %d" % (axis, ndim))
    # math.prod: a tenth of np.prod's cost, which matters for tiny calls.
    return (int(shape[0]), int(math.prod(shape[1:ax])),
            int(shape[ax]), int(math.prod(shape[ax + 1:])))


def default_num_threads():
    """Threads a call splits its work over when not told.

    ``MX_INSTNORM_NUM_THREADS`` if set (anything but a positive integer
    raises ``ValueError``); else the thread settings MXNet itself honours,
    in MXNet's precedence: ``MXNET_OMP_MAX_THREADS``, then
    ``OMP_NUM_THREADS`` (its first entry: OpenMP allows a list per nesting
    level), each passed over unless a positive integer, as OpenMP does;
    else the CPUs this process may run on. A server that gives each worker
    one thread (Multi Model Server sets ``OMP_NUM_THREADS=1``) is obeyed.
    The compiled kernel's ``num_threads_from_env`` follows the same rules.
    Read on every call.

    >>> import os
    >>> saved = dict(os.environ)
    >>> for name in ("MX_INSTNORM_NUM_THREADS", "MXNET_OMP_MAX_THREADS"):
    ...     _ = os.environ.pop(name, None)
    >>> os.environ["OMP_NUM_THREADS"] = "3,1"
    >>> default_num_threads()
    3
    >>> os.environ["MX_INSTNORM_NUM_THREADS"] = "2"
    >>> default_num_threads()
    2
    >>> os.environ.clear(); os.environ.update(saved)
    """
    env = os.environ.get("MX_INSTNORM_NUM_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError("MX_INSTNORM_NUM_THREADS must be a positive "
                             "integer, got %r" % env) from None
        if value < 1:
            raise ValueError("MX_INSTNORM_NUM_THREADS must be a positive "
                             "integer, got %r" % env)
        return value
    for text in (os.environ.get("MXNET_OMP_MAX_THREADS", ""),
                 os.environ.get("OMP_NUM_THREADS", "").split(",")[0]):
        if text.strip().isdigit() and 0 < int(text) <= 4096:
            return int(text)
    global _cpus
    if _cpus is None:
        try:
            _cpus = max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            _cpus = max(1, os.cpu_count() or 1)
    return _cpus


_cpus = None  # the CPUs this process may use, looked up once


# ---------------------------------------------------------------- threads --

_pools = {}
_pools_lock = threading.Lock()
_thread_bufs = {}


def _pool(num_workers):
    with _pools_lock:
        pool = _pools.get(num_workers)
        if pool is None:
            pool = _pools[num_workers] = ThreadPoolExecutor(
                max_workers=num_workers, thread_name_prefix="mx_instnorm")
        return pool


def _reset_after_fork():
    """Forget the threads' state in a forked child.

    ``fork()`` copies the pools but not their threads: a chunk submitted to
    a copied pool would wait forever for a worker that does not exist. The
    lock may have been held by another thread at the fork, and the scratch
    buffers of the parent's other threads are dead memory.
    """
    global _pools_lock
    _pools.clear()
    _thread_bufs.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_reset_after_fork)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_madvise = None


def _prefault(arr):
    """Map ``arr``'s pages writable in one system call, if they are not yet.

    An output MXNet has just allocated is fresh memory: each page faults on
    its first write, and threads faulting pages of the same process in
    parallel serialize in the kernel, so badly that two threads writing a
    fresh 32 MiB output took 4 to 8 times longer than one. A single
    ``madvise(MADV_POPULATE_WRITE)`` maps them all (70 us for 32 MiB
    already mapped). Where the call is not available (not Linux, older
    kernels) nothing happens.
    """
    global _madvise
    if _madvise is None:
        try:
            import ctypes
            import ctypes.util
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                               use_errno=True)
            fn = libc.madvise
            fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise or arr is None or not arr.nbytes:
        return
    page = 4096
    start = arr.__array_interface__["data"][0]
    first = start & ~(page - 1)
    last = (start + arr.nbytes + page - 1) & ~(page - 1)
    if _madvise(first, last - first, _MADV_POPULATE_WRITE) != 0:
        _madvise = False  # EINVAL on kernels without it: stop trying


def _run_parallel(work, tasks, num_threads, nbytes, outputs=()):
    """Run ``work(task)`` for every task, split into contiguous chunks over
    ``num_threads`` threads (the caller's thread takes the first chunk).
    ``outputs``: arrays the tasks write, prefaulted before going parallel."""
    if num_threads is None:
        num_threads = default_num_threads()
    num_threads = min(int(num_threads), len(tasks))
    if num_threads <= 1 or nbytes < _PARALLEL_MIN_BYTES:
        for task in tasks:
            work(task)
        return
    for out in outputs:
        _prefault(out)
    bounds = np.linspace(0, len(tasks), num_threads + 1).astype(int)
    chunks = [tasks[bounds[i]:bounds[i + 1]] for i in range(num_threads)]

    def run_chunk(chunk):
        for task in chunk:
            work(task)

    futures = []
    inline = [chunks[0]]
    pool = _pool(num_threads - 1)
    for chunk in chunks[1:]:
        try:
            futures.append(pool.submit(run_chunk, chunk))
        except RuntimeError:
            # The interpreter is exiting (concurrent.futures has joined its
            # workers before atexit handlers run MXNet's queued CustomOp
            # work): the caller's thread takes the rest.
            inline.append(chunk)
    try:
        for chunk in inline:
            run_chunk(chunk)
    finally:
        # Wait for every chunk even if one failed: they write into the
        # caller's arrays.
        errors = []
        for fut in futures:
            try:
                fut.result()
            except BaseException as err:  # noqa: B902 - re-raised below
                errors.append(err)
    if errors:
        raise errors[0]


def _scratch(slot, shape, dtype):
    """A per-thread reusable buffer: no tensor-sized allocation per block.

    Keyed by the OS thread id, not kept in a ``threading.local``: MXNet runs
    a CustomOp on its own C++ threads, and each callback gets a fresh Python
    thread state, which would empty a ``threading.local`` on every call.
    """
    ident = threading.get_ident()
    bufs = _thread_bufs.get(ident)
    if bufs is None:
        with _pools_lock:
            bufs = _thread_bufs.setdefault(ident, {})
    size = math.prod(shape)
    key = (slot, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


# ------------------------------------------------------------ block maths --
# A block is a 2-D array whose instances lie along ``red`` (1: rows, 0:
# columns). Sums go through BLAS (matmul against ones, per-row dots): several
# times faster than NumPy's reductions on data already in cache, and each
# instance is summed by the same call whatever else is in the block.

_ones_cache = {}


def _ones(length, dtype):
    key = (length, np.dtype(dtype).str)
    ones = _ones_cache.get(key)
    if ones is None:
        ones = np.ones(length, dtype)
        ones.flags.writeable = False
        _ones_cache[key] = ones
    return ones


_COL_CHUNK = 128


def _column_totals(a):
    """Column sums of an (A, C) slab, in 128-row chunks whose partial sums
    are then added: a plain running sum over thousands of rows loses about
    A/2 ulps, the chunked one about (128 + A/128)/2."""
    rows = a.shape[0]
    full = rows - rows % _COL_CHUNK
    if full < 2 * _COL_CHUNK:
        return _ones(rows, a.dtype) @ a
    parts = _ones(_COL_CHUNK, a.dtype) @ a[:full].reshape(-1, _COL_CHUNK, a.shape[1])
    total = parts.sum(axis=0)
    if full < rows:
        total += _ones(rows - full, a.dtype) @ a[full:]
    return total


def _overflow_expected(fn):
    """Runs ``fn`` with NumPy's overflow/invalid warnings off: an instance
    whose sum of squares overflows is detected from the result and
    recomputed scaled (see the module docstring), so the warning would only
    alarm about a case that is handled. (np.errstate is per thread, hence
    per block function.)"""
    def run(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            return fn(*args, **kwargs)
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def _isum(a, red):
    """Per-instance sums of a block."""
    if red == 1:
        return np.matmul(a[:, None, :], _ones(a.shape[1], a.dtype)[:, None]).reshape(-1)
    return _column_totals(a)


def _idot(a, b, red):
    """Per-instance sums of ``a * b``."""
    if red == 1:
        return np.matmul(a[:, None, :], b[:, :, None]).reshape(-1)
    prod = _scratch(2, a.shape, a.dtype)
    np.multiply(a, b, out=prod)
    return _column_totals(prod)


def _keep(vec, red):
    return vec[:, None] if red == 1 else vec[None, :]


@_overflow_expected
def _block_stats(xb, red, eps, acc):
    """Per-instance statistics of the block ``xb``.

    Returns ``(d, mu, mean, rstd)``: ``d = x - K`` in a scratch buffer, with
    ``K`` a per-instance shift, ``mu = mean(d)``, ``mean = K + mu`` and
    ``rstd``, all flat vectors in ``acc``.
    """
    m = xb.shape[red]
    first = xb[:, :1] if red == 1 else xb[:1, :]
    d = _scratch(0, xb.shape, acc)
    np.subtract(xb, first, out=d, dtype=acc)
    K = first.astype(acc).ravel()
    mu = _isum(d, red) / m
    var = _idot(d, d, red) / m
    var -= mu * mu
    bad = None
    if not np.isfinite(var).all():
        # d * d overflowed (data beyond about 1e19 in float32, 1e154 in
        # float64) or the data holds inf/NaN: these instances get rstd 0,
        # the mark _rescale_instances looks for, and d 0 so that the block
        # writes y = 0 (adds 0) for them.
        bad = np.flatnonzero(~np.isfinite(var))
        var[bad] = 0
        mu[bad] = 0
        if red == 1:
            d[bad] = 0
        else:
            d[:, bad] = 0
    # Shifted by one of its own elements, an instance's E[d^2] - E[d]^2
    # keeps its digits unless that element lies far out (here: more than 4
    # standard deviations); those instances are centred and summed again.
    far = mu * mu > 16 * var
    if far.any():
        idx = np.flatnonzero(far)
        if red == 1:
            d[idx] -= mu[idx, None]
            var[idx] = _idot(d[idx], d[idx], 1) / m
        else:
            d[:, idx] -= mu[idx]
            var[idx] = np.einsum("ij,ij->j", d[:, idx], d[:, idx]) / m
        K[idx] += mu[idx]
        mu[idx] = 0
    var += eps
    rstd = np.sqrt(var, out=var)
    np.divide(1, rstd, out=rstd)
    if bad is not None:
        rstd[bad] = 0
    return d, mu, K + mu, rstd


def _put(dst, src, req):
    """Write or accumulate ``src`` into ``dst`` with one rounding."""
    if req == "add":
        np.add(dst, src, out=dst, casting="unsafe")
    else:
        np.copyto(dst, src, casting="unsafe")


@_overflow_expected
def _forward_block(xb, yb, red, gam, bet, eps, acc, y_req):
    d, mu, mean, rstd = _block_stats(xb, red, eps, acc)
    if yb is not None:
        # y = (d - mu) * scale + beta = d * scale + (beta - mu * scale)
        scale = gam * rstd
        d *= _keep(scale, red)
        bias = bet - mu * scale
        if not rstd.all():
            bias[rstd == 0] = 0  # overflowed instances: _rescale_instances writes them
        bias = _keep(bias, red)
        if y_req == "add":
            d += bias
            np.add(yb, d, out=yb, casting="unsafe")
        else:
            np.add(d, bias, out=yb, casting="unsafe")
    return mean, rstd


@_overflow_expected
def _backward_block(xb, gb, dxb, red, gam, mean, rstd, acc, dx_req):
    """Returns per-instance ``(sum g, sum g x_hat)`` and writes dx."""
    m = xb.shape[red]
    # xc = x - mean = d - mu (this path has mean, not K, from its forward)
    xc = _scratch(0, xb.shape, acc)
    np.subtract(xb, _keep(mean, red), out=xc, dtype=acc)
    if gb.dtype != acc:
        g = _scratch(1, gb.shape, acc)
        np.copyto(g, gb)
    else:
        g = gb
    sum_g = _isum(g, red)
    sum_gxhat = _idot(g, xc, red)
    sum_gxhat *= rstd
    if dxb is None:
        return sum_g, sum_gxhat
    # dx = k (g - c1 - xhat c2), with xhat c2 = xc (rstd c2)
    xc *= _keep(rstd * (sum_gxhat / m), red)
    np.subtract(g, xc, out=xc)
    xc -= _keep(sum_g / m, red)
    k = _keep(gam * rstd, red)
    if dx_req == "write":
        np.multiply(xc, k, out=dxb, casting="unsafe")
    else:
        xc *= k
        _put(dxb, xc, dx_req)
    return sum_g, sum_gxhat


# ------------------------------------------------------ extreme magnitudes --
# An instance whose values reach about 1e19 (float32; 1e154 in float64) has
# a sum of squares beyond the dtype's range: its variance overflows to inf,
# rstd to 0, and y would silently be beta. Every path marks such instances
# with rstd == 0 (a value no finite variance gives) and writes y = 0 (adds
# 0) for them; the driver then recomputes just those instances here, scaled
# by a power of two (exact) so that nothing overflows. Normal data pays one
# ``rstd.all()`` per call.

def _scaled_stats(rows, eps, acc):
    """``(x_hat, mean, rstd)`` of the instances ``rows`` (k, M).

    The module docstring's overflow strategy: each row is scaled by
    ``s = 2**-e`` with ``2**(e-1) <= max|x| < 2**e`` (exact), normalized
    with the shifted two-pass maths, and the statistics scaled back:
    ``mean = (K_s + mu_s) / s``, ``rstd = s / sqrt(var_s + eps s**2)``.
    Rows holding inf or NaN give NaN, as elsewhere.
    """
    with np.errstate(all="ignore"):
        xs = rows.astype(acc)
        top = np.abs(xs).max(axis=1)
        e = np.frexp(top)[1].astype(np.int64)
        e[~np.isfinite(top)] = 0
        xs = np.ldexp(xs, -e[:, None]).astype(acc, copy=False)
        K = xs[:, :1].copy()
        xs -= K
        mu = xs.mean(axis=1, keepdims=True)
        xs -= mu
        var_s = np.square(xs).mean(axis=1)
        eps_s = np.ldexp(np.full(len(e), eps, acc), -2 * e).astype(acc, copy=False)
        rstd_s = 1 / np.sqrt(var_s + eps_s)
        xs *= rstd_s[:, None]
        mean = np.ldexp((K + mu).ravel(), e).astype(acc, copy=False)
        rstd = np.ldexp(rstd_s, -e).astype(acc, copy=False)
    return xs, mean, rstd


def _rescale_instances(x4, y4, gam, bet, eps, acc, req, mean, rstd):
    """Recomputes the instances marked ``rstd == 0`` (flat ``n * C + c``
    indices of the (N, A, C, B) view ``x4``) with :func:`_scaled_stats`,
    fixing ``mean``/``rstd`` in place and writing (``'write'``) or adding
    (``'add'``) their ``y`` into ``y4`` (skipped when None)."""
    flat = np.flatnonzero(rstd == 0)
    nn, cc = np.divmod(flat, x4.shape[2])
    rows = x4[nn, :, cc, :]  # (k, A, B)
    xhat, mean[flat], rstd[flat] = _scaled_stats(rows.reshape(len(flat), -1), eps, acc)
    if y4 is not None:
        y = (xhat * gam[cc, None] + bet[cc, None]).reshape(rows.shape)
        if req == "add":
            y4[nn, :, cc, :] += y
        else:
            y4[nn, :, cc, :] = y


# ------------------------------------------------------------ small path --
# Below _SMALL_ELEMS elements the blocked path's fixed cost (a plan, scratch
# buffers, a task) outweighs its work; these do the same shifted two-pass
# maths on the whole (N, A, C, B) view in a dozen NumPy calls. Instance
# reductions run over axes (1, 3).

_SMALL_ELEMS = 8192
_RED = (1, 3)


@_overflow_expected
def _small_forward(x4, gam, bet, eps, acc, want_y):
    """``(y, mean, rstd)``; ``y`` in ``acc`` (or None), for the caller to put."""
    m = x4.shape[1] * x4.shape[3]
    K = x4[:, :1, :, :1].astype(acc)
    d = np.subtract(x4, K, dtype=acc)
    mu = d.sum(axis=_RED, keepdims=True)
    mu /= m
    d -= mu
    var = np.square(d).sum(axis=_RED, keepdims=True)
    var /= m
    var += eps
    rstd = np.sqrt(var, out=var)
    np.divide(1, rstd, out=rstd)
    # An overflowed variance leaves rstd 0 (inf/NaN data: NaN, already the
    # result); the caller recomputes the rstd-0 instances scaled.
    y = None
    if want_y:
        d *= gam[:, None] * rstd
        d += bet[:, None]
        y = d
    return y, (K + mu).reshape(-1), rstd.reshape(-1)


@_overflow_expected
def _small_backward(x4, g4, gam, mean, rstd, acc, want_dx):
    """``(dx, sum g, sum g x_hat)``; ``dx`` in ``acc`` (or None)."""
    n, _, c, _ = x4.shape
    m = x4.shape[1] * x4.shape[3]
    mean = mean.reshape(n, 1, c, 1)
    rstd = rstd.reshape(n, 1, c, 1)
    g = g4.astype(acc)
    xhat = np.subtract(x4, mean, dtype=acc)
    xhat *= rstd
    sum_g = g.sum(axis=_RED, keepdims=True)
    sum_gxhat = (g * xhat).sum(axis=_RED, keepdims=True)
    dx = None
    if want_dx:
        # dx = k (g - c1 - xhat c2)
        xhat *= sum_gxhat / m
        g -= xhat
        g -= sum_g / m
        g *= gam[:, None] * rstd
        dx = g
    return dx, sum_g.reshape(-1), sum_gxhat.reshape(-1)


# --------------------------------------------------------------- drivers --

def _check_req(name, req):
    if req == "inplace":
        return "write"
    if req not in _REQS:
        raise ValueError("%s must be one of 'write', 'inplace', 'add', 'null', "
                         "got %r" % (name, req))
    return req


def _check_data(x, axis, name="data"):
    if not isinstance(x, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray, got %s"
                        % (name, type(x).__name__))
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError("%s dtype must be float16, float32 or float64, got %s"
                        % (name, x.dtype))
    return canonical_shape(x.shape, axis)


def _check_param(p, name, channels, data_dtype):
    p = np.asarray(p)
    if p.shape != (channels,):
        raise ValueError("%s must have shape (%d,) to match the channel axis, "
                         "got shape %s" % (name, channels, p.shape))
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError("%s dtype must be float16, float32 or float64, got %s"
                        % (name, p.dtype))
    return p


def _check_out(arr, name, shape, dtype=None):
    if arr is None:
        return None
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
        raise ValueError("%s must be a numpy.ndarray of shape %s, got %s"
                         % (name, tuple(shape), getattr(arr, "shape", type(arr))))
    if dtype is not None and arr.dtype != dtype:
        raise TypeError("%s must have dtype %s, got %s" % (name, dtype, arr.dtype))
    return arr


def _check_eps(eps):
    eps = float(eps)
    if not eps >= 0.0 or eps == float("inf"):
        raise ValueError("eps must be a finite number >= 0, got %r" % eps)
    return eps


class _Plan:
    """How one call walks its data: the layout, the 2-D views, the tasks."""

    def __init__(self, shape, axis, acc, block_bytes):
        self.n, self.a, self.c, self.b = canonical_shape(shape, axis)
        self.ndim = len(shape)
        self.axis = axis + self.ndim if axis < 0 else axis
        self.acc = acc
        if self.a == 1 or self.b > 1:
            # Channels first (or transposed to it): instances are rows.
            self.red = 1
            rows = self.n * self.c
            per_block = max(1, int(block_bytes) // max(1, self.b * acc.itemsize))
            self.tasks = [(r, min(r + per_block, rows))
                          for r in range(0, rows, per_block)]
        else:
            # Channels last: instance columns of one (A, C) slab per task.
            self.red = 0
            self.tasks = list(range(self.n))
        self.transpose = self.a > 1 and self.b > 1

    def view(self, arr):
        """The 2-D (rows) or 3-D (slabs) view of ``arr`` the tasks index."""
        if arr is None:
            return None
        if self.red == 1:
            return arr.reshape(self.n * self.c, self.b)
        return arr.reshape(self.n, self.a, self.c)

    def block(self, view, task):
        if view is None:
            return None
        return view[task[0]:task[1]] if self.red == 1 else view[task]

    def per_instance(self, vec):
        """A per-channel vector laid out as the tasks' instances need it
        (tiled over the batch for rows), computed once per call."""
        if self.red == 1:
            return np.broadcast_to(vec, (self.n, self.c)).reshape(-1)
        return np.ascontiguousarray(vec)

    def params(self, vec, task):
        """The slice of :meth:`per_instance` ``task`` needs."""
        if self.red == 1:
            return vec[task[0]:task[1]]
        return vec

    def stat_index(self, task):
        """Where ``task``'s per-instance values go in a flat (N*C,) vector."""
        if self.red == 1:
            return slice(task[0], task[1])
        return slice(task * self.c, (task + 1) * self.c)

    def to_rows(self, arr):
        """A contiguous channels-first copy for layouts with A > 1 and B > 1."""
        moved = np.moveaxis(arr.reshape(self.n, self.a, self.c, self.b), 2, 1)
        return np.ascontiguousarray(moved).reshape(self.n, self.c, self.a * self.b)

    def from_rows(self, rows, dst, req):
        moved = np.moveaxis(rows.reshape(self.n, self.c, self.a, self.b), 1, 2)
        _put(dst.reshape(self.n, self.a, self.c, self.b), moved, req)


def _contiguous(arr):
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def _write_target(out, req):
    """Where the blocks write ``out``: itself when C-contiguous, else a
    contiguous temporary (holding ``out``'s values for ``'add'``) that the
    caller copies back."""
    if out is None or out.flags.c_contiguous:
        return out
    target = np.empty(out.shape, out.dtype)
    if req == "add":
        np.copyto(target, out)
    return target


def instance_norm_forward(x, gamma, beta, eps=1e-3, axis=1, out=None,
                          req="write", num_threads=None, block_bytes=None):
    r"""Instance normalization forward pass.

    .. math:: y = \frac{x - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}
              \gamma_c + \beta_c

    with the mean and the biased variance taken over every axis except the
    batch axis 0 and the channel axis ``axis``.

    Parameters
    ----------
    x : numpy.ndarray
        float16, float32 or float64 data of rank >= 3.
    gamma, beta : array_like, shape (C,)
        Per-channel scale and shift (any float dtype; float32 with float16
        data is the mixed-precision case).
    eps : float
        Added to the variance inside the square root; must be >= 0.
    axis : int
        Channel axis, not 0; negative counts from the end.
    out : numpy.ndarray, optional
        Where to write ``y`` (shape and dtype of ``x``); may be ``x`` itself.
    req : {'write', 'inplace', 'add', 'null'}
        ``'add'`` adds ``y`` to ``out``; ``'null'`` computes statistics only.
    num_threads : int, optional
        Threads to split the work over; default :func:`default_num_threads`.
    block_bytes : int, optional
        Target size of one block of instances, in accumulation-dtype bytes.

    Returns
    -------
    y : numpy.ndarray or None
        ``out`` (or a new array); ``None`` when ``req == 'null'``.
    mean, rstd : numpy.ndarray, shape (N, C)
        Per-instance mean and ``1 / sqrt(var + eps)``, in the accumulation
        dtype; backward takes them back.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(12, dtype=np.float64).reshape(1, 2, 6) ** 2
    >>> y, mean, rstd = instance_norm_forward(x, np.ones(2), np.zeros(2), eps=0)
    >>> bool(np.allclose(y.mean(axis=2), 0) and np.allclose(y.var(axis=2), 1))
    True
    """
    n, a, c, b = _check_data(x, axis)
    eps = _check_eps(eps)
    req = _check_req("req", req)
    acc = accumulation_dtype(x.dtype)
    gamma = _check_param(gamma, "gamma", c, x.dtype).astype(acc, copy=False)
    beta = _check_param(beta, "beta", c, x.dtype).astype(acc, copy=False)
    if req == "null":
        out = None
    elif out is None:
        out = np.zeros(x.shape, x.dtype) if req == "add" else np.empty(x.shape, x.dtype)
    else:
        _check_out(out, "out", x.shape, x.dtype)
    mean = np.empty(n * c, acc)
    rstd = np.empty(n * c, acc)
    if x.size == 0 or n * c == 0:
        # Empty batch or empty instances: nothing to normalize.
        mean.fill(np.nan)
        rstd.fill(np.nan)
        return out, mean.reshape(n, c), rstd.reshape(n, c)

    if x.size <= _SMALL_ELEMS:
        y, small_mean, small_rstd = _small_forward(x.reshape(n, a, c, b), gamma, beta, eps,
                                                   acc, out is not None)
        if not small_rstd.all():
            _rescale_instances(x.reshape(n, a, c, b), y, gamma, beta, eps, acc, "write",
                               small_mean, small_rstd)
        if out is not None:
            _put(out, y.reshape(x.shape), req)
        return out, small_mean.reshape(n, c), small_rstd.reshape(n, c)

    plan = _Plan(x.shape, axis, acc, block_bytes or DEFAULT_BLOCK_BYTES)
    if plan.transpose:
        rows = plan.to_rows(x)
        y_rows = None if out is None else np.empty_like(rows)
        sub_y, sub_mean, sub_rstd = instance_norm_forward(
            rows, gamma, beta, eps, 1, y_rows, "write" if out is not None else "null",
            num_threads, block_bytes)
        if out is not None:
            plan.from_rows(sub_y, out, req)
        return out, sub_mean, sub_rstd

    xv = plan.view(_contiguous(x))
    y_target = _write_target(out, req)
    yv = plan.view(y_target)

    gam, bet = plan.per_instance(gamma), plan.per_instance(beta)

    def work(task):
        idx = plan.stat_index(task)
        mean[idx], rstd[idx] = _forward_block(
            plan.block(xv, task), plan.block(yv, task), plan.red,
            plan.params(gam, task), plan.params(bet, task), eps, acc, req)

    _run_parallel(work, plan.tasks, num_threads, x.nbytes, (y_target,))
    if not rstd.all():
        _rescale_instances(xv.reshape(n, a, c, b), y_target.reshape(n, a, c, b)
                           if y_target is not None else None,
                           gamma, beta, eps, acc, req, mean, rstd)
    if y_target is not out and out is not None:
        np.copyto(out, y_target)
    return out, mean.reshape(n, c), rstd.reshape(n, c)


def instance_norm_stats(x, eps=1e-3, axis=1, num_threads=None, block_bytes=None):
    """Per-instance ``(mean, rstd)``, each of shape (N, C), without ``y``.

    >>> import numpy as np
    >>> mean, rstd = instance_norm_stats(np.array([[[1., 3.]]]), eps=0)
    >>> float(mean[0, 0]), float(rstd[0, 0])
    (2.0, 1.0)
    """
    _, _, c, _ = _check_data(x, axis)
    ones = np.ones(c, accumulation_dtype(x.dtype))
    _, mean, rstd = instance_norm_forward(x, ones, ones, eps, axis, None, "null",
                                          num_threads, block_bytes)
    return mean, rstd


def instance_norm_backward(dy, x, gamma, mean=None, rstd=None, eps=1e-3, axis=1,
                           dx=None, dgamma=None, dbeta=None,
                           req=("write", "write", "write"),
                           num_threads=None, block_bytes=None):
    r"""Instance normalization backward pass (see the module docstring).

    Parameters
    ----------
    dy, x : numpy.ndarray
        Gradient of the loss w.r.t. ``y``, and the forward input; same shape
        and dtype.
    gamma : array_like, shape (C,)
    mean, rstd : numpy.ndarray, shape (N, C), optional
        The statistics :func:`instance_norm_forward` returned. Recomputed
        from ``x`` (with ``eps``) when not given.
    eps, axis :
        As in the forward pass.
    dx, dgamma, dbeta : numpy.ndarray, optional
        Where to write the gradients; allocated when not given. ``dgamma``
        and ``dbeta`` default to gamma's dtype.
    req : 3-tuple of {'write', 'inplace', 'add', 'null'}
        For ``dx``, ``dgamma`` and ``dbeta``; ``'add'`` accumulates into the
        given array, ``'null'`` skips that gradient (returned as ``None``).

    Returns
    -------
    dx, dgamma, dbeta : numpy.ndarray or None

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[[1., 2., 4.]]])
    >>> dx, dgamma, dbeta = instance_norm_backward(
    ...     np.ones_like(x), x, np.ones(1), eps=0)
    >>> np.abs(dx).max() < 1e-12, float(dbeta[0])
    (True, 3.0)
    """
    n, a, c, b = _check_data(x, axis, "x")
    _check_data(dy, axis, "dy")
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError("dy must match x in shape and dtype, got %s %s vs %s %s"
                         % (dy.shape, dy.dtype, x.shape, x.dtype))
    eps = _check_eps(eps)
    if len(req) != 3:
        raise ValueError("req must give 3 entries (dx, dgamma, dbeta), got %r" % (req,))
    dx_req, dg_req, db_req = (_check_req(name, r) for name, r in
                              zip(("dx req", "dgamma req", "dbeta req"), req))
    acc = accumulation_dtype(x.dtype)
    gamma = _check_param(gamma, "gamma", c, x.dtype)
    gam = gamma.astype(acc, copy=False)
    if mean is None or rstd is None:
        mean, rstd = instance_norm_stats(x, eps, axis, num_threads, block_bytes)
    mean = np.asarray(mean, acc).reshape(n * c)
    rstd = np.asarray(rstd, acc).reshape(n * c)

    def prepare(arr, name, shape, dtype, r):
        if r == "null":
            return None
        if arr is None:
            return np.zeros(shape, dtype) if r == "add" else np.empty(shape, dtype)
        return _check_out(arr, name, shape)

    dx = prepare(dx, "dx", x.shape, x.dtype, dx_req)
    dgamma = prepare(dgamma, "dgamma", (c,), gamma.dtype, dg_req)
    dbeta = prepare(dbeta, "dbeta", (c,), gamma.dtype, db_req)

    sum_g = np.zeros(n * c, acc)
    sum_gxhat = np.zeros(n * c, acc)
    if x.size and n * c and x.size <= _SMALL_ELEMS:
        small_dx, sum_g[:], sum_gxhat[:] = _small_backward(
            x.reshape(n, a, c, b), dy.reshape(n, a, c, b), gam, mean, rstd, acc,
            dx is not None)
        if dx is not None:
            _put(dx, small_dx.reshape(x.shape), dx_req)
    elif x.size and n * c:
        plan = _Plan(x.shape, axis, acc, block_bytes or DEFAULT_BLOCK_BYTES)
        if plan.transpose:
            rows_x, rows_dy = plan.to_rows(x), plan.to_rows(dy)
            rows_dx = None if dx is None else np.empty_like(rows_x)
            _, sub_dg, sub_db = instance_norm_backward(
                rows_dy, rows_x, gam, mean, rstd, eps, 1, rows_dx,
                req=("write" if dx is not None else "null", "write", "write"),
                num_threads=num_threads, block_bytes=block_bytes)
            if dx is not None:
                plan.from_rows(rows_dx, dx, dx_req)
            # Parameter sums come back per channel already.
            if dgamma is not None:
                _put(dgamma, sub_dg, dg_req)
            if dbeta is not None:
                _put(dbeta, sub_db, db_req)
            return dx, dgamma, dbeta

        xv, gv = plan.view(_contiguous(x)), plan.view(_contiguous(dy))
        dx_target = _write_target(dx, dx_req)
        dxv = plan.view(dx_target)

        gam_i = plan.per_instance(gam)

        def work(task):
            idx = plan.stat_index(task)
            sum_g[idx], sum_gxhat[idx] = _backward_block(
                plan.block(xv, task), plan.block(gv, task), plan.block(dxv, task),
                plan.red, plan.params(gam_i, task), mean[idx], rstd[idx], acc,
                dx_req)

        _run_parallel(work, plan.tasks, num_threads, x.nbytes, (dx_target,))
        if dx_target is not dx and dx is not None:
            np.copyto(dx, dx_target)
    elif dx is not None and dx_req == "write":
        dx.fill(0)

    # Per-channel sums over the batch, in batch order: deterministic.
    if dgamma is not None:
        _put(dgamma, sum_gxhat.reshape(n, c).sum(axis=0), dg_req)
    if dbeta is not None:
        _put(dbeta, sum_g.reshape(n, c).sum(axis=0), db_req)
    return dx, dgamma, dbeta
