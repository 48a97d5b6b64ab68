"""What a leaf input costs the compiled operator under autograd: the view
mx_instnorm 0.2.0 put on every leaf, against the per-call gradient
destinations that replaced it (see ``_gradient_destinations`` in
mx_instnorm/operator/functions.py).

Both run in one process, interleaved, on the same data: the leaves of the
"view" set are marked and then their recorded requests forgotten, which is
what mx_instnorm does with a leaf it did not see marked (it reads the
request as unknown and feeds the leaf through a recorded ``reshape`` view,
whose backward copies the gradient into a second full-size buffer). The
"direct" set keeps its records: a 'write' leaf takes the operator's
gradient in its own buffer, an 'add' leaf has it summed in place. Peak
memory is measured in a fresh process per variant (VmHWM growth of one
forward+backward after a warm-up one, as ``python -m mx_instnorm.bench
--memory`` does). It prints medians, ratios and the load (``uptime``)
before and after.

    python benchmarks/leaf_grads.py [--shape 16,128,64,64] [--rounds 30]
"""
import argparse
import os
import subprocess
import sys
import time

import mxnet as mx
import numpy as np

import mx_instnorm
from mx_instnorm import bench
from mx_instnorm.operator import _grad_reqs

VARIANTS = [(way, req) for req in ("write", "add") for way in ("view", "direct")]


def _leaves(shape, req, forget):
    c = shape[1]
    arrays = [mx.nd.random.normal(shape=shape), mx.nd.ones(c), mx.nd.zeros(c)]
    for a in arrays:
        a.attach_grad(req)
    mx.nd.waitall()
    if forget:
        for a in arrays:
            grad = a.grad
            _grad_reqs._records.pop(_grad_reqs._chunk(grad.handle.value), None)
    return arrays


def _step(arrays, dy):
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(*arrays)
    y.backward(dy)
    mx.nd.waitall()


def _child(shape, way, req):
    arrays = _leaves(shape, req, way == "view")
    dy = mx.nd.random.normal(shape=shape)
    _step(arrays, dy)
    bench._reset_peak_rss()
    base = bench._peak_kib()
    _step(arrays, dy)
    print("MEMORY_KIB %d" % (bench._peak_kib() - base))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16,128,64,64")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if args._child:
        _child(shape, *args._child)
        return 0
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("mx_instnorm backend: %s; shape %s float32, %.1f MiB"
          % (mx_instnorm.backend(), shape, 4 * np.prod(shape) / 2**20))
    dy = mx.nd.random.normal(shape=shape)
    sets = {v: _leaves(shape, v[1], v[0] == "view") for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for _ in range(2):
        for v in VARIANTS:
            _step(sets[v], dy)
    for r in range(args.rounds):
        k = r % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            t0 = time.perf_counter()
            _step(sets[v], dy)
            times[v].append(time.perf_counter() - t0)
    memory = {}
    for way, req in VARIANTS:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--shape", args.shape,
                              "--_child", way, req], capture_output=True, text=True)
        kib = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY_KIB")]
        memory[(way, req)] = int(kib[0].split()[1]) / 1024 if kib else float("nan")
    print("%-6s %-7s %12s %14s" % ("req", "way", "fwd+bwd", "peak growth"))
    for way, req in VARIANTS:
        print("%-6s %-7s %9.2f ms %10.1f MiB" % (req, way, np.median(times[(way, req)]) * 1e3,
                                               memory[(way, req)]))
    for req in ("write", "add"):
        t_view, t_direct = (np.median(times[(w, req)]) for w in ("view", "direct"))
        print("%s: direct %.2fx faster than the view, %.2fx its peak memory"
              % (req, t_view / t_direct, memory[("direct", req)] / memory[("view", req)]))
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
