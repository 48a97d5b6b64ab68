r"""Optional Numba loops for the float32/float64 blocks of the kernel.

Imported only when Numba is installed (the ``numba`` extra) and
``MX_INSTNORM_KERNEL`` is not ``numpy``; :mod:`.instance_norm` falls back to
its NumPy block maths otherwise. Same maths and symbol names as the module
docstring of :mod:`.instance_norm`, fused so that a block is read from
memory once and written once:

* forward, per instance: ``K = x_0``; pass 1 sums ``d = x - K``; pass 2 sums
  ``(d - mu')^2`` (the shifted two-pass variance); pass 3 writes
  ``y = d * s + (beta - mu' s)`` with ``s = gamma r``;
* backward, per instance: pass 1 sums ``g`` and ``g d`` with ``d = x - mean``;
  pass 2 writes ``dx = k ((g - c_1) - (r c_2) d)`` (not ``k g - (k r c_2) d``:
  ``k r`` underflows for data near 1e30 in float32).

Passes 2 and 3 read data the first pass left in cache. Every sum runs in a
fixed order (8 lanes for rows, 128-row chunks for channels-last slabs, the
partial sums then added in a fixed order) that depends on neither the block
size nor the thread count, so results stay bitwise reproducible. No
``fastmath``: the compiler may not reorder additions. Every loop releases
the GIL (``nogil``), so the kernel's own thread pool runs blocks in parallel.
"""
import numpy as np
import numba

__all__ = ["forward_rows", "backward_rows", "forward_slab", "backward_slab"]

_CHUNK = 128
_JIT = dict(nogil=True, cache=True, error_model="numpy")


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _radd(total, value):
    """``total + value``, flagged reassociable: a loop that accumulates
    through it is vectorized into SIMD partial sums. The flag is on this
    addition only; the callers' subtractions stay exact as written."""
    return total + value


@numba.njit(**_JIT)
def _sum_shift(row, shift, mu):
    """``sum(v)`` and ``sum(v * v)`` for ``v = (row - shift) - mu``."""
    s1 = row[0] - row[0]
    s2 = s1
    for j in range(row.shape[0]):
        v = (row[j] - shift) - mu
        s1 = _radd(s1, v)
        s2 = _radd(s2, v * v)
    return s1, s2


@numba.njit(**_JIT)
def forward_rows(x, y, gam, bet, eps, mean, rstd, write_y, add):
    """Rows ``x[i]`` (instances) of a 2-D block; ``gam``/``bet`` per row."""
    rows, m = x.shape
    tmp = np.zeros(2, x.dtype)
    zero = tmp[0]
    for i in range(rows):
        row = x[i]
        shift = row[0]
        s1, _ = _sum_shift(row, shift, zero)
        tmp[0] = s1 / m
        mu = tmp[0]
        _, s2 = _sum_shift(row, shift, mu)
        tmp[1] = 1.0 / np.sqrt(s2 / m + eps)
        r = tmp[1]
        mean[i] = shift + mu
        if not r > 0:
            # The sum of squares overflowed (or inf/NaN data): marked with
            # rstd 0 and y left alone; the driver recomputes it scaled.
            rstd[i] = 0
            continue
        rstd[i] = r
        if write_y:
            s = gam[i] * r
            bias = bet[i] - mu * s
            out = y[i]
            if add:
                for j in range(m):
                    out[j] += (row[j] - shift) * s + bias
            else:
                for j in range(m):
                    out[j] = (row[j] - shift) * s + bias


@numba.njit(**_JIT)
def _sum_g(g, row, mu):
    """``sum(g)`` and ``sum(g * (row - mu))``."""
    s1 = g[0] - g[0]
    s2 = s1
    for j in range(row.shape[0]):
        gv = g[j]
        s1 = _radd(s1, gv)
        s2 = _radd(s2, gv * (row[j] - mu))
    return s1, s2


@numba.njit(**_JIT)
def backward_rows(x, g, dx, gam, mean, rstd, sum_g, sum_gxhat, write_dx, add):
    """Per-row ``sum g``, ``sum g x_hat`` and (if ``write_dx``) dx."""
    rows, m = x.shape
    tmp = np.zeros(2, x.dtype)
    for i in range(rows):
        row = x[i]
        grow = g[i]
        mu = mean[i]
        r = rstd[i]
        sg, sgd = _sum_g(grow, row, mu)
        sum_g[i] = sg
        sum_gxhat[i] = sgd * r
        if write_dx:
            k = gam[i] * r
            tmp[0] = sgd * r / m
            tmp[1] = sg / m
            # k (g - c1 - (r c2) d): k * r * c2 would underflow to 0 for
            # data near 1e30 in float32 (r^2 ~ 1e-60).
            a = r * tmp[0]
            b = tmp[1]
            out = dx[i]
            if add:
                for j in range(m):
                    out[j] += k * ((grow[j] - b) - a * (row[j] - mu))
            else:
                for j in range(m):
                    out[j] = k * ((grow[j] - b) - a * (row[j] - mu))


@numba.njit(**_JIT)
def forward_slab(x, y, gam, bet, eps, mean, rstd, write_y, add):
    """Columns of one ``(A, C)`` channels-last slab are the instances."""
    a_len, c = x.shape
    shift = x[0].copy()
    tot = np.zeros(c, x.dtype)
    tot2 = np.zeros(c, x.dtype)
    acc = np.zeros(c, x.dtype)
    for start in range(0, a_len, _CHUNK):
        acc[:] = 0
        for a in range(start, min(start + _CHUNK, a_len)):
            xr = x[a]
            for j in range(c):
                acc[j] += xr[j] - shift[j]
        for j in range(c):
            tot[j] += acc[j]
    mu = np.empty(c, x.dtype)
    for j in range(c):
        mu[j] = tot[j] / a_len
    for start in range(0, a_len, _CHUNK):
        acc[:] = 0
        for a in range(start, min(start + _CHUNK, a_len)):
            xr = x[a]
            for j in range(c):
                v = (xr[j] - shift[j]) - mu[j]
                acc[j] += v * v
        for j in range(c):
            tot2[j] += acc[j]
    r = np.empty(c, x.dtype)
    for j in range(c):
        r[j] = 1.0 / np.sqrt(tot2[j] / a_len + eps)
    for j in range(c):
        mean[j] = shift[j] + mu[j]
        if not r[j] > 0:
            # As in forward_rows: marked, y = 0 (or + 0) until the driver's
            # scaled recompute.
            r[j] = 0
        rstd[j] = r[j]
    if write_y:
        s = gam * r
        bias = bet - mu * s
        for j in range(c):
            if r[j] == 0:
                bias[j] = 0
        for a in range(a_len):
            xr = x[a]
            out = y[a]
            if add:
                for j in range(c):
                    out[j] += (xr[j] - shift[j]) * s[j] + bias[j]
            else:
                for j in range(c):
                    out[j] = (xr[j] - shift[j]) * s[j] + bias[j]


@numba.njit(**_JIT)
def backward_slab(x, g, dx, gam, mean, rstd, sum_g, sum_gxhat, write_dx, add):
    a_len, c = x.shape
    tot = np.zeros(c, x.dtype)
    tot2 = np.zeros(c, x.dtype)
    acc = np.zeros(c, x.dtype)
    acc2 = np.zeros(c, x.dtype)
    for start in range(0, a_len, _CHUNK):
        acc[:] = 0
        acc2[:] = 0
        for a in range(start, min(start + _CHUNK, a_len)):
            xr = x[a]
            gr = g[a]
            for j in range(c):
                gv = gr[j]
                acc[j] += gv
                acc2[j] += gv * (xr[j] - mean[j])
        for j in range(c):
            tot[j] += acc[j]
            tot2[j] += acc2[j]
    for j in range(c):
        sum_g[j] = tot[j]
        sum_gxhat[j] = tot2[j] * rstd[j]
    if write_dx:
        k = gam * rstd
        c2 = np.empty(c, x.dtype)
        c1 = np.empty(c, x.dtype)
        for j in range(c):
            c2[j] = tot2[j] * rstd[j] / a_len
            c1[j] = tot[j] / a_len
        # As in backward_rows: k (g - c1 - (r c2) d), no k r c2 underflow.
        coef_d = rstd * c2
        for a in range(a_len):
            xr = x[a]
            gr = g[a]
            out = dx[a]
            if add:
                for j in range(c):
                    out[j] += k[j] * ((gr[j] - c1[j]) - coef_d[j] * (xr[j] - mean[j]))
            else:
                for j in range(c):
                    out[j] = k[j] * ((gr[j] - c1[j]) - coef_d[j] * (xr[j] - mean[j]))
