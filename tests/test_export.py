"""A hybridized block with our InstanceNorm, exported, then loaded in a fresh
Python process (SymbolBlock.imports and mx.mod.Module from the checkpoint)
that only does ``import mx_instnorm``: same outputs as the float64
reference and as the block that was exported."""
import json
import subprocess
import sys

import numpy as np
import pytest

import mxnet as mx
from mxnet.gluon import nn

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm

from conftest import CHAIN_TOL, assert_close, random_inputs, ref_backward, ref_forward

SHAPE = (2, 3, 5, 7)
EPS1, EPS2 = 1e-4, 0.1

LOADER = r"""
import sys
import numpy as np
import mxnet as mx
import mx_instnorm  # registers the op the symbol file names

prefix, dtype, folder = sys.argv[1:4]
x = np.load(folder + "/x.npy")

block = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                     prefix + "-0000.params")
np.save(folder + "/y_symbolblock.npy", block(mx.nd.array(x, dtype=dtype)).asnumpy())
block.hybridize()
np.save(folder + "/y_symbolblock_hybrid.npy", block(mx.nd.array(x, dtype=dtype)).asnumpy())

sym, arg_params, aux_params = mx.model.load_checkpoint(prefix, 0)
mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
mod.bind(data_shapes=[mx.io.DataDesc("data", x.shape, dtype)], for_training=False)
mod.set_params(arg_params, aux_params)
mod.forward(mx.io.DataBatch([mx.nd.array(x, dtype=dtype)]), is_train=False)
np.save(folder + "/y_module.npy", mod.get_outputs()[0].asnumpy())
"""


def _net(dtype, rng):
    """Two of our blocks: channels first (scale, centre) and channels last."""
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(InstanceNorm(axis=1, epsilon=EPS1, scale=True, in_channels=SHAPE[1]),
                InstanceNorm(axis=-1, epsilon=EPS2, scale=True, center=False,
                             in_channels=SHAPE[-1]))
    net.initialize()
    net.cast(dtype)
    values = {}
    for i, c in ((0, SHAPE[1]), (1, SHAPE[-1])):
        values[i] = (rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype))
        net[i].gamma.set_data(mx.nd.array(values[i][0], dtype=dtype))
        net[i].beta.set_data(mx.nd.array(values[i][1], dtype=dtype))
    return net, values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_export_reload_in_fresh_process(path, rng, tmp_path, dtype):
    net, values = _net(dtype, rng)
    net.hybridize()
    x = (rng.standard_normal(SHAPE) * 3 + 2).astype(dtype)
    y_block = net(mx.nd.array(x, dtype=dtype)).asnumpy()
    prefix = str(tmp_path / "model")
    net.export(prefix)

    expected = ref_forward(x, *values[0], EPS1, 1)[0]
    expected = ref_forward(expected, *values[1], EPS2, -1)[0]
    assert_close(y_block, expected, dtype)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)

    # The exported graph names our op (the backend's kind), with its eps and axis.
    graph = json.loads((tmp_path / "model-symbol.json").read_text())
    if mx_instnorm.backend() == "compiled":
        ours = [n for n in graph["nodes"] if n["op"] == mx_instnorm.COMPILED_OP]
        assert not [n for n in graph["nodes"] if n["op"] == "Custom"]
    else:
        ours = [n for n in graph["nodes"] if n["op"] == "Custom"]
        assert {n["attrs"]["op_type"] for n in ours} == {mx_instnorm.OP_TYPE}
    assert len(ours) == 2
    assert sorted((float(n["attrs"]["eps"]), int(n["attrs"]["axis"])) for n in ours) == \
        [(EPS1, 1), (EPS2, -1)]

    proc = subprocess.run([sys.executable, "-c", LOADER, prefix, np.dtype(dtype).name,
                           str(tmp_path)], cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    for name in ("y_symbolblock", "y_symbolblock_hybrid", "y_module"):
        got = np.load(tmp_path / (name + ".npy"))
        assert got.dtype == dtype, name
        assert_close(got, np.load(tmp_path / "expected.npy"), dtype, name)
        assert_close(got, y_block, dtype, name)


@pytest.mark.filterwarnings("ignore:Cannot decide type")
def test_export_reimport_in_process_gradients(path, rng, tmp_path):
    """The reimported SymbolBlock also trains: its input and parameter
    gradients equal the reference."""
    net, values = _net(np.float64, rng)
    net.hybridize()
    x = rng.standard_normal(SHAPE) * 3 + 2
    net(mx.nd.array(x, dtype=np.float64))
    prefix = str(tmp_path / "model")
    net.export(prefix)
    block = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                         prefix + "-0000.params")
    xs = mx.nd.array(x, dtype=np.float64)
    xs.attach_grad()
    dy = rng.standard_normal(SHAPE)
    with mx.autograd.record():
        y = block(xs)
    y.backward(mx.nd.array(dy, dtype=np.float64))
    # Reference chain rule through the two norms.
    h = ref_forward(x, *values[0], EPS1, 1)[0]
    assert_close(y.asnumpy(), ref_forward(h, *values[1], EPS2, -1)[0], np.float64)
    dh, dg2, db2 = ref_backward(dy, h, values[1][0], EPS2, -1)
    dx, dg1, db1 = ref_backward(dh, x, values[0][0], EPS1, 1)
    assert_close(xs.grad.asnumpy(), dx, np.float64)
    grads = {name.rsplit("_", 1)[-1] + str(i): p.grad().asnumpy()
             for i, blk in enumerate(net)
             for name, p in block.collect_params().items()
             if name.startswith(blk.prefix)}
    assert_close(grads["gamma0"], dg1, np.float64)
    assert_close(grads["beta0"], db1, np.float64)
    assert_close(grads["gamma1"], dg2, np.float64)
    assert_close(grads["beta1"], db2, np.float64)


def test_standalone_block_exports_a_graph_right_under_add(mx_backend, rng, tmp_path):
    """A hybridized block used alone, with deferred parameter shapes, first
    run under autograd on a 'write' leaf (on the compiled backend that call
    runs imperatively), exports a graph that stays right when the imported
    SymbolBlock is trained with grad_req='add' on its parameters and input:
    two passes give twice the float64 reference gradients."""
    shape = (2, 3, 5, 4)
    x, g, b = random_inputs(rng, shape, 1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    block = InstanceNorm(epsilon=EPS1, scale=True)
    block.initialize()
    block.hybridize()
    data = mx.nd.array(x)
    data.attach_grad()
    with mx.autograd.record():
        block(data)
    block.gamma.set_data(mx.nd.array(g))
    block.beta.set_data(mx.nd.array(b))
    prefix = str(tmp_path / "alone")
    block.export(prefix)
    loaded = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                          prefix + "-0000.params")
    loaded.hybridize()
    loaded.collect_params().setattr("grad_req", "add")
    loaded.collect_params().zero_grad()
    data = mx.nd.array(x)
    data.attach_grad("add")
    for _ in range(2):
        with mx.autograd.record():
            y = loaded(data)
        y.backward(mx.nd.array(dy))
    assert_close(y.asnumpy(), ref_forward(x, g, b, EPS1, 1)[0], np.float32)
    dx, dg, db = ref_backward(dy, x, g, EPS1, 1)
    params = {p.name.rpartition("_")[2]: p for p in loaded.collect_params().values()}
    for got, ref, name in ((data.grad, dx, "data"), (params["gamma"].grad(), dg, "gamma"),
                           (params["beta"].grad(), db, "beta")):
        np.testing.assert_allclose(got.asnumpy(), 2 * ref, err_msg=name, **CHAIN_TOL)
