"""Benchmark: mx_instnorm against MXNet's built-in InstanceNorm, PyTorch,
ONNX Runtime and a memcpy of the same tensor.

Run ``python -m mx_instnorm.bench`` (see docs/benchmarks.md). Every case is
timed in one process with the providers interleaved (one call of each in
turn, the order rotated every round), after warm-up; the table shows
medians. Instance norm is memory-bound, so throughput is reported in GB/s:

* forward moves ``2 * nbytes`` (read x, write y);
* forward+backward moves ``5 * nbytes`` (the forward's, plus read x and dy
  and write dx);
* the memcpy floor of a mode is ``np.copyto`` of the tensor scaled to the
  mode's bytes (one copy moves ``2 * nbytes``).

While it runs, our output (and ``dx``) is checked against the built-in's;
the run aborts with exit status 2 if they differ by more than 1e-4
relative. Providers that do not import (torch, onnxruntime + onnx) are
skipped. The tiny case reports per-call latency in microseconds (each
sample a run of 20 calls of one provider), with an empty CustomOp (same
arguments, does nothing) as the floor of any Python CustomOp. Two forward rows give context and are not compared with the
targets: ``kernel-only`` (our kernel on preallocated NumPy arrays) and
``mx-copy`` (MXNet's ``x.copy()``, the cheapest operator with a fresh
output, which every MXNet op pays for its output allocation).

Flags
-----
--cases NAMES   comma-separated subset of the case names (see --list).
--list          print the case names and exit.
--repeat N      timed rounds per case and mode (default 15; 5 with --quick).
--warmup N      untimed rounds first (default 2).
--threads T     threads for our kernel (MX_INSTNORM_NUM_THREADS), PyTorch
                (torch.set_num_threads) and ONNX Runtime (intra-op); default 2.
--quick         smaller cases and fewer rounds: a CI smoke test (< 60 s).
--plot FILE     save GB/s against tensor size per provider (forward) to
                FILE; needs matplotlib (``pip install mx_instnorm[bench]``).
--memory        also measure the peak RSS of one forward+backward, ours vs
                the built-in, each in a fresh subprocess (peak RSS minus
                the baseline after imports, tensor creation and one
                warm-up step; on Linux VmHWM, reset to the current RSS
                first, since ru_maxrss keeps the parent's and the imports'
                transient peaks), for nd and hybridized Gluon calls with
                leaf, 'add' leaf, interior and no-gradient inputs
                (MEMORY_MODES).
--memory-case NAME   the case --memory uses (default: the first non-tiny).
--network       instead of single layers, a whole network: a CycleGAN-style
                ResNet generator (reflection padding, 7x7 and 3x3 convs,
                9 residual blocks, transposed convs; 23 InstanceNorm layers)
                with random weights, built-in InstanceNorm against the same
                network swapped to ours, both hybridized with
                ``static_alloc``: inference and one SGD training step,
                interleaved (with --quick: 2 blocks, 64x64 images).

``ours`` is the backend ``mx_instnorm.backend()`` picks (the compiled
operator where it is built); when that is the compiled one, ``ours-python``
times the Python CustomOp beside it.
"""
import argparse
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

__all__ = ["main", "CASES", "QUICK_CASES", "HALF_PROVIDERS"]

EPS = 1e-3
RTOL = 1e-4

# name: (shape, channel axis)
CASES = {
    "1x64x256x256": ((1, 64, 256, 256), 1),
    "16x128x64x64": ((16, 128, 64, 64), 1),
    "32x256x16x16": ((32, 256, 16, 16), 1),
    "8x64x32x32x32": ((8, 64, 32, 32, 32), 1),
    "nhwc-16x64x64x128": ((16, 64, 64, 128), -1),
    "tiny-2x1x2": ((2, 1, 2), 1),
}
QUICK_CASES = {
    "2x16x64x64": ((2, 16, 64, 64), 1),
    "8x64x16x16": ((8, 64, 16, 16), 1),
    "2x8x16x16x16": ((2, 8, 16, 16, 16), 1),
    "nhwc-2x32x32x32": ((2, 32, 32, 32), -1),
    "tiny-2x1x2": ((2, 1, 2), 1),
}


def _is_tiny(name):
    return name.startswith("tiny")


# ------------------------------------------------------------- providers --

def _mx():
    import mxnet as mx
    return mx


_EMPTY_OP = "mx_instnorm.bench.Empty"
_empty_registered = False


def _register_empty():
    """An empty CustomOp with InstanceNorm's arguments: the floor of any
    Python CustomOp's per-call cost."""
    global _empty_registered
    if _empty_registered:
        return
    mx = _mx()

    class EmptyOp(mx.operator.CustomOp):
        def forward(self, is_train, req, in_data, out_data, aux):
            pass

        def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
            pass

    @mx.operator.register(_EMPTY_OP)
    class EmptyProp(mx.operator.CustomOpProp):  # noqa: F841 - registered
        def __init__(self):
            super().__init__(need_top_grad=True)

        def list_arguments(self):
            return ["data", "gamma", "beta"]

        def list_outputs(self):
            return ["output"]

        def infer_shape(self, in_shape):
            return in_shape, [in_shape[0]], []

        def create_operator(self, ctx, shapes, dtypes):
            return EmptyOp()

    _empty_registered = True


class _Inputs:
    """One case's tensors, shared by every provider."""

    def __init__(self, shape, axis, seed=0):
        mx = _mx()
        rng = np.random.RandomState(seed)
        self.shape, self.axis = shape, axis
        self.channels = shape[axis]
        self.x_np = (rng.randn(*shape) * 2 + 1).astype(np.float32)
        self.dy_np = rng.randn(*shape).astype(np.float32)
        self.g_np = (rng.rand(self.channels) + 0.5).astype(np.float32)
        self.b_np = rng.randn(self.channels).astype(np.float32)
        self.x = mx.nd.array(self.x_np)
        self.dy = mx.nd.array(self.dy_np)
        self.g = mx.nd.array(self.g_np)
        self.b = mx.nd.array(self.b_np)
        self.nbytes = self.x_np.nbytes


def _nd_callables(inp, fn_fwd):
    """(forward, forward+backward) closures for an nd-level function."""
    mx = _mx()
    x = inp.x.copy()
    g, b = inp.g.copy(), inp.b.copy()
    for arr in (x, g, b):
        arr.attach_grad()
    dy = inp.dy

    def fwd():
        y = fn_fwd(inp.x, inp.g, inp.b)
        y.wait_to_read()
        return y

    def fwdbwd():
        with mx.autograd.record():
            y = fn_fwd(x, g, b)
        y.backward(dy)
        x.grad.wait_to_read()
        g.grad.wait_to_read()
        return x.grad

    return fwd, fwdbwd


def _builtin_nd(inp):
    mx = _mx()
    if inp.axis in (1, 1 - len(inp.shape)):
        return _nd_callables(inp, lambda x, g, b: mx.nd.InstanceNorm(x, g, b, eps=EPS))
    # What mxnet.gluon.nn.InstanceNorm(axis=-1) does: swap to channels first.
    axis = inp.axis

    def f(x, g, b):
        return mx.nd.InstanceNorm(x.swapaxes(1, axis), g, b, eps=EPS).swapaxes(1, axis)
    return _nd_callables(inp, f)


def _ours_nd(inp):
    from mx_instnorm.nd import InstanceNorm
    return _nd_callables(inp, lambda x, g, b: InstanceNorm(x, g, b, eps=EPS, axis=inp.axis))


# float16 and bfloat16 data (float32 gamma/beta), our operator only: the
# built-in computes float32 only. Their rows move half the bytes.
HALF_PROVIDERS = ("ours-float16", "ours-bfloat16")


def _half_nd(inp):
    """{provider: (forward, forward+backward)} on the case's data rounded to
    float16 and to bfloat16."""
    import types
    mx = _mx()
    from mx_instnorm.nd import InstanceNorm
    out = {}
    for prov, cast in (("ours-float16", lambda a: a.astype("float16")),
                       ("ours-bfloat16", lambda a: mx.nd.amp_cast(
                           a, dtype=np.dtype([("bfloat16", np.uint16)])))):
        half = types.SimpleNamespace(x=cast(inp.x), dy=cast(inp.dy), g=inp.g, b=inp.b)
        out[prov] = _nd_callables(
            half, lambda x, g, b: InstanceNorm(x, g, b, eps=EPS, axis=inp.axis))
    return out


def _empty_nd(inp):
    mx = _mx()
    _register_empty()
    return _nd_callables(inp, lambda x, g, b: mx.nd.Custom(x, g, b, op_type=_EMPTY_OP))


def _gluon_fwdbwd(inp, block):
    mx = _mx()
    block.initialize(ctx=mx.cpu())
    block.hybridize()
    x = inp.x.copy()
    x.attach_grad()
    with mx.autograd.record():
        block(x)  # deferred init and graph build, outside the timings

    def run():
        with mx.autograd.record():
            y = block(x)
        y.backward(inp.dy)
        x.grad.wait_to_read()
        return x.grad
    return run


def _gluon_pair(inp, ours_only=False):
    from mxnet.gluon import nn
    from mx_instnorm.gluon import InstanceNorm
    kw = dict(axis=inp.axis, epsilon=EPS, scale=True, center=True)
    ours = _gluon_fwdbwd(inp, InstanceNorm(**kw))
    if ours_only:
        return ours
    return ours, _gluon_fwdbwd(inp, nn.InstanceNorm(**kw))


def _backend():
    import mx_instnorm
    return mx_instnorm.backend()


def _torch(inp, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    fn = torch.nn.functional.instance_norm
    xt = torch.from_numpy(inp.x_np.copy())
    if inp.axis not in (1, 1 - len(inp.shape)):
        xt = xt.movedim(inp.axis, 1)  # a view: NHWC memory, channels_last
    gt, bt = torch.from_numpy(inp.g_np), torch.from_numpy(inp.b_np)
    dyt = torch.from_numpy(inp.dy_np.copy())
    if inp.axis not in (1, 1 - len(inp.shape)):
        dyt = dyt.movedim(inp.axis, 1)
    xg = xt.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    gg = gt.clone().requires_grad_(True)
    bg = bt.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return fn(xt, weight=gt, bias=bt, eps=EPS)

    def fwdbwd():
        xg.grad = gg.grad = bg.grad = None
        fn(xg, weight=gg, bias=bg, eps=EPS).backward(dyt)
        return xg.grad
    return fwd, fwdbwd


def _onnxruntime(inp, threads):
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    ndim = len(inp.shape)
    axis = inp.axis % ndim
    nodes, src = [], "x"
    if axis != 1:
        perm = [0, axis] + [i for i in range(1, ndim) if i != axis]
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=perm))
        src = "xt"
    out = "y" if axis == 1 else "yt"
    nodes.append(helper.make_node("InstanceNormalization", [src, "scale", "bias"],
                                  [out], epsilon=EPS))
    if axis != 1:
        inv = list(np.argsort(perm))
        nodes.append(helper.make_node("Transpose", ["yt"], ["y"], perm=inv))
    graph = helper.make_graph(
        nodes, "instancenorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(inp.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(inp.shape))],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [inp.channels],
                                        inp.g_np.tolist()),
                     helper.make_tensor("bias", TensorProto.FLOAT, [inp.channels],
                                        inp.b_np.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feed = {"x": inp.x_np}
    return lambda: sess.run(None, feed)[0]


def _memcpy(inp):
    src = inp.x_np
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def _mx_copy(inp):
    """The cheapest MXNet operator with a fresh output: ``x.copy()``. Every
    MXNet op, ours and the built-in included, pays this output allocation
    (MXNet 1.9.1 allocates CPU arrays with plain malloc, so a large output
    is fresh memory, page-faulted on its first write)."""
    return lambda: inp.x.copy().wait_to_read()


def _kernel_only(inp, threads):
    """Our kernel on preallocated NumPy arrays: the op's compute without
    MXNet's op dispatch and output allocation."""
    from mx_instnorm.kernel import instance_norm_forward
    out = np.empty_like(inp.x_np)
    return lambda: instance_norm_forward(inp.x_np, inp.g_np, inp.b_np, EPS, inp.axis,
                                         out=out, num_threads=threads)


# ---------------------------------------------------------------- timing --

# Calls per sample in the tiny case: a ~100 us call timed alone measures
# the cold caches the previous provider (another library, a Python
# CustomOp) left behind as much as the call; a run of calls measures the
# latency a loop of small calls sees.
TINY_CALLS_PER_SAMPLE = 20


def _time_interleaved(fns, repeat, warmup, calls=1):
    """Median seconds per call for each of ``fns`` (a dict), interleaved:
    each round takes one sample of each, in an order rotated every round;
    a sample is ``calls`` calls in a row."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples = {name: [] for name in names}
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls)
    return {name: float(np.median(s)) for name, s in samples.items()}


def _with_backend(name, fn):
    """``fn`` run with MX_INSTNORM_BACKEND set to ``name`` for the call."""
    def run():
        old = os.environ.get("MX_INSTNORM_BACKEND")
        os.environ["MX_INSTNORM_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["MX_INSTNORM_BACKEND"]
            else:
                os.environ["MX_INSTNORM_BACKEND"] = old
    return run


class _Mismatch(Exception):
    pass


def _check(name, what, ours, ref):
    ours = ours.asnumpy() if hasattr(ours, "asnumpy") else np.asarray(ours)
    ref = ref.asnumpy() if hasattr(ref, "asnumpy") else np.asarray(ref)
    err = np.abs(ours - ref) / (1.0 + np.abs(ref))
    worst = float(err.max()) if err.size else 0.0
    if not worst <= RTOL:
        raise _Mismatch("%s %s: ours differs from the built-in by %.3g relative "
                        "(limit %g)" % (name, what, worst, RTOL))


def _bench_case(name, shape, axis, args):
    """Rows ``(case, mode, provider, seconds, bytes)`` for one case."""
    inp = _Inputs(shape, axis)
    rows = []
    ours_f, ours_fb = _ours_nd(inp)
    bi_f, bi_fb = _builtin_nd(inp)
    _check(name, "forward y", ours_f(), bi_f())
    _check(name, "backward dx", ours_fb(), bi_fb())

    fwd = {"ours": ours_f, "builtin": bi_f}
    fb = {"ours": ours_fb, "builtin": bi_fb}
    compiled = _backend() == "compiled"
    if compiled:
        # The Python CustomOp beside the compiled operator.
        fwd["ours-python"] = _with_backend("python", ours_f)
        fb["ours-python"] = _with_backend("python", ours_fb)
        _check(name, "python forward y", fwd["ours-python"](), bi_f())
        _check(name, "python backward dx", fb["ours-python"](), bi_fb())
    if _is_tiny(name):
        emp_f, emp_fb = _empty_nd(inp)
        fwd["empty-customop"] = emp_f
        fb["empty-customop"] = emp_fb
    torch_fns = None if _is_tiny(name) and not args.tiny_all else _torch(inp, args.threads)
    if torch_fns is not None:
        fwd["torch"], fb["torch"] = torch_fns
    ort_fn = _onnxruntime(inp, args.threads)
    if ort_fn is not None:
        _check(name, "onnxruntime y", ort_fn(), bi_f())
        fwd["onnxruntime"] = ort_fn
    if not _is_tiny(name):
        for prov, (f, fb_fn) in _half_nd(inp).items():
            fwd[prov], fb[prov] = f, fb_fn
        fwd["kernel-only"] = _kernel_only(inp, args.threads)
        fwd["mx-copy"] = _mx_copy(inp)
    fwd["memcpy"] = _memcpy(inp)

    nb = inp.nbytes
    calls = TINY_CALLS_PER_SAMPLE if _is_tiny(name) else 1
    fwd_times = _time_interleaved(fwd, args.repeat, args.warmup, calls)
    # The memcpy floor of the modes that move 5 x nbytes: the copy scaled.
    floor_5x = fwd_times["memcpy"] * 5 / 2
    fb_times = _time_interleaved(fb, args.repeat, args.warmup, calls)
    fb_times["memcpy"] = floor_5x
    ours_g, bi_g = _gluon_pair(inp)
    gluon = {"ours": ours_g, "builtin": bi_g}
    if compiled:
        build = _with_backend("python", lambda: _gluon_pair(inp, ours_only=True))
        gluon["ours-python"] = _with_backend("python", build())
    gluon_times = _time_interleaved(gluon, args.repeat, args.warmup, calls)
    gluon_times["memcpy"] = floor_5x
    for mode, times, nbytes in (("fwd", fwd_times, 2 * nb), ("fwd+bwd", fb_times, 5 * nb),
                                ("gluon fwd+bwd", gluon_times, 5 * nb)):
        for prov, sec in times.items():
            rows.append((name, mode, prov, sec, nbytes // 2 if prov in HALF_PROVIDERS
                         else nbytes))
    return rows


# ---------------------------------------------------------------- report --

def _fmt_ratio(num, den):
    return "%.2fx" % (den / num) if num and den else "-"


def _table(rows):
    """The table's lines. Ratios are speed-ups of this row's provider:
    ``vs builtin`` = built-in time / this time (> 1: faster than it)."""
    ref = {}
    for case, mode, prov, sec, _ in rows:
        ref[(case, mode, prov)] = sec
    head = "%-19s %-14s %-15s %10s %8s %10s %9s %10s" % (
        "case", "mode", "provider", "time", "GB/s", "vs builtin", "vs torch", "vs memcpy")
    lines = [head, "-" * len(head)]
    for case, mode, prov, sec, nbytes in rows:
        tiny = _is_tiny(case)
        t = ("%8.1f us" % (sec * 1e6)) if tiny else ("%8.3f ms" % (sec * 1e3))
        gbs = "-" if tiny else "%.2f" % (nbytes / sec / 1e9)
        bi = ref.get((case, mode, "builtin"))
        to = ref.get((case, mode, "torch"))
        mc = ref.get((case, mode, "memcpy"))
        lines.append("%-19s %-14s %-15s %10s %8s %10s %9s %10s" % (
            case, mode, prov, t, gbs,
            _fmt_ratio(sec, bi) if prov != "builtin" else "",
            _fmt_ratio(sec, to) if to and prov != "torch" else "",
            _fmt_ratio(sec, mc) if mc and prov != "memcpy" else ""))
    return lines


def _geomean(values):
    values = [v for v in values if v and v > 0]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _summary(rows):
    t = {(c, m, p): s for c, m, p, s, _ in rows}
    cases = sorted({c for c, *_ in rows if not _is_tiny(c)})
    lines = []
    for ours in ("ours", "ours-python"):
        parts = []
        for mode in ("fwd", "fwd+bwd", "gluon fwd+bwd"):
            for other in ("builtin", "torch", "memcpy"):
                ratios = [t[(c, mode, other)] / t[(c, mode, ours)] for c in cases
                          if (c, mode, other) in t and (c, mode, ours) in t]
                if ratios:
                    g = _geomean(ratios)
                    if other == "memcpy":
                        parts.append("%s %.2fx memcpy time" % (mode, 1 / g))
                    else:
                        parts.append("%s %.1fx faster than %s" % (mode, g, other))
        if parts:
            lines.append("geomean over %d non-tiny cases (%s): %s"
                         % (len(cases), ours, "; ".join(parts)))
    for prov in HALF_PROVIDERS:
        parts = []
        for mode in ("fwd", "fwd+bwd"):
            ratios = [t[(c, mode, "ours")] / t[(c, mode, prov)] for c in cases
                      if (c, mode, prov) in t and (c, mode, "ours") in t]
            if ratios:
                parts.append("%s %.2fx" % (mode, _geomean(ratios)))
        if parts:
            lines.append("geomean per-element rate of %s against float32 ours (target "
                         ">= 1): %s" % (prov, "; ".join(parts)))
    ctx = []
    for prov, ref, label in (("kernel-only", "memcpy", "Python backend's NumPy kernel alone "
                              "(NumPy arrays, no MXNet op): %.2fx memcpy time"),
                             ("ours", "mx-copy", "ours: %.2fx the time of MXNet's "
                              "x.copy() (the cheapest op with a fresh output)")):
        ratios = [t[(c, "fwd", prov)] / t[(c, "fwd", ref)] for c in cases
                  if (c, "fwd", prov) in t and (c, "fwd", ref) in t]
        if ratios:
            ctx.append(label % _geomean(ratios))
    if ctx:
        lines.append("fwd, for context: " + "; ".join(ctx))
    # The training path: against two memcpys of the tensor (each reads and
    # writes it once: 4 x nbytes, where forward+backward moves at least 5),
    # and hybridized Gluon against nd on the same leaf input.
    two = [t[(c, "fwd+bwd", "ours")] / (2 * t[(c, "fwd", "memcpy")]) for c in cases
           if (c, "fwd+bwd", "ours") in t and (c, "fwd", "memcpy") in t]
    gl = [t[(c, "gluon fwd+bwd", "ours")] / t[(c, "fwd+bwd", "ours")] for c in cases
          if (c, "gluon fwd+bwd", "ours") in t and (c, "fwd+bwd", "ours") in t]
    if two and gl:
        lines.append("training path (ours, geomean): fwd+bwd %.2fx the time of two memcpys "
                     "(target <= 2.5); gluon fwd+bwd %.2fx nd fwd+bwd, leaf input (target "
                     "<= 1.25)" % (_geomean(two), _geomean(gl)))
    for c in sorted({c for c, *_ in rows if _is_tiny(c)}):
        for mode in ("fwd", "fwd+bwd", "gluon fwd+bwd"):
            o, p, b, e = (t.get((c, mode, prov)) for prov in
                          ("ours", "ours-python", "builtin", "empty-customop"))
            if o and b:
                line = ("%s %s latency: ours %.1f us, builtin %.1f us (ours/builtin %.2f; "
                        "target <= 1.20)" % (c, mode, o * 1e6, b * 1e6, o / b))
                if p:
                    line += "; ours-python %.1f us" % (p * 1e6)
                if e:
                    line += "; empty CustomOp %.1f us" % (e * 1e6)
                lines.append(line)
    return lines


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'mx_instnorm[bench]' "
                         "(or pip install matplotlib)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    provs = sorted({p for c, m, p, *_ in rows if m == "fwd" and not _is_tiny(c)})
    for i, prov in enumerate(provs):
        color = "C%d" % (i % 10)
        # Channels-first cases as a line over size; channels-last ones
        # (which can share a size with another case) as hollow squares.
        for nhwc, style in ((False, "o-"), (True, "s")):
            pts = sorted((nb / 2, nb / s / 1e9) for c, m, p, s, nb in rows
                         if m == "fwd" and p == prov and not _is_tiny(c)
                         and c.startswith("nhwc") == nhwc)
            if pts:
                ax.plot([p[0] / 2 ** 20 for p in pts], [p[1] for p in pts], style,
                        color=color, mfc="none" if nhwc else color,
                        label=None if nhwc else prov)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tensor size (MiB)")
    ax.set_ylabel("forward throughput (GB/s, read x + write y)")
    ax.set_title("InstanceNorm forward, float32 (hollow squares: channels last)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print("plot written to %s" % path)


# ---------------------------------------------------------------- memory --

def _reset_peak_rss():
    """Linux: restart the peak-RSS count at the current RSS, so that the
    imports' own transient peak does not hide the op's (clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_kib():
    """This process's peak RSS in KiB. On Linux the mm's own high-water mark
    (VmHWM): ``ru_maxrss`` is at least the parent's peak, which exec
    carries into the child, and would hide the op's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# What --memory measures: (name, how the input is made, nd or hybridized
# Gluon). "leaf": x, gamma and beta marked with attach_grad() (grad_req
# 'write'); "add leaf": marked grad_req='add'; "interior": x computed from a
# leaf inside the recording (what a layer inside a network gets), the same
# extra op for every provider; "no-grad input": x has no gradient buffer
# and no history (images fed to a network), only gamma/beta get gradients.
MEMORY_MODES = (("nd leaf", "leaf", "nd"), ("nd add leaf", "add", "nd"),
                ("nd interior", "interior", "nd"), ("nd no-grad input", "nograd", "nd"),
                ("gluon leaf", "leaf", "gluon"),
                ("gluon no-grad input", "nograd", "gluon"))


def _memory_child(provider, case, cases, mode):
    """In a fresh process: peak RSS growth of one forward+backward.

    The tensors are made by MXNet directly (no float64 NumPy temporaries,
    which would raise the baseline peak above what the op itself needs).
    """
    mx = _mx()
    shape, axis = cases[case]
    channels = shape[axis]
    _, inputs, api = next(m for m in MEMORY_MODES if m[0] == mode)
    if provider.startswith("ours-python"):
        os.environ["MX_INSTNORM_BACKEND"] = "python"
    x = mx.nd.random.normal(shape=shape)
    dy = mx.nd.random.normal(shape=shape)
    g, b = mx.nd.ones(channels), mx.nd.zeros(channels)
    for arr in (g, b) if inputs == "nograd" else (x, g, b):
        arr.attach_grad("add" if inputs == "add" else "write")
    if api == "gluon":
        from mxnet.gluon import nn
        from mx_instnorm.gluon import InstanceNorm
        kw = dict(axis=axis, epsilon=EPS, scale=True, center=True)
        block = (InstanceNorm if provider.startswith("ours") else nn.InstanceNorm)(**kw)
        block.initialize(ctx=mx.cpu())
        block.hybridize()

        def fn(x, g, b):
            return block(x)
    elif provider.startswith("ours"):
        from mx_instnorm.nd import InstanceNorm

        def fn(x, g, b):
            return InstanceNorm(x, g, b, eps=EPS, axis=axis)
    elif axis in (1, 1 - len(shape)):
        def fn(x, g, b):
            return mx.nd.InstanceNorm(x, g, b, eps=EPS)
    else:
        def fn(x, g, b):
            return mx.nd.InstanceNorm(x.swapaxes(1, axis), g, b,
                                      eps=EPS).swapaxes(1, axis)

    def step():
        with mx.autograd.record():
            y = fn(x * 1.0 if inputs == "interior" else x, g, b)
        y.backward(dy)
        mx.nd.waitall()

    # One full-size call first, freed before measuring: it loads whatever a
    # first call loads (a smaller warm-up would take a small-input path and
    # leave the rest inside the measurement) and builds a Gluon graph.
    step()
    mx.nd.waitall()
    _reset_peak_rss()
    base = _peak_kib()
    step()
    peak = _peak_kib()
    print("MEMORY_KIB %d" % (peak - base))


def _memory(case, args):
    """{mode: [(provider, KiB)]} for every mode of MEMORY_MODES."""
    provs = ["ours", "builtin"] + (["ours-python"] if _backend() == "compiled" else [])
    out = {}
    for mode, _, _ in MEMORY_MODES:
        for prov in provs:
            cmd = [sys.executable, "-m", "mx_instnorm.bench", "--_memory-child",
                   prov, case, mode] + (["--quick"] if args.quick else [])
            env = dict(os.environ, MX_INSTNORM_NUM_THREADS=str(args.threads))
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            kib = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY_KIB")]
            if res.returncode or not kib:
                raise SystemExit("memory child for %s, %s failed:\n%s"
                                 % (prov, mode, res.stderr[-2000:]))
            out.setdefault(mode, []).append((prov, int(kib[0].split()[1])))
    return out


def _memory_table(case, nbytes, res):
    provs = [p for p, _ in next(iter(res.values()))]
    lines = ["peak RSS growth of one forward+backward, %s (%.1f MiB tensor; fresh "
             "process each; MiB)" % (case, nbytes / 2**20),
             "%-22s" % "mode" + "".join("%13s" % p for p in provs) + "   ours/builtin"]
    for mode, row in res.items():
        kib = dict(row)
        lines.append("%-22s" % mode + "".join("%13.1f" % (k / 1024) for _, k in row)
                     + "   %.2f" % (kib["ours"] / max(kib["builtin"], 1)))
    return lines


# ------------------------------------------------------------------ main --

# --------------------------------------------------------------- network --

def _resnet_generator(blocks, ngf):
    """A CycleGAN ResNet generator (as in GluonCV's CycleGAN scripts) with
    MXNet's built-in ``nn.InstanceNorm`` after every conv but the last."""
    from mxnet.gluon import nn

    class _Residual(nn.HybridBlock):
        def __init__(self, channels, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.body = nn.HybridSequential()
                self.body.add(nn.ReflectionPad2D(1), nn.Conv2D(channels, 3, in_channels=channels),
                              nn.InstanceNorm(in_channels=channels), nn.Activation("relu"),
                              nn.ReflectionPad2D(1), nn.Conv2D(channels, 3, in_channels=channels),
                              nn.InstanceNorm(in_channels=channels))

        def hybrid_forward(self, F, x):
            return x + self.body(x)

    net = nn.HybridSequential()
    with net.name_scope():
        net.add(nn.ReflectionPad2D(3), nn.Conv2D(ngf, 7, in_channels=3),
                nn.InstanceNorm(in_channels=ngf), nn.Activation("relu"))
        channels = ngf
        for _ in range(2):
            net.add(nn.Conv2D(channels * 2, 3, strides=2, padding=1, in_channels=channels),
                    nn.InstanceNorm(in_channels=channels * 2), nn.Activation("relu"))
            channels *= 2
        for _ in range(blocks):
            net.add(_Residual(channels))
        for _ in range(2):
            net.add(nn.Conv2DTranspose(channels // 2, 3, strides=2, padding=1,
                                       output_padding=1, in_channels=channels),
                    nn.InstanceNorm(in_channels=channels // 2), nn.Activation("relu"))
            channels //= 2
        net.add(nn.ReflectionPad2D(3), nn.Conv2D(3, 7, in_channels=channels),
                nn.Activation("tanh"))
    return net


def _network(args):
    """Times the ResNet generator, built-in against swapped (``--network``)."""
    import tempfile

    import mxnet as mx
    from mxnet import autograd, gluon

    import mx_instnorm
    from mx_instnorm.gluon import swap_instance_norm

    blocks, ngf, size = (2, 16, 64) if args.quick else (9, 64, 256)
    shape = (1, 3, size, size)
    mx.random.seed(0)
    nets = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "generator.params")
        for name in ("builtin", "swapped"):
            net = _resnet_generator(blocks, ngf)
            if name == "builtin":
                net.initialize(mx.init.Normal(0.02))
                # Random gamma/beta too: the defaults (1, 0) are not a trained net.
                for pname, param in net.collect_params().items():
                    if pname.endswith(("_gamma", "_beta")):
                        param.set_data(mx.nd.random.uniform(0.5, 1.5, param.shape))
                net.save_parameters(weights)
            else:
                net.load_parameters(weights)
                swap_instance_norm(net)
            net.hybridize(static_alloc=True, static_shape=True)
            nets[name] = net
    layers = sum(1 for _ in _instance_norms(nets["builtin"]))
    x = mx.nd.random.uniform(-1, 1, shape)
    outputs = {name: net(x).asnumpy() for name, net in nets.items()}
    diff = float(np.abs(outputs["swapped"] - outputs["builtin"]).max())
    if not diff <= 1e-3:
        print("ABORT: swapped generator differs from the built-in one by %g" % diff,
              file=sys.stderr)
        return 2

    def infer(net):
        return lambda: net(x).wait_to_read()

    def train(net):
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-6})

        def step():
            with autograd.record():
                loss = (net(x) ** 2).mean()
            loss.backward()
            trainer.step(1)
            mx.nd.waitall()
        return step

    print("mx_instnorm %s (%s backend), mxnet %s; CycleGAN ResNet generator, %d residual "
          "blocks, ngf %d, %d InstanceNorm layers, input %s float32, random weights; "
          "hybridized static_alloc; MX_INSTNORM_NUM_THREADS=%s OMP_NUM_THREADS=%s; "
          "repeat %d (medians, interleaved, %d warm-up)"
          % (mx_instnorm.__version__, mx_instnorm.backend(), mx.__version__, blocks, ngf,
             layers, shape, os.environ.get("MX_INSTNORM_NUM_THREADS"),
             os.environ.get("OMP_NUM_THREADS", "(unset)"), args.repeat, args.warmup))
    print("max |swapped - built-in| of the output: %.2g" % diff)
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    print("%-16s %12s %12s %9s" % ("mode", "built-in ms", "swapped ms", "speed-up"))
    for mode, make in (("inference", infer), ("training step", train)):
        times = _time_interleaved({name: make(net) for name, net in nets.items()},
                                  args.repeat, args.warmup)
        print("%-16s %12.1f %12.1f %8.2fx" % (mode, times["builtin"] * 1e3,
                                             times["swapped"] * 1e3,
                                             times["builtin"] / times["swapped"]))
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    return 0


def _instance_norms(block):
    from mxnet.gluon import nn
    if isinstance(block, nn.InstanceNorm):
        yield block
    for child in block._children.values():
        yield from _instance_norms(child)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m mx_instnorm.bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="comma-separated case names (see --list)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--repeat", type=int, help="timed rounds (default 15, 5 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    p.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    p.add_argument("--quick", action="store_true", help="small cases, few rounds (CI)")
    p.add_argument("--plot", metavar="FILE", help="save a GB/s plot (needs matplotlib)")
    p.add_argument("--memory", action="store_true", help="peak RSS of fwd+bwd")
    p.add_argument("--memory-case", help="case for --memory (default: first non-tiny)")
    p.add_argument("--network", action="store_true",
                   help="whole network: CycleGAN ResNet generator, built-in vs swapped")
    p.add_argument("--tiny-all", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_memory-child", nargs=3, dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1, got %d" % args.threads)
    if args.repeat is None:
        args.repeat = 5 if args.quick else 15
    if args.repeat < 1:
        p.error("--repeat must be >= 1, got %d" % args.repeat)
    return p, args


def main(argv=None):
    parser, args = _parse(argv)
    os.environ["MX_INSTNORM_NUM_THREADS"] = str(args.threads)
    cases = QUICK_CASES if args.quick else CASES
    if args.memory_child:
        import mx_instnorm  # noqa: F401 - registers the op
        prov, case, mode = args.memory_child
        _memory_child(prov, case, cases, mode)
        return 0
    if args.network:
        return _network(args)
    if args.list:
        for name, (shape, axis) in cases.items():
            print("%-20s shape %s axis %d" % (name, shape, axis))
        return 0
    names = list(cases)
    if args.cases:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in cases]
        if unknown:
            parser.error("unknown case(s) %s; choose from %s"
                         % (", ".join(unknown), ", ".join(cases)))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'mx_instnorm[bench]'")

    import mxnet as mx
    import mx_instnorm
    providers = ["ours (%s backend)" % mx_instnorm.backend(), "builtin"] \
        + (["ours-python"] if mx_instnorm.backend() == "compiled" else [])
    try:
        import torch
        providers.append("torch %s" % torch.__version__)
    except ImportError:
        pass
    try:
        import onnxruntime
        import onnx  # noqa: F401
        providers.append("onnxruntime %s (forward only)" % onnxruntime.__version__)
    except ImportError:
        pass
    print("mx_instnorm %s, mxnet %s, numpy %s; threads %d; repeat %d (medians, "
          "interleaved, %d warm-up)" % (mx_instnorm.__version__, mx.__version__,
                                        np.__version__, args.threads, args.repeat,
                                        args.warmup))
    print("providers: " + ", ".join(providers))
    print("bytes: fwd = read x + write y (2 x nbytes); fwd+bwd = fwd + read x, dy "
          "+ write dx (5 x nbytes); memcpy row = np.copyto time scaled to those bytes")
    print("ratios: speed-up of the row's provider (other's time / this time)")
    rows = []
    t0 = time.perf_counter()
    for name in names:
        shape, axis = cases[name]
        try:
            rows.extend(_bench_case(name, shape, axis, args))
        except _Mismatch as err:
            print("ABORT: %s" % err, file=sys.stderr)
            return 2
        print("  %s done (%.0f s)" % (name, time.perf_counter() - t0), file=sys.stderr)
    print()
    print("\n".join(_table(rows)))
    print()
    print("\n".join(_summary(rows)))
    if args.memory:
        case = args.memory_case or next(n for n in names if not _is_tiny(n))
        if case not in cases:
            parser.error("unknown --memory-case %r" % case)
        res = _memory(case, args)
        shape = cases[case][0]
        print()
        print("\n".join(_memory_table(case, 4 * math.prod(shape), res)))
    if args.plot:
        _plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
