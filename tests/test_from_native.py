"""from_native: graphs of MXNet's built-in InstanceNorm computed by ours.

The reference is always MXNet's built-in operator: the original graph run
with the same parameters (exported ``.params`` files, or the same arrays),
or, for ranks the built-in is not tested on here, the float64 reference of
conftest. Every test runs on both backends (the ``backend`` fixture).
"""
import json
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import mx_instnorm
from conftest import BUILTIN_TOL, random_inputs, ref_forward

OURS = ("Custom", "mx_instnorm_InstanceNorm")


def _ops(symbol):
    return [n["op"] for n in json.loads(symbol.tojson())["nodes"]]


def _interface(symbol):
    return (symbol.list_arguments(), symbol.list_auxiliary_states(), symbol.list_outputs())


def _exported(tmp_path, layers, shape, rng, name="model"):
    """A hybridized Gluon net of ``layers``, run once on random data and
    exported; returns (symbol file, params file, data)."""
    net = nn.HybridSequential(prefix="net_")
    with net.name_scope():
        for layer in layers:
            net.add(layer)
    net.initialize(mx.init.Normal(0.5))
    # Non-trivial gamma/beta (Gluon initializes them to ones/zeros).
    for pname, param in net.collect_params().items():
        if pname.endswith(("gamma", "beta")):
            param.initialize(force_reinit=True)
            param.set_data(mx.nd.array(rng.uniform(0.5, 1.5, param.shape)))
    net.hybridize()
    x = mx.nd.array(rng.standard_normal(shape) * 2 + 1)
    net(x)
    prefix = str(tmp_path / name)
    net.export(prefix)
    return prefix + "-symbol.json", prefix + "-0000.params", x


def _imports(sym, params_file):
    return mx.gluon.SymbolBlock.imports(sym, ["data"], params_file)


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 3, 6, 5), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("scale_center", [(True, True), (False, False), (True, False)])
def test_gluon_exports_match_the_builtin(rng, tmp_path, shape, axis, scale_center):
    scale, center = scale_center
    channels = shape[axis]
    sym_file, params_file, x = _exported(
        tmp_path, [nn.InstanceNorm(axis=axis, epsilon=1e-4, scale=scale, center=center,
                                   in_channels=channels)], shape, rng)
    original = mx.sym.load(sym_file)
    ours = mx_instnorm.from_native(sym_file)
    ops = _ops(ours)
    assert "InstanceNorm" not in ops and "SwapAxis" not in ops
    assert sum(op in OURS for op in ops) == 1
    assert _interface(ours) == _interface(original)
    node = [n for n in json.loads(ours.tojson())["nodes"] if n["op"] in OURS][0]
    assert float(node["attrs"]["eps"]) == 1e-4
    assert int(node["attrs"]["axis"]) == axis
    want = _imports(sym_file, params_file)(x).asnumpy()
    block = _imports(sym_file, params_file)
    block._cached_graph = block._cached_graph[0], ours
    np.testing.assert_allclose(block(x).asnumpy(), want, **BUILTIN_TOL)


@pytest.mark.parametrize("eps", [None, 1e-5, 0.25])
def test_eps_as_written_and_default(rng, eps):
    x = mx.sym.var("x")
    kwargs = {} if eps is None else {"eps": eps}
    s = mx.sym.InstanceNorm(x, name="in1", **kwargs)
    assert ("eps" in json.loads(s.tojson())["nodes"][-1].get("attrs", {})) == (eps is not None)
    ours = mx_instnorm.from_native(s)
    node = [n for n in json.loads(ours.tojson())["nodes"] if n["op"] in OURS][0]
    assert float(node["attrs"]["eps"]) == (1e-3 if eps is None else eps)
    data, gamma, beta = random_inputs(rng, (2, 3, 5, 4), 1, np.float32)
    args = {"x": mx.nd.array(data), "in1_gamma": mx.nd.array(gamma),
            "in1_beta": mx.nd.array(beta)}
    np.testing.assert_allclose(ours.eval(**args)[0].asnumpy(),
                               s.eval(**args)[0].asnumpy(), **BUILTIN_TOL)


@pytest.mark.parametrize("rank", [3, 4, 5, 6, 7])
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_ranks_3_to_7(rng, rank, axis):
    shape = (2, 3, 4, 2, 3, 2, 2)[:rank]
    x = mx.sym.var("x")
    s = mx.sym.SwapAxis(mx.sym.InstanceNorm(mx.sym.SwapAxis(x, 1, axis), eps=1e-5,
                                            name="in1"), 1, axis, name="out")
    ours = mx_instnorm.from_native(s)
    assert "SwapAxis" not in _ops(ours)
    assert _interface(ours) == _interface(s)
    data, gamma, beta = random_inputs(rng, shape, axis, np.float32)
    args = {"x": mx.nd.array(data), "in1_gamma": mx.nd.array(gamma),
            "in1_beta": mx.nd.array(beta)}
    got = ours.eval(**args)[0].asnumpy()
    want, _, _ = ref_forward(data, gamma, beta, 1e-5, axis)
    np.testing.assert_allclose(got, want, **BUILTIN_TOL)
    np.testing.assert_allclose(got, s.eval(**args)[0].asnumpy(), **BUILTIN_TOL)


def test_graph_without_instance_norm_comes_back_equal():
    x = mx.sym.var("data")
    s = mx.sym.relu(mx.sym.SwapAxis(mx.sym.BatchNorm(mx.sym.Convolution(
        x, kernel=(3, 3), num_filter=4), name="bn"), 1, 2), name="out")
    assert json.loads(mx_instnorm.from_native(s).tojson()) == json.loads(s.tojson())
    assert json.loads(mx_instnorm.from_native(s.tojson()).tojson()) == json.loads(s.tojson())


def test_other_nodes_untouched_and_heads_keep_names(rng):
    x = mx.sym.var("data")
    conv = mx.sym.Convolution(x, kernel=(3, 3), num_filter=4, name="conv")
    norm = mx.sym.InstanceNorm(conv, eps=1e-5, name="in1")
    s = mx.sym.Group([mx.sym.relu(norm, name="act"), conv])
    ours = mx_instnorm.from_native(s)
    before = [n for n in json.loads(s.tojson())["nodes"] if not n["name"].startswith("in1")]
    after = [n for n in json.loads(ours.tojson())["nodes"] if not n["name"].startswith("in1")]
    assert before == [dict(n, inputs=n["inputs"]) for n in before]
    assert [(n["op"], n["name"], n.get("attrs")) for n in after] == \
        [(n["op"], n["name"], n.get("attrs")) for n in before]
    assert _interface(ours) == _interface(s)


def test_round_trip_through_to_native_computes_the_same(rng, tmp_path):
    sym_file, params_file, x = _exported(
        tmp_path, [nn.Conv2D(4, 3, in_channels=3), nn.InstanceNorm(axis=-1, in_channels=4),
                   nn.InstanceNorm(in_channels=4)], (2, 3, 6, 6), rng)
    back = mx_instnorm.to_native(mx_instnorm.from_native(sym_file))
    assert not set(_ops(back)) & set(OURS)
    block = _imports(sym_file, params_file)
    want = block(x).asnumpy()
    block._cached_graph = block._cached_graph[0], back
    block._clear_cached_op()
    np.testing.assert_allclose(block(x).asnumpy(), want, **BUILTIN_TOL)


def test_refusals_name_the_node():
    x = mx.sym.var("x")
    # The mean/var outputs, which ours does not have.
    graph = json.loads(mx.sym.InstanceNorm(x, name="in1").tojson())
    graph["nodes"].append({"op": "BlockGrad", "name": "mean", "inputs": [[3, 1, 0]]})
    graph["heads"].append([4, 0, 0])
    with pytest.raises(ValueError, match="node 'in1'.*output 1"):
        mx_instnorm.from_native(json.dumps(graph))
    # A SwapAxis pair that does not swap the same axes.
    s = mx.sym.SwapAxis(mx.sym.InstanceNorm(mx.sym.SwapAxis(x, 1, 2), name="in2"), 1, 3)
    with pytest.raises(ValueError, match=r"node 'in2'.*\(1, 2\).*\(1, 3\)"):
        mx_instnorm.from_native(s)
    # The first SwapAxis's output used elsewhere too.
    swapped = mx.sym.SwapAxis(x, 1, 3, name="sw")
    s = mx.sym.Group([mx.sym.SwapAxis(mx.sym.InstanceNorm(swapped, name="in3"), 1, 3),
                      swapped])
    with pytest.raises(ValueError, match="node 'in3'.*SwapAxis 'sw'.*elsewhere"):
        mx_instnorm.from_native(s)
    with pytest.raises(ValueError, match="is none of these"):
        mx_instnorm.from_native("no-such-symbol.json")
    with pytest.raises(ValueError, match="not an MXNet graph"):
        mx_instnorm.from_native('{"a": 1}')
    with pytest.raises(TypeError, match="got int"):
        mx_instnorm.from_native(3)


def test_single_swap_is_kept_around_an_axis_1_node(rng):
    # Only one transpose: the node converts alone, the SwapAxis stays.
    x = mx.sym.var("x")
    s = mx.sym.InstanceNorm(mx.sym.SwapAxis(x, 1, 2), eps=1e-5, name="in1")
    ours = mx_instnorm.from_native(s)
    assert _ops(ours).count("SwapAxis") == 1
    data, gamma, beta = random_inputs(rng, (2, 4, 3, 5), 2, np.float32)
    args = {"x": mx.nd.array(data), "in1_gamma": mx.nd.array(gamma),
            "in1_beta": mx.nd.array(beta)}
    np.testing.assert_allclose(ours.eval(**args)[0].asnumpy(),
                               s.eval(**args)[0].asnumpy(), **BUILTIN_TOL)


def test_symbol_block_swapped_in_place_keeps_params_and_accumulates(rng, tmp_path):
    sym_file, params_file, x = _exported(
        tmp_path, [nn.Conv2D(4, 3, in_channels=3), nn.InstanceNorm(axis=-1, in_channels=4),
                   nn.InstanceNorm(in_channels=4)], (2, 3, 6, 6), rng)
    builtin = _imports(sym_file, params_file)
    ours = _imports(sym_file, params_file)
    swapped = mx_instnorm.gluon.swap_instance_norm(ours)
    assert [s.path for s in swapped] == [""]
    assert not {"InstanceNorm", "SwapAxis"} & set(_ops(ours._cached_graph[1]))
    assert sorted(ours.collect_params()) == sorted(builtin.collect_params())
    np.testing.assert_allclose(ours(x).asnumpy(), builtin(x).asnumpy(), **BUILTIN_TOL)
    dy = mx.nd.array(rng.standard_normal(ours(x).shape))
    grads = {}
    for name, block in (("builtin", builtin), ("ours", ours)):
        block.collect_params().setattr("grad_req", "add")
        block.collect_params().zero_grad()
        for _ in range(2):
            with mx.autograd.record():
                y = block(x)
            y.backward(dy)
        grads[name] = {k: p.grad().asnumpy() for k, p in block.collect_params().items()}
    for k, want in grads["builtin"].items():
        assert np.abs(want).max() > 0, k
        np.testing.assert_allclose(grads["ours"][k], want, rtol=1e-3, atol=1e-3,
                                   err_msg=k)
    # Nothing left to convert: a warning says what was searched.
    with pytest.warns(UserWarning, match="found nothing to replace.*SymbolBlock"):
        assert mx_instnorm.gluon.swap_instance_norm(ours) == []
    # And back: the built-in again.
    back = mx_instnorm.gluon.swap_instance_norm(ours, to="builtin")
    assert len(back) == 1 and not set(OURS) & set(_ops(ours._cached_graph[1]))
    np.testing.assert_allclose(ours(x).asnumpy(), builtin(x).asnumpy(), **BUILTIN_TOL)


def test_load_checkpoint_and_module(rng, tmp_path):
    sym_file, params_file, x = _exported(
        tmp_path, [nn.Conv2D(4, 3, in_channels=3), nn.InstanceNorm(axis=-1, in_channels=4)],
        (2, 3, 6, 6), rng)
    prefix = sym_file[:-len("-symbol.json")]
    sym, arg_params, aux_params = mx.model.load_checkpoint(prefix, 0)
    outputs = {}
    for name, graph in (("builtin", sym), ("ours", mx_instnorm.from_native(sym))):
        mod = mx.mod.Module(graph, data_names=["data"], label_names=None)
        mod.bind(data_shapes=[("data", x.shape)], for_training=False)
        mod.set_params(arg_params, aux_params)
        mod.forward(mx.io.DataBatch([x]), is_train=False)
        outputs[name] = mod.get_outputs()[0].asnumpy()
    np.testing.assert_allclose(outputs["ours"], outputs["builtin"], **BUILTIN_TOL)


def test_rank_7_converted_graph_infers_shapes_in_a_fresh_process(tmp_path):
    # MXNet 1.9.1's library shape-inference shim overflows a heap buffer when
    # gamma/beta have unknown rank; mx.sym.InstanceNorm's variables have no
    # shape, so the converted graph must declare them.
    code = textwrap.dedent("""
        import os, mxnet as mx, mx_instnorm
        x = mx.sym.var("x")
        s = mx.sym.SwapAxis(mx.sym.InstanceNorm(mx.sym.SwapAxis(x, 1, 4), name="n"), 1, 4)
        graphs = [mx_instnorm.from_native(s.tojson())]
        if mx_instnorm.COMPILED_OP is not None:
            # A Custom graph (its gamma/beta have no shape) made compiled.
            backend = os.environ.get("MX_INSTNORM_BACKEND", "auto")
            os.environ["MX_INSTNORM_BACKEND"] = "python"
            custom = mx_instnorm.sym.InstanceNorm(x, axis=4, name="n")
            os.environ["MX_INSTNORM_BACKEND"] = backend
            graphs.append(mx_instnorm.to_compiled(custom.tojson()))
        for graph in graphs:
            for _ in range(20):
                args, outs, _ = graph.infer_shape(x=(2, 3, 4, 2, 5, 2, 3))
                assert outs == [(2, 3, 4, 2, 5, 2, 3)], outs
                assert args[1:] == [(5,), (5,)], args
        print("ok", mx_instnorm.backend())
    """)
    env = dict(os.environ, MALLOC_CHECK_="3")
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", mx_instnorm.backend()]


def test_inference_graph_has_no_views(rng, tmp_path):
    sym_file, params_file, x = _exported(
        tmp_path, [nn.Conv2D(4, 3, in_channels=3), nn.InstanceNorm(axis=-1, in_channels=4),
                   nn.InstanceNorm(in_channels=4)], (2, 3, 6, 6), rng)
    want = _imports(sym_file, params_file)(x).asnumpy()
    training = mx_instnorm.from_native(sym_file)
    inference = mx_instnorm.from_native(sym_file, for_training=False)
    assert _interface(inference) == _interface(training)
    compiled = mx_instnorm.backend() == "compiled"
    # Two views (gamma, beta) per layer for training on the compiled backend.
    assert _ops(training).count("_copy") == (4 if compiled else 0)
    assert _ops(inference).count("_copy") == 0
    block = _imports(sym_file, params_file)
    block._cached_graph = block._cached_graph[0], inference
    np.testing.assert_allclose(block(x).asnumpy(), want, **BUILTIN_TOL)
    # A swapped Gluon net's own export: its views go too (compiled nodes
    # already there are rebuilt without them).
    net = nn.HybridSequential(prefix="sw_")
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, in_channels=3), nn.InstanceNorm(in_channels=4))
    net.initialize()
    mx_instnorm.gluon.swap_instance_norm(net)
    net.hybridize()
    want = net(x).asnumpy()
    net.export(str(tmp_path / "sw"))
    exported = mx.sym.load(str(tmp_path / "sw-symbol.json"))
    stripped = mx_instnorm.from_native(exported, for_training=False)
    assert _ops(exported).count("_copy") == (2 if compiled else 0)
    assert _ops(stripped).count("_copy") == 0
    assert _interface(stripped) == _interface(exported)
    block = _imports(str(tmp_path / "sw-symbol.json"), str(tmp_path / "sw-0000.params"))
    block._cached_graph = block._cached_graph[0], stripped
    np.testing.assert_allclose(block(x).asnumpy(), want, rtol=1e-5, atol=1e-5)
