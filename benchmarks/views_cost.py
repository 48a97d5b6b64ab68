"""What the gamma/beta views of a swapped Gluon net cost at inference.

A swapped net exports two ``_copy`` nodes per InstanceNorm (views that keep
``grad_req='add'`` correct; see ``_compiled`` in
mx_instnorm/operator/functions.py). This script builds a 17-layer
Conv-InstanceNorm-ReLU net, swaps it, exports it, and times the exported
graph loaded with ``SymbolBlock.imports`` (hybridized, ``static_alloc``)
against the same graph converted for inference
(``mx_instnorm.from_native(graph, for_training=False)``: no views),
interleaved in one
process, same weights. It prints node counts, the median of each and the
ratio, and the load (``uptime``) before and after.

    python benchmarks/views_cost.py [--channels 32] [--size 64] [--rounds 15]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

import mx_instnorm


def _net(layers, channels):
    net = nn.HybridSequential(prefix="net_")
    with net.name_scope():
        for i in range(layers):
            net.add(nn.Conv2D(channels, 3, padding=1, in_channels=3 if i == 0 else channels),
                    nn.InstanceNorm(in_channels=channels), nn.Activation("relu"))
    return net


def _time(block, x, repeat):
    mx.nd.waitall()
    start = time.perf_counter()
    for _ in range(repeat):
        block(x).wait_to_read()
    return (time.perf_counter() - start) / repeat


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=17)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("backend:", mx_instnorm.backend())
    net = _net(args.layers, args.channels)
    net.initialize(mx.init.Xavier())
    mx_instnorm.gluon.swap_instance_norm(net)
    net.hybridize(static_alloc=True, static_shape=True)
    x = mx.nd.random.normal(shape=(1, 3, args.size, args.size))
    net(x)
    prefix = os.path.join(tempfile.mkdtemp(), "net")
    net.export(prefix)
    with_views = mx.sym.load(prefix + "-symbol.json")
    without = mx_instnorm.from_native(with_views, for_training=False)
    blocks = {}
    for name, symbol in (("with views", with_views), ("without", without)):
        ops = [n["op"] for n in json.loads(symbol.tojson())["nodes"]]
        print("%-10s %3d nodes, %2d _copy, %2d of ours"
              % (name, len(ops), ops.count("_copy"), ops.count(mx_instnorm.COMPILED_OP
                                                               or "Custom")))
        block = mx.gluon.SymbolBlock(symbol, mx.sym.var("data"))
        block.collect_params().load(prefix + "-0000.params", ignore_extra=True,
                                    restore_prefix="")
        block.hybridize(static_alloc=True, static_shape=True)
        block(x)
        blocks[name] = block
    diff = np.abs(blocks["with views"](x).asnumpy() - blocks["without"](x).asnumpy()).max()
    print("max |difference| between the two outputs: %g" % diff)
    times = {name: [] for name in blocks}
    for _ in range(args.rounds):
        for name, block in blocks.items():
            times[name].append(_time(block, x, args.repeat))
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, value in medians.items():
        print("%-10s median %.2f ms (min %.2f)" % (name, value * 1e3, min(times[name]) * 1e3))
    print("ratio with/without views: %.3f" % (medians["with views"] / medians["without"]))
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
