"""grad_req='add' (and mixed requests) on every backend and entry point.

MXNet 1.9.1 does not pass ``req`` to a library operator, so the compiled
operator always writes its gradients; the package keeps 'add' correct by
feeding it through views (see mx_instnorm.operator.functions). Each test
runs backward twice with 'add' and expects twice the float64 closed-form
gradient of conftest's ``ref_backward``; 'write' expects it once and
'null' leaves the buffer alone.
"""
import json
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm
from mx_instnorm.operator import _grad_reqs
from conftest import CHAIN_TOL, random_inputs, ref_backward, tol

SHAPE, AXIS, EPS = (2, 3, 5, 4), 1, 1e-3
TOL = CHAIN_TOL
# name -> grad_req; every combination a user meets: all add, mixed, null.
REQS = [
    {"data": "add", "gamma": "add", "beta": "add"},
    {"data": "add", "gamma": "write", "beta": "null"},
    {"data": "write", "gamma": "add", "beta": "add"},
    {"data": "null", "gamma": "add", "beta": "write"},
]


def _expected(req, ref, passes=2, initial=0.0):
    """What a gradient buffer holds after ``passes`` backward passes."""
    if req == "add":
        return initial + passes * ref
    if req == "write":
        return ref
    return None


def _check(got, reqs, refs, initial=0.0):
    """``got`` holds the buffers after two passes; a 'null' buffer present
    in ``got`` must still hold exactly ``initial``."""
    for name, ref in refs.items():
        want = _expected(reqs[name], ref, initial=initial)
        if want is not None:
            np.testing.assert_allclose(got[name], want, err_msg=name, **TOL)
        elif name in got:
            assert (got[name] == initial).all(), "%s: grad_req 'null' wrote its buffer" % name


def _data(rng):
    x, g, b = random_inputs(rng, SHAPE, AXIS, np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    dx, dg, db = ref_backward(dy, x, g, EPS, AXIS)
    return (x, g, b, dy), {"data": dx, "gamma": dg, "beta": db}


@pytest.mark.parametrize("reqs", REQS, ids=lambda r: "-".join(r.values()))
def test_nd_autograd(rng, reqs):
    (x, g, b, dy), refs = _data(rng)
    arrays = {"data": mx.nd.array(x), "gamma": mx.nd.array(g), "beta": mx.nd.array(b)}
    for name, a in arrays.items():
        if reqs[name] != "null":
            a.attach_grad(reqs[name])
            a.grad[:] = 0.25  # 'add' adds to what is there
    for _ in range(2):
        with mx.autograd.record():
            y = mx_instnorm.nd.InstanceNorm(arrays["data"], arrays["gamma"],
                                            arrays["beta"], eps=EPS)
        y.backward(mx.nd.array(dy))
    got = {n: a.grad.asnumpy() for n, a in arrays.items() if reqs[n] != "null"}
    for name, ref in refs.items():
        if reqs[name] == "add":
            np.testing.assert_allclose(got[name], 0.25 + 2 * ref, err_msg=name, **TOL)
        elif reqs[name] == "write":
            np.testing.assert_allclose(got[name], ref, err_msg=name, **TOL)


def _sym():
    return mx_instnorm.sym.InstanceNorm(mx.sym.var("data"), mx.sym.var("gamma"),
                                        mx.sym.var("beta"), eps=EPS, name="in1")


@pytest.mark.parametrize("reqs", REQS + ["add"], ids=lambda r: r if isinstance(r, str)
                         else "-".join(r.values()))
def test_simple_bind(rng, reqs):
    (x, g, b, dy), refs = _data(rng)
    exe = _sym().simple_bind(mx.cpu(), data=SHAPE, grad_req=reqs)
    reqs = dict.fromkeys(refs, reqs) if isinstance(reqs, str) else reqs
    for name, value in (("data", x), ("gamma", g), ("beta", b)):
        exe.arg_dict[name][:] = value
        if reqs[name] != "null":
            exe.grad_dict[name][:] = 0
    for _ in range(2):
        exe.forward(is_train=True)
        exe.backward([mx.nd.array(dy)])
    _check({n: exe.grad_dict[n].asnumpy() for n in refs if reqs[n] != "null"}, reqs, refs)


@pytest.mark.parametrize("reqs", REQS, ids=lambda r: "-".join(r.values()))
def test_bind_with_gradient_buffers(rng, reqs):
    """Every argument has a gradient buffer holding 0.25 (bind's args_grad):
    'add' adds to it, 'write' overwrites it, 'null' leaves it alone."""
    (x, g, b, dy), refs = _data(rng)
    args = {"data": mx.nd.array(x), "gamma": mx.nd.array(g), "beta": mx.nd.array(b)}
    grads = {name: mx.nd.full(a.shape, 0.25) for name, a in args.items()}
    exe = _sym().bind(mx.cpu(), args, args_grad=grads, grad_req=reqs)
    for _ in range(2):
        exe.forward(is_train=True)
        exe.backward([mx.nd.array(dy)])
    _check({n: grads[n].asnumpy() for n in refs}, reqs, refs, initial=0.25)


def test_module_add(rng):
    (x, g, b, dy), refs = _data(rng)
    mod = mx.mod.Module(mx.sym.MakeLoss(_sym() * mx.sym.var("dy")),
                        data_names=["data", "dy"], label_names=None)
    mod.bind(data_shapes=[("data", SHAPE), ("dy", SHAPE)], grad_req="add",
             inputs_need_grad=True)
    mod.init_params(arg_params={"gamma": mx.nd.array(g), "beta": mx.nd.array(b)})
    batch = mx.io.DataBatch([mx.nd.array(x), mx.nd.array(dy)])
    for exe in mod._exec_group.execs:
        for arr in exe.grad_arrays:
            if arr is not None:
                arr[:] = 0
    for _ in range(2):
        mod.forward(batch, is_train=True)
        mod.backward()
    exe = mod._exec_group.execs[0]
    got = {n: exe.grad_dict[n].asnumpy() for n in refs}
    _check(got, dict.fromkeys(refs, "add"), refs)


def _block(g, b):
    """Our block with scale and the given gamma/beta."""
    block = InstanceNorm(epsilon=EPS, scale=True, in_channels=SHAPE[1])
    block.initialize()
    block.gamma.set_data(mx.nd.array(g))
    block.beta.set_data(mx.nd.array(b))
    return block


def _two_add_passes(net, block, x, dy):
    """Two backward passes of ``net`` over data with grad_req 'add'; the
    gradients of the data and of ``block``'s parameters."""
    data = mx.nd.array(x)
    data.attach_grad("add")
    for _ in range(2):
        with mx.autograd.record():
            y = net(data)
        y.backward(mx.nd.array(dy))
    return {"data": data.grad.asnumpy(), "gamma": block.gamma.grad().asnumpy(),
            "beta": block.beta.grad().asnumpy()}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", ["imperative", "hybridize", "static"])
def test_gluon_add(rng, mode, when):
    """Parameters and data with grad_req='add', set before the first call or
    after the block ran (and was hybridized) with 'write'."""
    (x, g, b, dy), refs = _data(rng)
    block = _block(g, b)
    if mode == "hybridize":
        block.hybridize()
    elif mode == "static":
        block.hybridize(static_alloc=True, static_shape=True)
    if when == "after":
        with mx.autograd.record():
            block(mx.nd.array(x)).backward(mx.nd.array(dy))
    block.collect_params().setattr("grad_req", "add")
    block.collect_params().zero_grad()
    _check(_two_add_passes(block, block, x, dy), dict.fromkeys(refs, "add"), refs)


# A residual graph: h feeds our op and the sum, so its gradient is summed;
# with MXNET_EXEC_ENABLE_ADDTO=1 executors sum it in place (an op writes with
# req 'add'). Compared with the same graph on MXNet's built-in.
_ADDTO_SCRIPT = textwrap.dedent("""
    import sys
    import mxnet as mx, numpy as np, mx_instnorm
    assert mx_instnorm.backend() == sys.argv[1], mx_instnorm.backend_reason()
    rng = np.random.default_rng(5)
    shape = (2, 8, 6, 6)

    def net(norm):
        h = mx.sym.Convolution(mx.sym.var("data"), kernel=(3, 3), pad=(1, 1),
                               num_filter=8, name="c")
        return norm(h, mx.sym.var("gamma"), mx.sym.var("beta"), eps=1e-3, name="n") + h

    args = {"data": rng.standard_normal(shape), "c_weight": rng.standard_normal((8, 8, 3, 3)),
            "c_bias": rng.standard_normal(8), "gamma": rng.uniform(0.5, 1.5, 8),
            "beta": rng.standard_normal(8)}
    dy = mx.nd.array(rng.standard_normal(shape))
    results = []
    for norm in (mx_instnorm.sym.InstanceNorm, mx.sym.InstanceNorm):
        exe = net(norm).simple_bind(mx.cpu(), data=shape, grad_req="add")
        for k, v in args.items():
            exe.arg_dict[k][:] = v
            exe.grad_dict[k][:] = 0
        for _ in range(2):
            exe.forward(is_train=True)
            exe.backward([dy])
        results.append({k: exe.grad_dict[k].asnumpy() for k in args})
    for k in args:
        want = results[1][k]
        np.testing.assert_allclose(results[0][k], want, rtol=1e-3,
                                   atol=1e-3 * max(1, np.abs(want).max()), err_msg=k)
    print("ok")
""")


def test_exec_enable_addto(mx_backend, tmp_path):
    env = dict(__import__("os").environ, MXNET_EXEC_ENABLE_ADDTO="1")
    proc = subprocess.run([sys.executable, "-c", _ADDTO_SCRIPT, mx_backend],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("imperative_first", [False, True])
def test_gluon_add_inside_hybridized_parent(rng, imperative_first):
    """Our block as the first layer of a hybridized parent: the parent's
    input is the op's data. A call made before hybridizing (with data that
    has no gradient buffer) must not leave the graph without its view."""
    (x, g, b, dy), refs = _data(rng)
    net = mx.gluon.nn.HybridSequential()
    net.add(_block(g, b))
    if imperative_first:
        net(mx.nd.array(x))
    net.hybridize()
    net.collect_params().setattr("grad_req", "add")
    net.collect_params().zero_grad()
    _check(_two_add_passes(net, net[0], x, dy), dict.fromkeys(refs, "add"), refs)


def test_gluon_data_without_gradient_then_with(rng):
    """The top-level block rebuilds its graph when its data starts having a
    gradient buffer (the view for the data is only there when needed)."""
    (x, g, b, dy), refs = _data(rng)
    block = _block(g, b)
    block.hybridize()
    with mx.autograd.record():
        block(mx.nd.array(x)).backward(mx.nd.array(dy))
    got = _two_add_passes(block, block, x, dy)
    np.testing.assert_allclose(got["data"], 2 * refs["data"], **TOL)


# ---- the leaf's recorded request decides the view (compiled backend) ----



def _recorded_ops(y):
    """The operators autograd recorded for ``y`` (variables left out)."""
    nodes = json.loads(mx.autograd.get_symbol(y).tojson())["nodes"]
    return [n["op"] for n in nodes if n["op"] != "null"]


def test_leaf_requests_are_recorded_on_every_marking_path():
    """attach_grad, autograd.mark_variables (mixed requests), mx.np arrays
    and Gluon parameters all go through MXAutogradMarkVariables."""
    plain = mx.nd.ones((2, 3))
    assert _grad_reqs.leaf_grad_req(plain) is None
    for req in ("write", "add", "null"):
        a = mx.nd.ones((2, 3))
        a.attach_grad(req)
        assert _grad_reqs.leaf_grad_req(a) == req
    arrays = [mx.nd.ones(4) for _ in range(3)]
    mx.autograd.mark_variables(arrays, [mx.nd.zeros(4) for _ in arrays],
                               ["add", "write", "null"])
    assert [_grad_reqs.leaf_grad_req(a) for a in arrays] == ["add", "write", "null"]
    with mx.autograd.record():
        out = arrays[0] * 2
    assert _grad_reqs.leaf_grad_req(out) is None  # recorded, not a leaf
    with mx.util.np_shape(True), mx.util.np_array(True):
        n = mx.np.ones((2, 3))
        n.attach_grad("add")
        assert _grad_reqs.leaf_grad_req(n) == "add"
    param = mx.gluon.Parameter("w", shape=(3,), grad_req="add")
    param.initialize()
    assert _grad_reqs.leaf_grad_req(param.data()) == "add"
    param.grad_req = "write"
    assert _grad_reqs.leaf_grad_req(param.data()) == "write"


def test_one_buffer_given_two_requests_reads_unknown():
    a, b = mx.nd.ones(3), mx.nd.ones(3)
    shared = mx.nd.zeros(3)
    mx.autograd.mark_variables([a, b], [shared, shared], ["write", "add"])
    assert _grad_reqs.leaf_grad_req(a) == _grad_reqs.UNKNOWN
    assert _grad_reqs.leaf_grad_req(b) == _grad_reqs.UNKNOWN


def _recorded_grads_attr(y):
    """The per-call gradient destinations our op was given (None: none)."""
    nodes = json.loads(mx.autograd.get_symbol(y).tojson())["nodes"]
    ours = [n for n in nodes if n["op"] == "mx_instnorm_InstanceNorm"]
    return ours[0].get("attrs", {}).get("__mx_instnorm_grads__")


@pytest.mark.parametrize("forget", [False, True], ids=["recorded", "unrecorded"])
@pytest.mark.parametrize("req", ["write", "add", "null"])
def test_nd_leaves_feed_the_operator_directly(mx_backend, rng, monkeypatch, req, forget):
    """On the compiled backend a leaf whose request is known feeds the
    operator directly: 'write' gets its gradient written straight into the
    leaf's buffer, 'add' added to it in place, 'null' none computed. A leaf
    whose marking was not recorded (marked before mx_instnorm was imported)
    goes through a view. The gradients are right either way. The data gets
    ``req``, gamma and beta 'write'."""
    (x, g, b, dy), refs = _data(rng)
    arrays = [mx.nd.array(v) for v in (x, g, b)]
    for a, r in zip(arrays, (req, "write", "write")):
        a.attach_grad(r)
        a.grad[:] = 0.25
    mx.nd.waitall()  # the buffers allocated: 'add' in place needs their memory
    if forget:
        monkeypatch.setattr(_grad_reqs, "_records", {})
    for _ in range(2):
        with mx.autograd.record():
            y = mx_instnorm.nd.InstanceNorm(*arrays, eps=EPS)
        ops = _recorded_ops(y)
        grads = _recorded_grads_attr(y) if mx_backend == "compiled" else None
        y.backward(mx.nd.array(dy))
    if mx_backend == "compiled":
        # (After a backward pass MXNet drops a 'null' leaf's buffer.)
        data_view = forget and req != "null"
        assert ops.count("Reshape") == (2 if forget else 0) + data_view, ops
        if not forget:
            assert grads == {"write": None, "null": "-,w,w"}.get(req, grads)
            assert req != "add" or grads.startswith("+"), grads
    if req != "null":
        want = refs["data"] if req == "write" else 0.25 + 2 * refs["data"]
        np.testing.assert_allclose(arrays[0].grad.asnumpy(), want, **TOL)
    for a, name in zip(arrays[1:], ("gamma", "beta")):
        np.testing.assert_allclose(a.grad.asnumpy(), refs[name], err_msg=name, **TOL)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nd_add_in_place_and_shared_leaf(mx_backend, rng, dtype, axis):
    """'add' leaves, alone and shared with another operator: alone, the op
    adds into the leaf's buffer; shared, MXNet hands it a buffer of its own
    to sum afterwards, which it must write, not add to (whatever that
    buffer held). Both layouts of the kernel (channels first and last)."""
    shape = (2, 5, 7, 3) if axis == 1 else (2, 7, 3, 5)
    x, g, b = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dg, db = ref_backward(dy, x, g, EPS, axis)
    for shared in (False, True):
        arrays = [mx.nd.array(v, dtype=dtype) for v in (x, g, b)]
        for a in arrays:
            a.attach_grad("add")
            a.grad[:] = 0.5
        mx.nd.waitall()
        for _ in range(2):
            with mx.autograd.record():
                y = mx_instnorm.nd.InstanceNorm(*arrays, eps=EPS, axis=axis)
                if shared:  # d/dx of sum(dy * 3x) is 3 dy
                    y = y + 3 * arrays[0]
            y.backward(mx.nd.array(dy, dtype=dtype))
        extra = 3 * dy.astype(np.float64) if shared else 0
        for a, ref, name in zip(arrays, (dx + extra, dg, db), ("data", "gamma", "beta")):
            np.testing.assert_allclose(a.grad.asnumpy(), 0.5 + 2 * ref,
                                       err_msg="%s shared=%s" % (name, shared), **tol(dtype))


def test_nd_no_gradient_for_data_without_history(mx_backend, rng):
    """Data that is neither a leaf nor recorded gets no gradient computed
    (nothing written, no memory touched); gamma and beta get theirs."""
    (x, g, b, dy), refs = _data(rng)
    data = mx.nd.array(x)
    gamma, beta = mx.nd.array(g), mx.nd.array(b)
    for a in (gamma, beta):
        a.attach_grad()
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(data, gamma, beta, eps=EPS)
    if mx_backend == "compiled":
        assert _recorded_grads_attr(y) == "-,w,w"
    y.backward(mx.nd.array(dy))
    np.testing.assert_allclose(gamma.grad.asnumpy(), refs["gamma"], **TOL)
    np.testing.assert_allclose(beta.grad.asnumpy(), refs["beta"], **TOL)
    # Recorded data (a network's interior) keeps its gradient.
    leaf = mx.nd.array(x)
    leaf.attach_grad()
    with mx.autograd.record():
        y = mx_instnorm.nd.InstanceNorm(leaf * 1, gamma, beta, eps=EPS)
    y.backward(mx.nd.array(dy))
    np.testing.assert_allclose(leaf.grad.asnumpy(), refs["data"], **TOL)


@pytest.mark.parametrize("static", [False, True], ids=["hybridize", "static"])
@pytest.mark.parametrize("req", ["write", "add"])
def test_gluon_hybridized_block_runs_its_one_operator_directly(mx_backend, rng, req, static):
    """On the compiled backend the hybridized block, called on NDArrays,
    records its one operator as nd does (no views: each request is known)
    while the graph it keeps for export has every view (gamma, beta, data:
    it must stay right under any request it is bound with later)."""
    (x, g, b, dy), refs = _data(rng)
    block = _block(g, b)
    block.hybridize(static_alloc=static, static_shape=static)
    block.collect_params().setattr("grad_req", req)
    block.collect_params().zero_grad()
    data = mx.nd.array(x)
    data.attach_grad(req)
    mx.nd.waitall()
    for _ in range(2):
        with mx.autograd.record():
            y = block(data)
        recorded = _recorded_ops(y)
        y.backward(mx.nd.array(dy))
    if mx_backend == "compiled":
        assert recorded == ["mx_instnorm_InstanceNorm"], recorded
        graph = json.loads(block._cached_graph[1].tojson())
        ops = [n["op"] for n in graph["nodes"]]
        assert ops.count("_copy") == 3, ops
    passes = 2 if req == "add" else 1
    for name, got in (("data", data.grad), ("gamma", block.gamma.grad()),
                      ("beta", block.beta.grad())):
        np.testing.assert_allclose(got.asnumpy(), passes * refs[name], err_msg=name, **TOL)
