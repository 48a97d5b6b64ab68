"""How tests/data/instnorm_v0_1-symbol.json and -0000.params were made:
with mx_instnorm 0.1.0 itself, the tree of commit d3799d6 (the last 0.1.0
commit before the compiled operator), never with today's code:

    mkdir /tmp/v01 && git archive d3799d6 | tar -x -C /tmp/v01
    cd /tmp && PYTHONPATH=/tmp/v01 python tests/data/make_v0_1_graph.py \
        <repo>/tests/data/instnorm_v0_1

(MXNet 1.9.1, Python 3.11.) The graph holds 0.1's nodes: Custom
InstanceNorm nodes between its layout guards (expand_dims/squeeze before,
slice_axis after). Not a test; kept for provenance.
"""
import sys
import numpy as np, mxnet as mx
import mx_instnorm
from mx_instnorm.gluon import InstanceNorm
print(mx_instnorm.__file__, mx_instnorm.__version__)
out = sys.argv[1]
net = mx.gluon.nn.HybridSequential(prefix="net_")
with net.name_scope():
    net.add(InstanceNorm(axis=1, epsilon=1e-3, scale=True, in_channels=3),
            InstanceNorm(axis=-1, epsilon=1e-2, in_channels=5))
net.initialize()
rng = np.random.RandomState(1)
net[0].gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, 3)))
net[0].beta.set_data(mx.nd.array(rng.standard_normal(3)))
net[1].gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, 5)))
net[1].beta.set_data(mx.nd.array(rng.standard_normal(5)))
net.hybridize()
net(mx.nd.array(rng.standard_normal((2, 3, 4, 5))))
net.export(out)
