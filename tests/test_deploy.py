"""Deployment: swapping Gluon layers, native export, ONNX export.

Every export is loaded in a fresh Python process that imports only what a
deploying user has (mxnet + numpy, or onnxruntime + numpy) and checks that
``mx_instnorm`` was never imported there; inputs and outputs travel as .npy
files. The max differences are printed (``pytest -s``) for the record.
"""
import json
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

import mx_instnorm
from conftest import BUILTIN_TOL, SAME_TOL, tol
from mx_instnorm.gluon import InstanceNorm, swap_instance_norm
from mx_instnorm.graphs import onnx_export


def _run_fresh(code, cwd):
    """Runs ``code`` in a new interpreter in ``cwd``; it must not import us."""
    code = ("import sys\n" + textwrap.dedent(code)
            + "\nassert 'mx_instnorm' not in sys.modules, 'deploy side imported mx_instnorm'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(cwd), timeout=300)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class StyleNet(gluon.HybridBlock):
    """GluonCV-style: layers built with nn.InstanceNorm, in a Sequential and
    as an attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential()
            self.features.add(nn.Conv2D(8, 3, padding=1, in_channels=3),
                              nn.InstanceNorm(in_channels=8, scale=True),
                              nn.Activation("relu"),
                              nn.Conv2D(5, 3, padding=1, in_channels=8))
            self.head_norm = nn.InstanceNorm(axis=-1)

    def hybrid_forward(self, F, x):
        return self.head_norm(self.features(x))


def _style_net(rng):
    net = StyleNet(prefix="style_")
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(rng.standard_normal((2, 3, 6, 7)))
    net(x)  # completes deferred init
    # Non-trivial gamma/beta, so that a lost or swapped parameter shows.
    for name, p in net.collect_params().items():
        if name.endswith(("gamma", "beta")):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
    return net, x


def _reference_then_hybridize(net, x):
    """Our output for ``x``, imperative and hybridized, which must agree
    (a hybridized Conv2D -> Custom graph once read freed oneDNN memory);
    leaves ``net`` hybridized and run once, as export needs."""
    y = net(x).asnumpy()
    net.hybridize()
    np.testing.assert_allclose(net(x).asnumpy(), y, **SAME_TOL)
    return y


def _graph_ops(symbol):
    return [n["op"] for n in json.loads(symbol.tojson())["nodes"]]


OUR_OPS = {"Custom", "mx_instnorm_InstanceNorm"}


def _assert_builtin_only(symbol):
    """The graph computes with MXNet's InstanceNorm and holds neither of our
    node kinds (the CustomOp's nor the compiled operator's)."""
    ops = _graph_ops(symbol)
    assert not OUR_OPS & set(ops), ops
    assert "InstanceNorm" in ops, ops


# ------------------------------------------------------------------- swap --

def test_swap_keeps_parameters_order_and_outputs(rng):
    net, x = _style_net(rng)
    y_builtin = net(x).asnumpy()
    net.hybridize()
    net(x)  # caches a graph with the builtin layers
    params_before = dict(net.collect_params().items())
    keys_before = list(net.features._children)
    old_norm = net.features[1]

    swapped = swap_instance_norm(net)

    assert [s.path for s in swapped] == ["features.1", "head_norm"]
    assert all(type(s.new) is InstanceNorm for s in swapped)
    assert swapped[0].old is old_norm and net.features[1] is swapped[0].new
    assert net.head_norm is swapped[1].new and net._children["head_norm"] is net.head_norm
    assert list(net.features._children) == keys_before
    params_after = dict(net.collect_params().items())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    assert net.head_norm._kwargs == {"eps": 1e-5, "axis": -1, "center": True, "scale": False}
    assert net.features[1].gamma.grad_req == "write"
    assert net.head_norm._active  # hybridization state carried over
    assert net._cached_graph == ()  # the stale graph is gone...
    y_ours = net(x).asnumpy()
    ops = _graph_ops(net._cached_graph[1])
    assert OUR_OPS & set(ops) and "InstanceNorm" not in ops  # ...rebuilt with our op
    print("\nswap builtin -> ours: max|diff| = %.3g" % _max_diff(y_ours, y_builtin))
    np.testing.assert_allclose(y_ours, y_builtin, **BUILTIN_TOL)

    back = swap_instance_norm(net, to="builtin")
    assert [s.path for s in back] == ["features.1", "head_norm"]
    assert type(net.features[1]) is nn.InstanceNorm and type(net.head_norm) is nn.InstanceNorm
    assert all(net.collect_params()[k] is params_before[k] for k in params_before)
    np.testing.assert_allclose(net(x).asnumpy(), y_builtin, **SAME_TOL)
    net.hybridize()
    net(x)
    _assert_builtin_only(net._cached_graph[1])


def test_swap_shared_block_replaced_once_everywhere():
    norm = nn.InstanceNorm(in_channels=2)
    outer = nn.HybridSequential()
    inner = nn.HybridSequential()
    inner.add(norm)
    outer.add(inner, norm, inner)  # one block reached through three paths
    swapped = swap_instance_norm(outer)
    assert len(swapped) == 1 and swapped[0].path == "0.0"
    assert outer[1] is inner[0] is swapped[0].new


def test_swap_checkpoints_load_on_either_side(rng, tmp_path):
    builtin, x = _style_net(rng)
    builtin.save_parameters(str(tmp_path / "builtin.params"))
    ours, _ = _style_net(np.random.default_rng(7))
    swap_instance_norm(ours)
    ours.load_parameters(str(tmp_path / "builtin.params"))
    np.testing.assert_allclose(ours(x).asnumpy(), builtin(x).asnumpy(), **BUILTIN_TOL)

    ours.save_parameters(str(tmp_path / "ours.params"))
    fresh, _ = _style_net(np.random.default_rng(8))
    fresh.load_parameters(str(tmp_path / "ours.params"))
    np.testing.assert_allclose(fresh(x).asnumpy(), builtin(x).asnumpy(), **SAME_TOL)


def test_swap_errors():
    net = nn.HybridSequential()
    net.add(nn.InstanceNorm(in_channels=2))
    with pytest.raises(ValueError, match="'torch'"):
        swap_instance_norm(net, to="torch")
    with pytest.raises(TypeError, match="expects a gluon Block, got list"):
        swap_instance_norm([net])
    with pytest.raises(ValueError, match="is itself the InstanceNorm to replace"):
        swap_instance_norm(net[0])
    ours = nn.HybridSequential()
    ours.add(InstanceNorm(in_channels=2))
    ours.initialize()
    ours.cast("float64")
    with pytest.raises(TypeError, match="float64"):
        swap_instance_norm(ours, to="builtin")


# ----------------------------------------------------------------- native --

@pytest.mark.parametrize("axis", [1, 2, -1])
@pytest.mark.parametrize("with_shapes", [False, True])
def test_to_native_matches_ours(rng, axis, with_shapes):
    shape = (2, 3, 4, 5)
    s = mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), axis=axis, eps=1e-5, name="in1")
    native = mx_instnorm.to_native(s, shapes={"x": shape} if with_shapes else None)
    _assert_builtin_only(native)
    assert native.list_arguments() == s.list_arguments()
    assert native.list_outputs() == s.list_outputs()
    channels = shape[axis]
    args = {"x": mx.nd.array(rng.standard_normal(shape)),
            "in1_gamma": mx.nd.array(rng.uniform(0.5, 1.5, channels)),
            "in1_beta": mx.nd.array(rng.uniform(-1, 1, channels))}
    np.testing.assert_allclose(native.eval(**args)[0].asnumpy(),
                               s.eval(**args)[0].asnumpy(), **BUILTIN_TOL)


def test_to_native_leaves_other_nodes_alone():
    x = mx.sym.var("x")
    s = mx.sym.relu(mx_instnorm.sym.InstanceNorm(mx.sym.FullyConnected(x, num_hidden=4), name="n"))
    # Our fragment's nodes (the op, its views and guards) are all named n...
    before = [n for n in json.loads(s.tojson())["nodes"] if not n["name"].startswith("n")]
    after = json.loads(mx_instnorm.to_native(s).tojson())["nodes"]
    assert [n["name"] for n in before if n["op"] != "null"] == \
        [n["name"] for n in after if n["op"] not in ("null", "InstanceNorm")]
    # ...and become the built-in alone: it needs neither layout guards nor
    # views (it honours grad_req='add' itself).
    assert [n["op"] for n in after if n["name"].startswith("n")] == \
        ["null", "null", "InstanceNorm"]


def test_to_native_refusals():
    s = mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), axis=-1, name="in1")
    with pytest.raises(TypeError, match="node 'in1(_op)?' computes in float64"):
        mx_instnorm.to_native(s, dtypes={"x": np.float64})
    with pytest.raises(TypeError, match="node 'in1(_op)?' computes in float16"):
        mx_instnorm.to_native(s, dtypes={"x": np.float16, "in1_gamma": np.float16,
                                         "in1_beta": np.float16})
    with pytest.raises(ValueError, match=r"could not infer the graph's shapes from "
                                         r"\{'x': \(2, 3\)\}: .*rank >= 3"):
        mx_instnorm.to_native(s, shapes={"x": (2, 3)})
    with pytest.raises(TypeError, match="expects an mxnet Symbol, got str"):
        mx_instnorm.to_native("in1")


def test_export_native_refusals(tmp_path):
    net = nn.HybridSequential()
    net.add(InstanceNorm(in_channels=3))
    net.initialize()
    with pytest.raises(RuntimeError, match="hybridize"):
        mx_instnorm.export_native(net, str(tmp_path / "m"))
    with pytest.raises(TypeError, match="expects a HybridBlock, got Block"):
        mx_instnorm.export_native(gluon.Block(), str(tmp_path / "m"))
    net.cast("float64")
    net.hybridize()
    net(mx.nd.ones((1, 3, 4), dtype="float64") * mx.nd.arange(4, dtype="float64"))
    with pytest.raises(TypeError, match="computes in float64"):
        mx_instnorm.export_native(net, str(tmp_path / "m"))
    assert not list(tmp_path.iterdir())  # refused before writing anything


class _TakeNet(gluon.HybridBlock):
    """turicreate style transfer's shape: per-item channel weights picked by
    ``take`` with an index that is a graph input, then our InstanceNorm."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.table = self.params.get("table", shape=(4, 3))
            self.norm = InstanceNorm(in_channels=3, center=True, scale=True)

    def hybrid_forward(self, F, x, index, table):
        weights = F.take(table, index)  # (N, C)
        return self.norm(F.broadcast_mul(x, F.expand_dims(weights, axis=2)))


_TAKE_NATIVE_CODE = """
import numpy as np, mxnet as mx
net = mx.gluon.SymbolBlock.imports('take-symbol.json', ['data0', 'data1'], 'take-0000.params')
x, index = np.load('x.npy'), np.load('index.npy')
y = net(mx.nd.array(x), mx.nd.array(index, dtype=index.dtype))
np.save('y_native.npy', y.asnumpy())
"""


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("form", ["dict", "list", "arrays", "types"])
def test_export_native_with_input_dtypes(rng, tmp_path, index_dtype, form):
    net = _TakeNet(prefix="take_")
    net.initialize(mx.init.Uniform(1.0))
    net.norm.gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, 3)))
    net.norm.beta.set_data(mx.nd.array(rng.standard_normal(3)))
    net.hybridize()
    x = rng.standard_normal((2, 3, 7)).astype(np.float32)
    index = np.array([3, 1], dtype=index_dtype)
    inputs = (mx.nd.array(x), mx.nd.array(index, dtype=index_dtype))
    y = net(*inputs).asnumpy()
    # Independent reference: the take and the normalization in float64.
    table = net.table.data().asnumpy().astype(np.float64)
    h = x * table[index][:, :, None]
    d = h - h.mean(axis=2, keepdims=True)
    ref = (d / np.sqrt(d.var(axis=2, keepdims=True) + 1e-5)
           * net.norm.gamma.data().asnumpy()[:, None] + net.norm.beta.data().asnumpy()[:, None])
    np.testing.assert_allclose(y, ref, **tol(np.float32))

    prefix = str(tmp_path / "take")
    # Without the index dtype, inference stops at take: a ValueError naming
    # the input, nothing written.
    with pytest.raises(ValueError, match="inputs without a dtype: data0, data1"):
        mx_instnorm.export_native(net, prefix)
    assert not list(tmp_path.iterdir())
    # "types": NumPy scalar types (np.int32), which have a `dtype`
    # attribute of their own (a descriptor, not a dtype).
    dtypes = {"dict": {"data1": index_dtype}, "list": [None, index_dtype],
              "arrays": list(inputs),
              "types": {"data0": np.float32, "data1": np.dtype(index_dtype).type}}[form]
    mx_instnorm.export_native(net, prefix, dtypes=dtypes)
    _assert_builtin_only(mx.sym.load(prefix + "-symbol.json"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "index.npy", index)
    _run_fresh(_TAKE_NATIVE_CODE, tmp_path)
    y_native = np.load(tmp_path / "y_native.npy")
    print("\nnative export with take(%s): max|diff| = %.3g"
          % (index_dtype, _max_diff(y_native, y)))
    np.testing.assert_allclose(y_native, y, **tol(np.float32))


def test_export_native_dtypes_refusals(tmp_path):
    net = _TakeNet(prefix="take_")
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((1, 3, 4)), mx.nd.array([1], dtype="int32"))
    prefix = str(tmp_path / "take")
    with pytest.raises(ValueError, match=r"dtypes names 'index', which is not among the "
                                         r"block's inputs \['data0', 'data1'\]"):
        mx_instnorm.export_native(net, prefix, dtypes={"index": "int32"})
    with pytest.raises(ValueError, match="dtypes has 1 entries, but the block has 2 inputs"):
        mx_instnorm.export_native(net, prefix, dtypes=["int32"])
    with pytest.raises(TypeError, match="dtypes must be a dict of input name to dtype"):
        mx_instnorm.export_native(net, prefix, dtypes="int32")
    with pytest.raises(TypeError, match="dtypes\\['data1'\\] is not a dtype: 'integer please'"):
        mx_instnorm.export_native(net, prefix, dtypes={"data1": "integer please"})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- ONNX --

def test_import_without_onnx_registers_nothing(tmp_path):
    # `None` in sys.modules makes `import onnx` raise ImportError.
    code = """
        sys.modules['onnx'] = None
        import mx_instnorm
        from mx_instnorm.graphs import onnx_export
        assert onnx_export.register() is False
    """
    subprocess.run([sys.executable, "-c", "import sys\n" + textwrap.dedent(code)],
                   check=True, cwd=str(tmp_path), timeout=300)


def test_onnx_custom_dispatch():
    calls = []
    convert = onnx_export._custom_converter(lambda node, **kw: calls.append(node) or ["x"])
    foreign = {"op": "Custom", "name": "f", "attrs": {"op_type": "someone.Else"}, "inputs": []}
    assert convert(foreign) == ["x"] and calls == [foreign]
    with pytest.raises(AttributeError, match="op_type 'someone.Else'"):
        onnx_export._custom_converter(None)(foreign)


def test_onnx_identity_reshape_becomes_identity():
    assert onnx_export._is_identity_reshape({"shape": "(-2,)"})
    assert not onnx_export._is_identity_reshape({"shape": "(0, -1)"})
    calls = []
    convert = onnx_export._reshape_converter(lambda node, **kw: calls.append(node) or ["r"])
    other = {"op": "Reshape", "name": "r", "attrs": {"shape": "(0, -1)"}, "inputs": []}
    assert convert(other) == ["r"] and calls == [other]


# MXNet 1.6 and 1.7's partial type inference stops at operators (Convolution)
# whose input has no dtype; 1.8 and later infer past them.
_STRICT_TYPE_INFERENCE = tuple(int(p) for p in mx.__version__.split(".")[:2]) < (1, 8)


def _skip_without_onnx():
    """Skips, with the reason, where the ONNX export cannot run: mx.onnx is
    MXNet 1.9's (1.8 and older have only mx.contrib.onnx, which takes no
    converters of ours), and onnx/onnxruntime are optional."""
    if not hasattr(mx, "onnx"):
        pytest.skip("mxnet %s has no mx.onnx (the ONNX exporter mx_instnorm "
                    "registers with is MXNet 1.9's)" % mx.__version__)
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")


def _export_onnx(net, x, path):
    _skip_without_onnx()
    import onnx
    net.export(str(path))  # the graph with our op, as a user would save it
    out = mx.onnx.export_model(str(path) + "-symbol.json", str(path) + "-0000.params",
                               [x.shape], [np.float32], str(path) + ".onnx")
    model = onnx.load(out)
    onnx.checker.check_model(model)
    return out, [n.op_type for n in model.graph.node]


_ORT_CODE = """
    import numpy as np, onnxruntime as ort
    ort.set_default_logger_severity(3)
    sess = ort.InferenceSession('{model}', providers=['CPUExecutionProvider'])
    np.save('y_onnx.npy', sess.run(None, {{'data': np.load('x.npy')}})[0])
"""


@pytest.mark.parametrize("axis", [1, -1])
def test_onnx_conv_instance_norm(rng, tmp_path, axis):
    _skip_without_onnx()
    net = nn.HybridSequential(prefix="small_")
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, padding=1, in_channels=3),
                InstanceNorm(axis=axis, scale=True), nn.Activation("relu"))
    net.initialize(mx.init.Xavier())
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    net(mx.nd.array(x))
    for name, p in net.collect_params().items():
        if name.endswith(("gamma", "beta")):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
    y = _reference_then_hybridize(net, mx.nd.array(x))
    model, ops = _export_onnx(net, x, tmp_path / "small")
    assert "InstanceNormalization" in ops and ("Transpose" in ops) == (axis != 1)
    np.save(tmp_path / "x.npy", x)
    _run_fresh(_ORT_CODE.format(model=model), tmp_path)
    y_onnx = np.load(tmp_path / "y_onnx.npy")
    print("\nONNX axis %d: max|diff| = %.3g" % (axis, _max_diff(y_onnx, y)))
    np.testing.assert_allclose(y_onnx, y, **BUILTIN_TOL)


# ------------------------------------------------------------- acceptance --

_NATIVE_CODE = """
    import numpy as np, mxnet as mx
    x = np.load('x.npy')
    blk = mx.gluon.SymbolBlock.imports('style-symbol.json', ['data'], 'style-0000.params')
    np.save('y_symbolblock.npy', blk(mx.nd.array(x)).asnumpy())
    sym, arg_params, aux_params = mx.model.load_checkpoint('style', 0)
    mod = mx.mod.Module(sym, data_names=['data'], label_names=None)
    mod.bind(data_shapes=[('data', x.shape)], for_training=False)
    mod.set_params(arg_params, aux_params)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    np.save('y_module.npy', mod.get_outputs()[0].asnumpy())
"""


def test_acceptance_swap_train_export_deploy(rng, tmp_path):
    net, x = _style_net(rng)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    y_builtin = net(x).asnumpy()

    assert len(swap_instance_norm(net)) == 2  # one call swaps both layers
    y_swapped = net(x).asnumpy()
    print("\nacceptance swap: max|diff| = %.3g" % _max_diff(y_swapped, y_builtin))
    np.testing.assert_allclose(y_swapped, y_builtin, **BUILTIN_TOL)

    gamma = net.features[1].gamma
    gamma_before = gamma.data().asnumpy()
    target = mx.nd.array(rng.standard_normal(y_builtin.shape))
    with autograd.record():
        loss = ((net(x) - target) ** 2).mean()
    loss.backward()
    trainer.step(x.shape[0])
    assert not np.allclose(gamma.data().asnumpy(), gamma_before)  # it trained

    x_test = rng.standard_normal(x.shape).astype(np.float32)
    y_ours = _reference_then_hybridize(net, mx.nd.array(x_test))
    np.save(tmp_path / "x.npy", x_test)

    if _STRICT_TYPE_INFERENCE:
        # MXNet < 1.8 infers no dtype past a Convolution whose data has
        # none: a clear refusal naming the input, then the documented fix.
        with pytest.raises(ValueError, match="inputs without a dtype: data "):
            mx_instnorm.export_native(net, str(tmp_path / "style"))
        mx_instnorm.export_native(net, str(tmp_path / "style"), dtypes={"data": "float32"})
    else:
        mx_instnorm.export_native(net, str(tmp_path / "style"))
    _assert_builtin_only(mx.sym.load(str(tmp_path / "style-symbol.json")))
    _run_fresh(_NATIVE_CODE, tmp_path)
    for path in ("symbolblock", "module"):
        y_native = np.load(tmp_path / ("y_%s.npy" % path))
        print("acceptance native via %s: max|diff| = %.3g" % (path, _max_diff(y_native, y_ours)))
        np.testing.assert_allclose(y_native, y_ours, **BUILTIN_TOL)

    _skip_without_onnx()
    model, ops = _export_onnx(net, x_test, tmp_path / "style_onnx")
    assert ops.count("InstanceNormalization") == 2 and ops.count("Transpose") == 2
    _run_fresh(_ORT_CODE.format(model=model), tmp_path)
    y_onnx = np.load(tmp_path / "y_onnx.npy")
    print("acceptance ONNX: max|diff| = %.3g" % _max_diff(y_onnx, y_ours))
    np.testing.assert_allclose(y_onnx, y_ours, **BUILTIN_TOL)
