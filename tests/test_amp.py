"""MXNet's automatic mixed precision (mxnet.contrib.amp) with mx_instnorm,
float16 and bfloat16, on both backends, against MXNet's built-in
InstanceNorm in the same network: conv -> relu -> InstanceNorm(scale) ->
conv. The reference is the float32 network with the same weights; the
mixed-precision network with mx_instnorm must be no further from it than
the one with the built-in.

MXNet's CPU build has no float16 convolution, so for float16 the
convolutions are kept in float32 (``fp32_ops``); nothing upstream of the
normalization is then float16, and the float16 cases check that
conversion and training work and change nothing. ``amp.init`` changes
MXNet's functions for the rest of a process, so its cases run in a fresh
interpreter each.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mxnet as mx
from mxnet.contrib import amp

import mx_instnorm

BF16 = np.dtype([("bfloat16", np.uint16)])
OP = "mx_instnorm_InstanceNorm"

# Built in the tests and in the amp.init subprocesses alike.
NET_CODE = r'''
import numpy as np
import mxnet as mx
from mxnet import gluon
import mx_instnorm
from mx_instnorm.gluon import InstanceNorm


def make_net(ours, prefix):
    net = gluon.nn.HybridSequential(prefix=prefix)
    with net.name_scope():
        net.add(gluon.nn.Conv2D(8, 3, padding=1, in_channels=3),
                gluon.nn.Activation("relu"),
                (InstanceNorm if ours else gluon.nn.InstanceNorm)(scale=True, in_channels=8),
                gluon.nn.Conv2D(4, 3, padding=1, in_channels=8))
    net.initialize()
    rng = np.random.default_rng(7)
    for name in sorted(net.collect_params()):
        p = net.collect_params()[name]
        if name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, p.shape)
        elif name.endswith("weight"):
            value = rng.standard_normal(p.shape) * 0.3
        else:
            value = rng.standard_normal(p.shape) * 0.2
        p.set_data(mx.nd.array(value))
    return net


def make_data():
    rng = np.random.default_rng(11)
    return (mx.nd.array(rng.standard_normal((2, 3, 12, 12)) + 1.0),
            mx.nd.array(rng.standard_normal((2, 4, 12, 12))))


def to_f32(arr):
    if arr.dtype == np.dtype([("bfloat16", np.uint16)]):
        arr = mx.nd.amp_cast(arr, dtype=np.float32)
    return arr.astype(np.float32).asnumpy()
'''
exec(NET_CODE)  # noqa: S102  (the same definitions as the subprocesses')


def fp16_kwargs(dtype):
    """float16 on CPU: convolutions in float32."""
    if dtype != "float16":
        return {}
    return dict(target_dtype_ops=[op for op in amp.list_lp16_ops("float16")
                                  if op not in ("Convolution", "FullyConnected")],
                fp32_ops=amp.list_fp32_ops("float16") + ["Convolution", "FullyConnected"])


def errors(dtype, run):
    """``run(ours, net) -> output`` for both networks; returns the max abs
    errors against the float32 networks' outputs (ours, built-in)."""
    x, _ = make_data()
    out = []
    for ours in (True, False):
        net = make_net(ours, "net%d_" % ours)
        net.hybridize()
        want = net(x).asnumpy()
        got = to_f32(run(ours, net))
        assert np.isfinite(got).all()
        out.append(float(np.abs(got - want).max()))
    return out


def assert_no_worse(err_ours, err_builtin):
    # Both see the same low-precision values; a few half-ulps of slack.
    assert err_ours <= err_builtin * 1.2 + 1e-5, (err_ours, err_builtin)


def test_registered_dtype_neutral():
    for dtype in ("float16", BF16):
        assert OP in amp.list_lp16_fp32_ops(dtype)
        assert OP not in amp.list_lp16_ops(dtype) and OP not in amp.list_fp32_ops(dtype)
    assert mx_instnorm.integration.amp.register() == []  # once only


def _op_nodes(sym):
    nodes = json.loads(sym.tojson())["nodes"]
    return nodes, [n for n in nodes if n["op"] in (OP, "Custom")]


# MXNet's convert_hybrid_block warns that its (float32) input has no type.
@pytest.mark.filterwarnings("ignore:Cannot decide type for the following arguments")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_hybrid_block(dtype):
    converted = {}

    def run(ours, net):
        x, _ = make_data()
        block = amp.convert_hybrid_block(net, target_dtype=dtype, ctx=mx.cpu(),
                                         **fp16_kwargs(dtype))
        converted[ours] = block
        return block(x)

    err_ours, err_builtin = errors(dtype, run)
    assert_no_worse(err_ours, err_builtin)
    block = converted[True]
    # gamma/beta stay float32; no cast sits right before our operator.
    for name, p in block.collect_params().items():
        if "instancenorm" in name:
            assert p.dtype == np.float32, (name, p.dtype)
    nodes, ops = _op_nodes(block._cached_graph[1])
    assert len(ops) == 1
    if ops[0]["op"] == OP:
        for entry in ops[0]["inputs"]:
            assert nodes[entry[0]]["op"] != "amp_cast"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_symbol_and_model(dtype):
    data = mx.sym.var("data")

    def run(ours, net):
        x, _ = make_data()
        sym = net(data)
        params = {k: v.data() for k, v in net.collect_params().items()}
        out = []
        # convert_symbol: same parameters, bound as they are.
        csym = amp.convert_symbol(sym, target_dtype=dtype, data_names=["data"],
                                  **fp16_kwargs(dtype))
        arg_types = dict(zip(csym.list_arguments(), csym.infer_type(data=np.float32)[0]))
        args = {k: (mx.nd.amp_cast(v, dtype=arg_types[k]) if np.dtype(arg_types[k]) == BF16
                    else v.astype(arg_types[k])) for k, v in params.items()}
        args["data"] = x
        out.append(csym.bind(mx.cpu(), args).forward()[0])
        # convert_model: parameters cast by AMP itself.
        msym, arg_params, aux_params = amp.convert_model(
            sym, dict(params), {}, target_dtype=dtype, **fp16_kwargs(dtype))
        args = dict(arg_params, data=x)
        got = msym.bind(mx.cpu(), args).forward()[0]
        np.testing.assert_array_equal(to_f32(got), to_f32(out[0]))
        if ours:
            for k in ("instancenorm0_gamma", "instancenorm0_beta"):
                name = next(n for n in arg_params if n.endswith(k))
                assert arg_params[name].dtype == np.float32
        return got

    err_ours, err_builtin = errors(dtype, run)
    assert_no_worse(err_ours, err_builtin)


# amp.init + amp.init_trainer, imperative and hybridized: three SGD steps
# of each network; prints the outputs' errors against the float32 training
# of the same networks, run first in the same process before amp.init.
INIT_SCRIPT = NET_CODE + r'''
import json, sys
from mxnet import autograd, gluon
from mxnet.contrib import amp

dtype, hybridize = sys.argv[1], sys.argv[2] == "1"


def train(ours, prefix, use_amp):
    net = make_net(ours, prefix)
    if hybridize:
        net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    if use_amp:
        amp.init_trainer(trainer)
    x, target = make_data()
    loss_fn = gluon.loss.L2Loss()
    for _ in range(3):
        with autograd.record():
            loss = loss_fn(net(x).astype("float32") if not use_amp else net(x), target)
            if use_amp:
                with amp.scale_loss(loss, trainer) as scaled:
                    autograd.backward(scaled)
            else:
                loss.backward()
        trainer.step(x.shape[0])
    out = to_f32(net(x))
    gamma = [p for n, p in net.collect_params().items() if n.endswith("gamma")][0]
    return out, np.dtype(gamma.data().dtype).name


reference = {ours: train(ours, "ref%d_" % ours, False)[0] for ours in (True, False)}
kwargs = {}
if dtype == "float16":
    kwargs = dict(target_precision_ops=[], fp32_ops=amp.list_fp32_ops("float16")
                  + ["Convolution", "FullyConnected"])
amp.init(target_dtype=dtype, **kwargs)
result = {}
for ours in (True, False):
    out, gamma_dtype = train(ours, "amp%d_" % ours, True)
    assert np.isfinite(out).all()
    result["ours" if ours else "builtin"] = [float(np.abs(out - reference[ours]).max()),
                                             gamma_dtype]
print(json.dumps(result))
'''


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_init_training(tmp_path, dtype, hybridize):
    proc = subprocess.run([sys.executable, "-c", INIT_SCRIPT, dtype, str(int(hybridize))],
                          cwd=str(tmp_path), env=dict(os.environ), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (err_ours, gamma_ours), (err_builtin, _) = result["ours"], result["builtin"]
    assert gamma_ours == "float32"
    assert_no_worse(err_ours, err_builtin)
