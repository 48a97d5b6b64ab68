"""mx_instnorm.gluon.InstanceNorm against mxnet.gluon.nn.InstanceNorm
(sharing parameter values) and the float64 reference."""
import inspect

import numpy as np
import pytest

import mxnet as mx
from mxnet.gluon import nn

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm

from conftest import BUILTIN_TOL, DOC_ATOL, assert_close, random_inputs, ref_backward, ref_forward

# Seed 001 (the docstring of mxnet.gluon.nn.InstanceNorm): eps 1e-5,
# default initializers (gamma 1, beta 0).
DOC_X = [[[1.1, 2.2]], [[3.3, 4.4]]]
DOC_Y = np.array([[[-0.99998355, 0.99998331]], [[-0.99998319, 0.99998361]]])


def _nd(a):
    return mx.nd.array(a, dtype=a.dtype)


def _run_block(block, x, dy, gamma, beta):
    """Initializes ``block`` (deferred or not), sets gamma/beta, and returns
    the output and the gradients of x, gamma and beta (None where the
    parameter's grad_req is 'null')."""
    block.initialize()
    xs = _nd(x)
    block(xs)  # completes a deferred initialization
    block.gamma.set_data(_nd(gamma))
    block.beta.set_data(_nd(beta))
    xs.attach_grad()
    with mx.autograd.record():
        y = block(xs)
    y.backward(_nd(dy))
    grads = [xs.grad.asnumpy()]
    for p in (block.gamma, block.beta):
        grads.append(None if p.grad_req == "null" else p.grad().asnumpy())
    return y.asnumpy(), grads


CONFIGS = [(1, (2, 3, 5, 4)), (-1, (2, 5, 4, 3)), (3, (2, 5, 4, 3)), (2, (2, 4, 3, 5))]


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("deferred", [False, True], ids=["in_channels", "deferred"])
@pytest.mark.parametrize("center", [True, False], ids=["center", "no_center"])
@pytest.mark.parametrize("scale", [True, False], ids=["scale", "no_scale"])
@pytest.mark.parametrize("axis,shape", CONFIGS)
def test_matches_builtin_block(path, rng, axis, shape, scale, center, deferred, hybridize):
    x, gamma, beta = random_inputs(rng, shape, axis, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    results = []
    for cls in (InstanceNorm, nn.InstanceNorm):
        block = cls(axis=axis, scale=scale, center=center, in_channels=0 if deferred else c)
        if hybridize:
            block.hybridize()
        results.append(_run_block(block, x, dy, gamma, beta))
    (y, grads), (y_b, grads_b) = results
    np.testing.assert_allclose(y, y_b, **BUILTIN_TOL)
    s = np.sqrt(np.prod(shape) / c)
    for name, g, g_b, sc in zip(("dx", "dgamma", "dbeta"), grads, grads_b, (1, s, s)):
        assert (g is None) == (g_b is None), name
        if g is not None:
            np.testing.assert_allclose(g / sc, g_b / sc, err_msg=name, **BUILTIN_TOL)
    # Not only equal to each other: equal to the formula (gamma and beta
    # are applied even when they are not learned).
    assert_close(y, ref_forward(x, gamma, beta, 1e-5, axis)[0], np.float32)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("axis,shape", [(1, (2, 3, 5, 4)), (-1, (2, 5, 4, 3))])
def test_cast_block_matches_reference(path, rng, axis, shape, dtype, hybridize):
    """``block.cast`` to float16/float64, which the built-in cannot run."""
    x, gamma, beta = random_inputs(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    block = InstanceNorm(axis=axis, scale=True, in_channels=shape[axis])
    block.cast(dtype)
    if hybridize:
        block.hybridize()
    y, (dx, dgamma, dbeta) = _run_block(block, x, dy, gamma, beta)
    assert y.dtype == dtype and dx.dtype == dtype and dgamma.dtype == dtype
    assert_close(y, ref_forward(x, gamma, beta, 1e-5, axis)[0], dtype)
    dx_r, dg_r, db_r = ref_backward(dy, x, gamma, 1e-5, axis)
    s = np.sqrt(np.prod(shape) / shape[axis])
    assert_close(dx, dx_r, dtype)
    assert_close(dgamma / s, dg_r / s, dtype)
    assert_close(dbeta / s, db_r / s, dtype)


@pytest.mark.parametrize("epsilon", [1e-5, 0.3])
def test_epsilon_is_used(path, rng, epsilon):
    x, gamma, beta = random_inputs(rng, (2, 3, 6), 1, np.float64)
    block = InstanceNorm(epsilon=epsilon, scale=True)
    block.cast("float64")
    y, _ = _run_block(block, x, x, gamma, beta)
    assert_close(y, ref_forward(x, gamma, beta, epsilon)[0], np.float64)


# ------------------------------------------------------------ doc example --

@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_doc_example(path, hybridize):
    layer = InstanceNorm()
    layer.initialize(ctx=mx.cpu(0))
    if hybridize:
        layer.hybridize()
    for _ in range(2):
        y = layer(mx.nd.array(DOC_X))
        np.testing.assert_allclose(y.asnumpy(), DOC_Y, rtol=0, atol=DOC_ATOL)


# ------------------------------------------------------- drop-in interface --

def test_signature_matches_builtin():
    assert inspect.signature(InstanceNorm.__init__) == inspect.signature(nn.InstanceNorm.__init__)


@pytest.mark.parametrize("kwargs", [{}, {"axis": 3, "epsilon": 1e-3},
                                    {"center": False, "scale": True, "in_channels": 7},
                                    {"axis": -1, "in_channels": 2}])
def test_repr_matches_builtin(kwargs):
    # The built-in's repr, marked so that print(net) tells the two apart.
    assert repr(InstanceNorm(**kwargs)) == "mx_instnorm." + repr(nn.InstanceNorm(**kwargs))
    assert repr(nn.InstanceNorm(**kwargs)).startswith("InstanceNorm(")


def test_repr_after_deferred_init_matches_builtin(rng):
    x = mx.nd.array(rng.standard_normal((2, 6, 5)))
    blocks = [InstanceNorm(), nn.InstanceNorm()]
    for b in blocks:
        b.initialize()
        b(x)
    assert repr(blocks[0]) == "mx_instnorm." + repr(blocks[1])
    assert "in_channels=6" in repr(blocks[0])


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_parameters_and_grad_req_match_builtin(scale, center):
    ours = InstanceNorm(scale=scale, center=center, in_channels=4, prefix="a_")
    builtin = nn.InstanceNorm(scale=scale, center=center, in_channels=4, prefix="a_")
    p_ours, p_builtin = ours.collect_params(), builtin.collect_params()
    assert list(p_ours.keys()) == list(p_builtin.keys()) == ["a_gamma", "a_beta"]
    assert ours.gamma.grad_req == ("write" if scale else "null")
    assert ours.beta.grad_req == ("write" if center else "null")
    for k in p_ours.keys():
        assert p_ours[k].grad_req == p_builtin[k].grad_req
        assert p_ours[k].shape == p_builtin[k].shape == (4,)


def test_default_prefixes_match_builtin():
    """Children named the same way in two otherwise identical nets."""
    names = []
    for cls in (InstanceNorm, nn.InstanceNorm):
        net = nn.HybridSequential(prefix="net_")
        with net.name_scope():
            net.add(cls(), cls())
        names.append([blk.prefix for blk in net] + list(net.collect_params().keys()))
    assert names[0] == names[1]
    assert names[0][:2] == ["net_instancenorm0_", "net_instancenorm1_"]


@pytest.mark.parametrize("kwargs", [{}, {"scale": True, "center": False}])
def test_symbol_names_match_builtin(kwargs):
    """Called on a Symbol (what hybridize and export record), the block
    gives the same argument and output names as the built-in, so code that
    looks up ``<prefix>fwd_output`` in an exported graph keeps working.
    (axis 1 only: for other axes the built-in's output is named after the
    swapaxes it wraps around its op.)"""
    graphs = []
    for cls in (InstanceNorm, nn.InstanceNorm):
        with mx.name.NameManager():
            block = cls(in_channels=3, prefix="in0_", **kwargs)
            graphs.append(block(mx.sym.var("data")))
    ours, builtin = graphs
    assert ours.list_arguments() == builtin.list_arguments()
    assert ours.list_outputs() == builtin.list_outputs()


def test_initializers_are_used(rng):
    block = InstanceNorm(in_channels=3, gamma_initializer=mx.init.Constant(2.0),
                         beta_initializer=mx.init.Constant(-1.0))
    block.initialize()
    x = rng.standard_normal((2, 3, 8))
    y = block(mx.nd.array(x)).asnumpy()
    assert_close(y, ref_forward(x.astype(np.float32), [2.0] * 3, [-1.0] * 3, 1e-5)[0],
                 np.float32)


# --------------------------------------------------------- parameter files --

def _net(cls):
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, in_channels=3), cls(scale=True, in_channels=4),
                nn.Conv2D(2, 1, in_channels=4), cls(axis=-1, in_channels=3))
    return net


@pytest.mark.parametrize("direction", ["builtin_to_ours", "ours_to_builtin"])
def test_parameter_files_move_between_blocks(path, rng, tmp_path, direction):
    src_cls, dst_cls = ((nn.InstanceNorm, InstanceNorm) if direction == "builtin_to_ours"
                        else (InstanceNorm, nn.InstanceNorm))
    src = _net(src_cls)
    src.initialize(mx.init.Normal(0.5))
    # Random, distinct gamma/beta (the initializers would give 1 and 0).
    for name, p in src.collect_params().items():
        if name.endswith(("gamma", "beta")):
            p.set_data(mx.nd.array(rng.standard_normal(p.shape)))
    x = mx.nd.array(rng.standard_normal((2, 3, 7, 5)))
    y_src = src(x).asnumpy()
    fname = str(tmp_path / "net.params")
    src.save_parameters(fname)
    dst = _net(dst_cls)
    dst.load_parameters(fname)
    dst.hybridize()
    y_dst = dst(x).asnumpy()
    np.testing.assert_allclose(y_dst, y_src, **BUILTIN_TOL)
    assert np.abs(y_src).max() > 0.1


# ------------------------------------------------------------- misc use --

def test_in_sequential_with_trainer(path, rng):
    """One SGD step in a hybridized Sequential: beta moves by -lr * dbeta,
    gamma (scale=False) stays."""
    shape = (2, 3, 4, 4)
    x, gamma, beta = random_inputs(rng, shape, 1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    net = nn.HybridSequential()
    norm = InstanceNorm(in_channels=3)
    net.add(norm)
    net.initialize()
    norm.gamma.set_data(_nd(gamma))
    norm.beta.set_data(_nd(beta))
    net.hybridize()
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    with mx.autograd.record():
        y = net(_nd(x))
    y.backward(_nd(dy))
    trainer.step(1)
    _, _, db_r = ref_backward(dy, x, gamma, 1e-5)
    assert_close(norm.gamma.data().asnumpy(), gamma, np.float32)
    assert_close(norm.beta.data().asnumpy() / 4, (beta - 0.5 * db_r) / 4, np.float32)


def test_module_exposes_class():
    assert mx_instnorm.gluon.InstanceNorm is InstanceNorm
    assert issubclass(InstanceNorm, mx.gluon.HybridBlock)
