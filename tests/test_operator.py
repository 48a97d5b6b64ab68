"""The operator: mx_instnorm.nd/sym.InstanceNorm and the raw CustomOp,
against MXNet's built-in InstanceNorm (float32, axis 1), the float64 NumPy
reference, finite differences and the documented example; every
correctness test runs under both computation paths (the ``path`` fixture).
"""
import numpy as np
import pytest

import mxnet as mx
import mx_instnorm
from mx_instnorm.operator import InstanceNormProp

from conftest import (BUILTIN_SHAPES, BUILTIN_TOL, DOC_ATOL, DTYPES, FD_TOL, LARGE_SHAPES_AXES,
                      SHAPES_AXES,
                      assert_close, random_inputs, ref_backward, ref_forward)

# Seed 000 (the nd docstring of mx.nd.InstanceNorm), eps default 1e-3.
DOC_X = [[[1.1, 2.2]], [[3.3, 4.4]]]
DOC_GAMMA, DOC_BETA = [1.5], [0.5]
DOC_Y = np.array([[[-0.997527, 1.99752665]], [[-0.99752653, 1.99752724]]])
# The printed numbers carry the built-in's float32 noise.


def _nd(a):
    return mx.nd.array(a, dtype=a.dtype)


def autograd_run(fn, arrays, dy, grad_req="write"):
    """``fn`` on NDArray copies of ``arrays`` under autograd; returns the
    output and the gradients of every input, as NumPy arrays."""
    nds = [_nd(a) for a in arrays]
    for a in nds:
        a.attach_grad(grad_req)
    with mx.autograd.record():
        y = fn(*nds)
    y.backward(_nd(dy))
    return y.asnumpy(), [a.grad.asnumpy() for a in nds]


def ours_nd(eps=1e-3, axis=1):
    return lambda x, g, b: mx_instnorm.nd.InstanceNorm(x, g, b, eps=eps, axis=axis)


def ours_raw(eps=1e-3):
    return lambda x, g, b: mx.nd.Custom(x, g, b, op_type=mx_instnorm.OP_TYPE, eps=eps)


def builtin_nd(eps=1e-3):
    return lambda x, g, b: mx.nd.InstanceNorm(x, g, b, eps=eps)


def _param_scale(shape, axis=1):
    return np.sqrt(np.prod(shape) / shape[axis])


# ------------------------------------------------------ against the built-in --

@pytest.mark.parametrize("entry", ["nd", "raw"])
@pytest.mark.parametrize("eps", [1e-3, 0.5])
@pytest.mark.parametrize("shape", BUILTIN_SHAPES)
def test_matches_builtin_float32(path, rng, shape, eps, entry):
    x, gamma, beta = random_inputs(rng, shape, 1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    fn = ours_nd(eps) if entry == "nd" else ours_raw(eps)
    y, grads = autograd_run(fn, [x, gamma, beta], dy)
    y_b, grads_b = autograd_run(builtin_nd(eps), [x, gamma, beta], dy)
    np.testing.assert_allclose(y, y_b, **BUILTIN_TOL)
    scale = [1.0, _param_scale(shape), _param_scale(shape)]
    for name, g, g_b, s in zip(("dx", "dgamma", "dbeta"), grads, grads_b, scale):
        np.testing.assert_allclose(g / s, g_b / s, err_msg=name, **BUILTIN_TOL)


@pytest.mark.parametrize("shape", BUILTIN_SHAPES)
def test_sym_simple_bind_matches_builtin(path, rng, shape):
    x, gamma, beta = random_inputs(rng, shape, 1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    results = []
    for make in (mx_instnorm.sym.InstanceNorm, mx.sym.InstanceNorm):
        s = make(mx.sym.var("data"), mx.sym.var("gamma"), mx.sym.var("beta"), eps=1e-3)
        ex = s.simple_bind(mx.cpu(), data=shape, gamma=gamma.shape, beta=beta.shape)
        for k, v in (("data", x), ("gamma", gamma), ("beta", beta)):
            ex.arg_dict[k][:] = v
        ex.forward(is_train=True)
        ex.backward([mx.nd.array(dy)])
        results.append([ex.outputs[0].asnumpy()] +
                       [ex.grad_dict[k].asnumpy() for k in ("data", "gamma", "beta")])
    ours, builtin = results
    for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), ours, builtin):
        s = 1.0 if name in ("y", "dx") else _param_scale(shape)
        np.testing.assert_allclose(a / s, b / s, err_msg=name, **BUILTIN_TOL)


# ----------------------------------------------------- against the reference --

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES_AXES + LARGE_SHAPES_AXES[:3])
def test_nd_matches_reference(path, rng, shape, axis, dtype):
    """Every dtype and channel axis (the built-in has float32 and axis 1)."""
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, (dx, dgamma, dbeta) = autograd_run(ours_nd(1e-3, axis), [x, gamma, beta], dy)
    assert y.dtype == dtype and dx.dtype == dtype and dgamma.dtype == dtype
    assert_close(y, ref_forward(x, gamma, beta, 1e-3, axis)[0], dtype, "y")
    dx_r, dg_r, db_r = ref_backward(dy, x, gamma, 1e-3, axis)
    s = _param_scale(shape, axis)
    assert_close(dx, dx_r, dtype, "dx")
    assert_close(dgamma / s, dg_r / s, dtype, "dgamma")
    assert_close(dbeta / s, db_r / s, dtype, "dbeta")


@pytest.mark.parametrize("shape,axis", [((2, 4, 5, 3), 1), ((2, 5, 3, 4), -1), ((2, 3, 4, 3, 2), 2)]
                         + LARGE_SHAPES_AXES[:2])
def test_mixed_precision_float16_data_float32_params(path, rng, shape, axis):
    x, gamma, beta = random_inputs(rng, shape, axis, np.float16, param_dtype=np.float32)
    dy = rng.standard_normal(shape).astype(np.float16)
    y, (dx, dgamma, dbeta) = autograd_run(ours_nd(1e-3, axis), [x, gamma, beta], dy)
    assert y.dtype == np.float16 and dx.dtype == np.float16
    assert dgamma.dtype == np.float32 and dbeta.dtype == np.float32
    assert_close(y, ref_forward(x, gamma, beta, 1e-3, axis)[0], np.float16)
    dx_r, dg_r, db_r = ref_backward(dy, x, gamma, 1e-3, axis)
    s = _param_scale(shape, axis)
    assert_close(dx, dx_r, np.float16)
    # The parameter gradients are float32 sums of float16 products.
    assert_close(dgamma / s, dg_r / s, np.float32)
    assert_close(dbeta / s, db_r / s, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sym_infers_types(dtype):
    s = mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), name="n")
    arg_types, out_types, _ = s.infer_type(x=dtype)
    # float16 data: float32 parameters unless given (what AMP keeps).
    param = np.float32 if np.dtype(dtype) == np.float16 else np.dtype(dtype).type
    assert arg_types == [np.dtype(dtype).type, param, param]
    assert out_types == [np.dtype(dtype).type]
    arg_shapes, out_shapes, _ = s.infer_shape(x=(2, 7, 3, 5))
    assert arg_shapes == [(2, 7, 3, 5), (7,), (7,)] and out_shapes == [(2, 7, 3, 5)]


@pytest.mark.filterwarnings("ignore:`np.bool` is a deprecated alias")  # in mx.test_utils
@pytest.mark.parametrize("shape,axis", [((2, 3, 4), 1), ((2, 3, 2, 3), -1), ((1, 2, 3, 2, 2), 2)])
def test_sym_numeric_gradient_float64(path, rng, shape, axis):
    x, gamma, beta = random_inputs(rng, shape, axis, np.float64)
    s = mx_instnorm.sym.InstanceNorm(mx.sym.var("data"), mx.sym.var("gamma"),
                                     mx.sym.var("beta"), eps=1e-3, axis=axis)
    mx.test_utils.check_numeric_gradient(
        s, {"data": x, "gamma": gamma, "beta": beta}, numeric_eps=1e-6,
        dtype=np.float64, **FD_TOL)


@pytest.mark.parametrize("shape,axis", [((2, 3, 5, 4), 1), ((2, 5, 4, 3), 3)])
def test_sym_simple_bind_matches_reference(path, rng, shape, axis):
    """A bound graph, any axis, float64; inference (is_train=False) gives
    the same output."""
    x, gamma, beta = random_inputs(rng, shape, axis, np.float64)
    dy = rng.standard_normal(shape)
    s = mx_instnorm.sym.InstanceNorm(eps=1e-2, axis=axis, name="n")
    ex = s.simple_bind(mx.cpu(), type_dict={"n_data": np.float64}, n_data=shape)
    for k, v in (("n_data", x), ("n_gamma", gamma), ("n_beta", beta)):
        ex.arg_dict[k][:] = v
    y_ref = ref_forward(x, gamma, beta, 1e-2, axis)[0]
    ex.forward(is_train=False)
    assert_close(ex.outputs[0].asnumpy(), y_ref, np.float64)
    ex.forward(is_train=True)
    ex.backward([mx.nd.array(dy, dtype=np.float64)])
    assert_close(ex.outputs[0].asnumpy(), y_ref, np.float64)
    for name, r in zip(("n_data", "n_gamma", "n_beta"), ref_backward(dy, x, gamma, 1e-2, axis)):
        assert_close(ex.grad_dict[name].asnumpy(), r, np.float64, name)


def test_nd_out_argument(path, rng):
    x, gamma, beta = random_inputs(rng, (2, 3, 7), 1, np.float32)
    out = mx.nd.array(rng.standard_normal((2, 3, 7)))
    ret = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta), out=out)
    assert ret is out
    assert_close(out.asnumpy(), ref_forward(x, gamma, beta, 1e-3)[0], np.float32)


# ---------------------------------------------------------------- grad_req --

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_simple_bind_grad_req_add_doubles(path, rng, dtype):
    shape = (2, 3, 5, 3)
    x, gamma, beta = random_inputs(rng, shape, 1, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    refs = ref_backward(dy, x, gamma, 1e-3)
    s = mx_instnorm.sym.InstanceNorm(name="n")
    for req in ("write", "add"):
        ex = s.simple_bind(mx.cpu(), grad_req=req, type_dict={"n_data": dtype}, n_data=shape)
        for k, v in (("n_data", x), ("n_gamma", gamma), ("n_beta", beta)):
            ex.arg_dict[k][:] = v
        for name in ("n_data", "n_gamma", "n_beta"):
            ex.grad_dict[name][:] = 0
        for _ in range(2):
            ex.forward(is_train=True)
            ex.backward([mx.nd.array(dy, dtype=dtype)])
        factor = 2.0 if req == "add" else 1.0
        for name, r in zip(("n_data", "n_gamma", "n_beta"), refs):
            assert_close(ex.grad_dict[name].asnumpy() / 10, factor * r / 10, dtype,
                         "%s %s" % (req, name))


def test_simple_bind_grad_req_per_argument(path, rng):
    """Mixed grad_req: 'null' for gamma leaves its gradient buffer alone."""
    shape = (2, 3, 5)
    x, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    dy = rng.standard_normal(shape)
    s = mx_instnorm.sym.InstanceNorm(name="n")
    ex = s.simple_bind(mx.cpu(), grad_req={"n_data": "write", "n_gamma": "null",
                                           "n_beta": "add"},
                       type_dict={"n_data": np.float64}, n_data=shape)
    for k, v in (("n_data", x), ("n_gamma", gamma), ("n_beta", beta)):
        ex.arg_dict[k][:] = v
    ex.grad_dict["n_beta"][:] = 1.0
    ex.forward(is_train=True)
    ex.backward([mx.nd.array(dy, dtype=np.float64)])
    dx_r, _, db_r = ref_backward(dy, x, gamma, 1e-3)
    assert ex.grad_dict.get("n_gamma") is None
    assert_close(ex.grad_dict["n_data"].asnumpy(), dx_r, np.float64)
    assert_close(ex.grad_dict["n_beta"].asnumpy(), db_r + 1.0, np.float64)


def test_autograd_grad_req_add(path, rng):
    shape = (2, 4, 6)
    x, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    dy = rng.standard_normal(shape)
    nds = [_nd(a) for a in (x, gamma, beta)]
    for a in nds:
        a.attach_grad(grad_req="add")
    for _ in range(2):
        with mx.autograd.record():
            y = mx_instnorm.nd.InstanceNorm(*nds)
        y.backward(_nd(dy))
    for a, r in zip(nds, ref_backward(dy, x, gamma, 1e-3)):
        assert_close(a.grad.asnumpy(), 2 * r, np.float64)


# --------------------------------------------------- graphs with repetition --

def _chain_reference(x, gamma, beta, dy, eps, axis=1):
    """y = IN(IN(x) + x) with shared gamma/beta, and its gradients."""
    y1 = ref_forward(x, gamma, beta, eps, axis)[0]
    u = y1 + x
    y2 = ref_forward(u, gamma, beta, eps, axis)[0]
    du, dg2, db2 = ref_backward(dy, u, gamma, eps, axis)
    dx1, dg1, db1 = ref_backward(du, x, gamma, eps, axis)
    return y2, (dx1 + du, dg1 + dg2, db1 + db2)


def test_op_twice_in_one_graph_imperative(path, rng):
    shape = (2, 3, 4, 5)
    x, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    dy = rng.standard_normal(shape)

    def fn(x_, g_, b_):
        return mx_instnorm.nd.InstanceNorm(mx_instnorm.nd.InstanceNorm(x_, g_, b_) + x_, g_, b_)

    y, grads = autograd_run(fn, [x, gamma, beta], dy)
    y_r, grads_r = _chain_reference(x, gamma, beta, dy, 1e-3)
    assert_close(y, y_r, np.float64)
    for g, r in zip(grads, grads_r):
        assert_close(g, r, np.float64)


def test_op_twice_in_one_graph_symbolic(path, rng):
    shape = (2, 3, 4, 5)
    x, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    dy = rng.standard_normal(shape)
    data, g, b = mx.sym.var("data"), mx.sym.var("g"), mx.sym.var("b")
    s = mx_instnorm.sym.InstanceNorm(mx_instnorm.sym.InstanceNorm(data, g, b) + data, g, b)
    ex = s.simple_bind(mx.cpu(), type_dict={"data": np.float64}, data=shape)
    for k, v in (("data", x), ("g", gamma), ("b", beta)):
        ex.arg_dict[k][:] = v
    ex.forward(is_train=True)
    ex.backward([mx.nd.array(dy, dtype=np.float64)])
    y_r, grads_r = _chain_reference(x, gamma, beta, dy, 1e-3)
    assert_close(ex.outputs[0].asnumpy(), y_r, np.float64)
    for k, r in zip(("data", "g", "b"), grads_r):
        assert_close(ex.grad_dict[k].asnumpy(), r, np.float64, k)


def test_two_forwards_before_one_backward(path, rng):
    """Two recorded calls of the op on different data, then one backward
    through both heads: each call's gradient uses its own statistics."""
    shape = (2, 3, 11)
    x1, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    x2 = rng.standard_normal(shape) * 3 - 2
    dy1, dy2 = rng.standard_normal(shape), rng.standard_normal(shape)
    a1, a2, g, b = _nd(x1), _nd(x2), _nd(gamma), _nd(beta)
    for a in (a1, a2, g, b):
        a.attach_grad()
    with mx.autograd.record():
        y1 = mx_instnorm.nd.InstanceNorm(a1, g, b)
        y2 = mx_instnorm.nd.InstanceNorm(a2, g, b)
    mx.autograd.backward([y1, y2], [_nd(dy1), _nd(dy2)])
    r1 = ref_backward(dy1, x1, gamma, 1e-3)
    r2 = ref_backward(dy2, x2, gamma, 1e-3)
    assert_close(a1.grad.asnumpy(), r1[0], np.float64)
    assert_close(a2.grad.asnumpy(), r2[0], np.float64)
    assert_close(g.grad.asnumpy(), r1[1] + r2[1], np.float64)
    assert_close(b.grad.asnumpy(), r1[2] + r2[2], np.float64)


def test_executor_second_forward_wins(path, rng):
    """forward(x1), forward(x2), backward: the gradient is x2's (what
    MXNet's executors promise), not one built from x1's statistics."""
    shape = (2, 3, 9)
    x1, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    x2 = rng.standard_normal(shape) * 0.3 + 5
    dy = rng.standard_normal(shape)
    s = mx_instnorm.sym.InstanceNorm(name="n")
    ex = s.simple_bind(mx.cpu(), type_dict={"n_data": np.float64}, n_data=shape)
    ex.arg_dict["n_gamma"][:] = gamma
    ex.arg_dict["n_beta"][:] = beta
    for xv in (x1, x2):
        ex.arg_dict["n_data"][:] = xv
        ex.forward(is_train=True)
    ex.backward([mx.nd.array(dy, dtype=np.float64)])
    assert_close(ex.outputs[0].asnumpy(), ref_forward(x2, gamma, beta, 1e-3)[0], np.float64)
    for k, r in zip(("n_data", "n_gamma", "n_beta"), ref_backward(dy, x2, gamma, 1e-3)):
        assert_close(ex.grad_dict[k].asnumpy(), r, np.float64, k)


def test_hybridized_block_called_twice(path, rng):
    shape = (2, 3, 4, 5)
    x, gamma, beta = random_inputs(rng, shape, 1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)

    class Net(mx.gluon.HybridBlock):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.norm = mx_instnorm.gluon.InstanceNorm(scale=True, in_channels=3)

        def hybrid_forward(self, F, x_):
            return self.norm(self.norm(x_) + x_)

    net = Net()
    net.initialize()
    net.norm.gamma.set_data(_nd(gamma))
    net.norm.beta.set_data(_nd(beta))
    net.hybridize()
    xs = _nd(x)
    xs.attach_grad()
    for _ in range(2):  # the second call runs the cached graph
        with mx.autograd.record():
            y = net(xs)
        y.backward(_nd(dy))
    y_r, (dx_r, dg_r, db_r) = _chain_reference(x, gamma, beta, dy, 1e-5)
    assert_close(y.asnumpy(), y_r, np.float32)
    assert_close(xs.grad.asnumpy(), dx_r, np.float32)
    s = _param_scale(shape)
    assert_close(net.norm.gamma.grad().asnumpy() / s, dg_r / s, np.float32)
    assert_close(net.norm.beta.grad().asnumpy() / s, db_r / s, np.float32)


def test_hybridized_block_two_forwards_one_backward(path, rng):
    """A hybridized block recorded on two inputs, one backward through both
    outputs: the parameter gradients are the sum of both calls'."""
    shape = (2, 3, 4, 5)
    x1, gamma, beta = random_inputs(rng, shape, 1, np.float64)
    x2 = rng.standard_normal(shape) * 0.5 + 3
    dy1, dy2 = rng.standard_normal(shape), rng.standard_normal(shape)
    block = mx_instnorm.gluon.InstanceNorm(scale=True, in_channels=3)
    block.cast("float64")
    block.initialize()
    block.gamma.set_data(_nd(gamma))
    block.beta.set_data(_nd(beta))
    block.hybridize()
    a1, a2 = _nd(x1), _nd(x2)
    a1.attach_grad()
    a2.attach_grad()
    with mx.autograd.record():
        y1 = block(a1)
        y2 = block(a2)
    mx.autograd.backward([y1, y2], [_nd(dy1), _nd(dy2)])
    r1 = ref_backward(dy1, x1, gamma, 1e-5)
    r2 = ref_backward(dy2, x2, gamma, 1e-5)
    assert_close(y1.asnumpy(), ref_forward(x1, gamma, beta, 1e-5)[0], np.float64)
    assert_close(y2.asnumpy(), ref_forward(x2, gamma, beta, 1e-5)[0], np.float64)
    assert_close(a1.grad.asnumpy(), r1[0], np.float64)
    assert_close(a2.grad.asnumpy(), r2[0], np.float64)
    assert_close(block.gamma.grad().asnumpy(), r1[1] + r2[1], np.float64)
    assert_close(block.beta.grad().asnumpy(), r1[2] + r2[2], np.float64)


# -------------------------------------------------------------------- Module --

def test_module_forward_backward_update(path, rng):
    shape = (2, 3, 5, 4)
    x, gamma, beta = random_inputs(rng, shape, 1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    s = mx_instnorm.sym.InstanceNorm(mx.sym.var("data"), name="in1")
    mod = mx.mod.Module(s, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", shape)], inputs_need_grad=True)
    mod.init_params(arg_params={"in1_gamma": _nd(gamma), "in1_beta": _nd(beta)})
    mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 1.0,
                                                          "rescale_grad": 1.0, "wd": 0.0})
    mod.forward(mx.io.DataBatch([_nd(x)]), is_train=True)
    mod.backward([_nd(dy)])
    y = mod.get_outputs()
    assert len(y) == 1
    assert_close(y[0].asnumpy(), ref_forward(x, gamma, beta, 1e-3)[0], np.float32)
    dx_r, dg_r, db_r = ref_backward(dy, x, gamma, 1e-3)
    assert_close(mod.get_input_grads()[0].asnumpy(), dx_r, np.float32)
    mod.update()  # plain SGD, lr 1: param <- param - grad
    args, _ = mod.get_params()
    s = _param_scale(shape)
    assert_close(args["in1_gamma"].asnumpy() / s, (gamma - dg_r) / s, np.float32)
    assert_close(args["in1_beta"].asnumpy() / s, (beta - db_r) / s, np.float32)


# ------------------------------------------------------- names and interface --

def test_default_names_match_builtin():
    ours = mx_instnorm.sym.InstanceNorm(name="in1")
    builtin = mx.sym.InstanceNorm(name="in1")
    assert ours.list_arguments() == builtin.list_arguments() == \
        ["in1_data", "in1_gamma", "in1_beta"]
    assert ours.list_outputs() == builtin.list_outputs() == ["in1_output"]
    assert ours.name == builtin.name == "in1"


def test_automatic_names_match_builtin():
    with mx.name.NameManager():
        ours = [mx_instnorm.sym.InstanceNorm() for _ in range(2)]
    with mx.name.NameManager():
        builtin = [mx.sym.InstanceNorm() for _ in range(2)]
    for a, b in zip(ours, builtin):
        assert a.list_arguments() == b.list_arguments()
        assert a.list_outputs() == b.list_outputs()
    assert ours[0].name != ours[1].name


def test_prefix_names_match_builtin():
    with mx.name.Prefix("net_"):
        ours = mx_instnorm.sym.InstanceNorm(name="in1")
        builtin = mx.sym.InstanceNorm(name="in1")
    assert ours.list_arguments() == builtin.list_arguments()
    assert ours.list_outputs() == builtin.list_outputs()


def test_exactly_one_visible_output(rng):
    x, gamma, beta = random_inputs(rng, (2, 3, 4), 1, np.float32)
    s = mx_instnorm.sym.InstanceNorm(name="n")
    assert len(s.list_outputs()) == 1
    assert len(s) == 1
    y = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta))
    assert isinstance(y, mx.nd.NDArray) and y.shape == x.shape
    raw = mx.nd.Custom(_nd(x), _nd(gamma), _nd(beta), op_type=mx_instnorm.OP_TYPE)
    assert isinstance(raw, mx.nd.NDArray)
    prop = InstanceNormProp()
    assert prop.list_outputs() == ["output"]
    assert prop.list_arguments() == ["data", "gamma", "beta"]
    assert prop.list_auxiliary_states() == []


def test_backward_dependency_is_dy_x_gamma():
    assert InstanceNormProp().declare_backward_dependency([0], [1, 2, 3], [4]) == [0, 1, 2]


def test_prop_parses_string_keywords():
    """CustomOpProp receives strings; they are parsed, not truth-tested."""
    prop = InstanceNormProp(eps="0.25", axis="-1")
    shapes, out_shapes, _ = prop.infer_shape([[2, 4, 5, 3], [], []])
    assert [tuple(s) for s in shapes] == [(2, 4, 5, 3), (3,), (3,)]
    assert [tuple(s) for s in out_shapes] == [(2, 4, 5, 3)]
    assert prop.eps == 0.25 and prop.axis == -1


def test_raw_custom_string_keywords(path, rng):
    x, gamma, beta = random_inputs(rng, (2, 5, 4, 3), 3, np.float64)
    y = mx.nd.Custom(_nd(x), _nd(gamma), _nd(beta), op_type=mx_instnorm.OP_TYPE,
                     eps="0.25", axis="-1")
    assert_close(y.asnumpy(), ref_forward(x, gamma, beta, 0.25, -1)[0], np.float64)


# ---------------------------------------------------------- documented example --

def _doc_inputs():
    return (mx.nd.array(DOC_X), mx.nd.array(DOC_GAMMA), mx.nd.array(DOC_BETA))


def test_doc_example_nd(path):
    y = mx_instnorm.nd.InstanceNorm(*_doc_inputs())
    np.testing.assert_allclose(y.asnumpy(), DOC_Y, rtol=0, atol=DOC_ATOL)


def test_doc_example_raw_custom(path):
    y = mx.nd.Custom(*_doc_inputs(), op_type=mx_instnorm.OP_TYPE)
    np.testing.assert_allclose(y.asnumpy(), DOC_Y, rtol=0, atol=DOC_ATOL)


def test_doc_example_bound_symbol(path):
    s = mx_instnorm.sym.InstanceNorm(name="in1")
    x, gamma, beta = _doc_inputs()
    ex = s.bind(mx.cpu(), {"in1_data": x, "in1_gamma": gamma, "in1_beta": beta})
    y = ex.forward()[0]
    np.testing.assert_allclose(y.asnumpy(), DOC_Y, rtol=0, atol=DOC_ATOL)


def test_doc_example_hybridized_block(path):
    layer = mx_instnorm.gluon.InstanceNorm(epsilon=1e-3, scale=True,
                                           gamma_initializer=mx.init.Constant(1.5),
                                           beta_initializer=mx.init.Constant(0.5))
    layer.initialize()
    layer.hybridize()
    for _ in range(2):
        y = layer(mx.nd.array(DOC_X))
        np.testing.assert_allclose(y.asnumpy(), DOC_Y, rtol=0, atol=DOC_ATOL)


# ------------------------------------------------------------- large offset --

def test_large_offset_beats_builtin(path, rng):
    """x = 1e4 + N(0, 1) in float32: the built-in's statistics lose digits
    to the offset; ours must be at least 10x closer to float64."""
    shape = (4, 16, 32, 32)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    beta = rng.standard_normal(16).astype(np.float32)
    y_ref = ref_forward(x, gamma, beta, 1e-3)[0]
    ours = mx_instnorm.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta)).asnumpy()
    builtin = mx.nd.InstanceNorm(_nd(x), _nd(gamma), _nd(beta), eps=1e-3).asnumpy()
    err_ours = float(np.abs(ours - y_ref).max())
    err_builtin = float(np.abs(builtin - y_ref).max())
    print("\nlarge offset (%s path): max abs error ours %.3g, built-in %.3g"
          % (path, err_ours, err_builtin))
    assert err_ours * 10 < err_builtin


# ------------------------------------------------------------ thread counts --

@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("shape,axis", [((4, 16, 48, 48), 1), ((4, 48, 48, 16), -1)])
def test_thread_counts_match_reference(path, rng, monkeypatch, threads, shape, axis):
    """Tensors above the kernel's single-thread threshold (512 KiB) through
    the operator, forward and all three gradients, for each thread count."""
    monkeypatch.setenv("MX_INSTNORM_NUM_THREADS", threads)
    x, gamma, beta = random_inputs(rng, shape, axis, np.float32)
    assert x.nbytes > 512 * 1024
    dy = rng.standard_normal(shape).astype(np.float32)
    y, (dx, dgamma, dbeta) = autograd_run(ours_nd(axis=axis), [x, gamma, beta], dy)
    y_ref, mean, var = ref_forward(x, gamma, beta, 1e-3, axis)
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, gamma, 1e-3, axis)
    assert_close(y, y_ref, np.float32)
    assert_close(dx, dx_ref, np.float32)
    # dgamma/dbeta sum N*H*W = 9216 terms each, with cancellation: the bound
    # is a few float32 ulps of the sum of the terms' magnitudes.
    other = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    xhat = (x - mean) / np.sqrt(var + 1e-3)
    for got, want, terms in ((dgamma, dgamma_ref, dy * xhat), (dbeta, dbeta_ref, dy)):
        bound = 4 * np.finfo(np.float32).eps * np.abs(terms).sum(axis=other)
        assert np.all(np.abs(got - want) <= bound), (np.abs(got - want) / bound).max()
