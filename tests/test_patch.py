"""patch_mxnet: MXNet's own InstanceNorm entry points routed to mx_instnorm,
and the sym function inside a user's own HybridBlock (issue: F.InstanceNorm
calls that swap_instance_norm cannot see).

References: MXNet's built-in InstanceNorm, run on the same data and
parameters before patching (it is float32, channel axis 1, as the patched
signature is).
"""
import inspect

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import mx_instnorm
from conftest import BUILTIN_TOL, scaled, tol

BUILTIN_ND = mx.nd.InstanceNorm
BUILTIN_SYM = mx.sym.InstanceNorm


@pytest.fixture(autouse=True)
def _always_unpatched():
    mx_instnorm.unpatch_mxnet()
    yield
    mx_instnorm.unpatch_mxnet()


class StyleBlock(nn.HybridBlock):
    """Like MSG-Net's and turicreate's blocks: F.InstanceNorm in hybrid_forward,
    between convolutions (oneDNN's blocked layouts for 8 and 16 channels, in
    the data forward and in its gradient backward)."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(channels, 3, padding=1, in_channels=3)
            self.conv2 = nn.Conv2D(channels, 3, padding=1, in_channels=channels)
            self.gamma = self.params.get("gamma", shape=(channels,), init="ones")
            self.beta = self.params.get("beta", shape=(channels,), init="zeros")

    def hybrid_forward(self, F, x, gamma, beta):
        y = F.InstanceNorm(self.conv(x), gamma, beta, eps=1e-5)
        return self.conv2(F.relu(y))


def _run(block, xv, dy):
    x = mx.nd.array(xv)
    x.attach_grad()
    with mx.autograd.record():
        y = block(x)
    y.backward(dy)
    grads = {name: p.grad().asnumpy().copy() for name, p in block.collect_params().items()}
    grads["x"] = x.grad.asnumpy()
    return y.asnumpy(), grads


def _pair(rng, channels):
    blocks = []
    for _ in range(2):
        b = StyleBlock(channels, prefix="style_")
        b.initialize()
        blocks.append(b)
    for name, p in blocks[0].collect_params().items():
        value = rng.standard_normal(p.shape).astype(np.float32)
        if name.endswith("gamma"):
            value = 1 + 0.3 * value
        p.set_data(mx.nd.array(value))
        blocks[1].collect_params()[name].set_data(mx.nd.array(value))
    return blocks


def test_signatures_match_builtin():
    with mx_instnorm.patched_mxnet():
        for ours, builtin in ((mx.nd.InstanceNorm, BUILTIN_ND),
                              (mx.sym.InstanceNorm, BUILTIN_SYM)):
            names = list(inspect.signature(ours).parameters)
            want = list(inspect.signature(builtin).parameters)
            assert names[:3] == want[:3] == ["data", "gamma", "beta"]
            assert "eps" in names and "axis" not in names
            assert set(want) <= set(names) | {"attr"}
            assert inspect.signature(ours).parameters["eps"].default == 1e-3


def test_patch_unpatch_restores_every_entry_point():
    mx_instnorm.patch_mxnet(gluon=True)
    assert mx_instnorm.is_patched()
    assert mx.nd.InstanceNorm is not BUILTIN_ND
    assert mx.ndarray.op.InstanceNorm is mx.nd.InstanceNorm
    assert mx.sym.InstanceNorm is not BUILTIN_SYM
    assert nn.InstanceNorm is mx_instnorm.gluon.InstanceNorm
    mx_instnorm.patch_mxnet()  # idempotent: the originals stay the saved ones
    mx_instnorm.unpatch_mxnet()
    assert not mx_instnorm.is_patched()
    assert mx.nd.InstanceNorm is BUILTIN_ND and mx.sym.InstanceNorm is BUILTIN_SYM
    assert nn.InstanceNorm is not mx_instnorm.gluon.InstanceNorm


def test_context_manager_restores_on_error():
    with pytest.raises(RuntimeError, match="inside"):
        with mx_instnorm.patched_mxnet():
            assert mx.nd.InstanceNorm is not BUILTIN_ND
            raise RuntimeError("inside")
    assert mx.nd.InstanceNorm is BUILTIN_ND


def test_patched_nd_matches_builtin_and_takes_float64(rng):
    x = rng.standard_normal((2, 3, 5, 4))
    g, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    want = BUILTIN_ND(mx.nd.array(x), mx.nd.array(g), mx.nd.array(b)).asnumpy()
    with mx_instnorm.patched_mxnet():
        got = mx.nd.InstanceNorm(mx.nd.array(x), mx.nd.array(g), mx.nd.array(b))
        got64 = mx.nd.InstanceNorm(*(mx.nd.array(a, dtype="float64") for a in (x, g, b)))
        with pytest.raises(TypeError, match="axis"):
            mx.nd.InstanceNorm(mx.nd.array(x), mx.nd.array(g), mx.nd.array(b), axis=2)
    np.testing.assert_allclose(got.asnumpy(), want, **BUILTIN_TOL)
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64.asnumpy(), want, **BUILTIN_TOL)


@pytest.mark.parametrize("channels", [8, 16])
@pytest.mark.parametrize("mode", ["imperative", "hybridize", "static"])
def test_user_block_calling_F_InstanceNorm(rng, channels, mode):
    """Forward and every gradient equal the built-in's, pass after pass."""
    ours, builtin = _pair(rng, channels)
    for b in (ours, builtin):
        if mode == "hybridize":
            b.hybridize()
        elif mode == "static":
            b.hybridize(static_alloc=True, static_shape=True)
    for step in range(30):
        x = rng.standard_normal((2, 3, 9, 7))
        dy = mx.nd.array(rng.standard_normal((2, channels, 9, 7)))
        y_want, g_want = _run(builtin, x, dy)
        with mx_instnorm.patched_mxnet():
            y_got, g_got = _run(ours, x, dy)
        np.testing.assert_allclose(y_got, y_want, err_msg="pass %d" % step,
                                   **scaled(BUILTIN_TOL, y_want))
        for name in g_want:
            np.testing.assert_allclose(g_got[name], g_want[name],
                                       err_msg="%s, pass %d" % (name, step),
                                       **scaled(BUILTIN_TOL, g_want[name]))


def test_graph_built_while_patched_runs_ours(rng):
    """A Symbol built while patched holds mx_instnorm's op (float64 works),
    and stays so after unpatching."""
    with mx_instnorm.patched_mxnet():
        s = mx.sym.InstanceNorm(mx.sym.var("x"), name="in1")
    ops = {n["op"] for n in __import__("json").loads(s.tojson())["nodes"]}
    assert "InstanceNorm" not in ops
    x = rng.standard_normal((2, 3, 6))
    exe = s.simple_bind(mx.cpu(), x=x.shape, type_dict={"x": "float64"}, grad_req="null")
    exe.arg_dict["x"][:] = x
    exe.arg_dict["in1_gamma"][:] = 1
    exe.arg_dict["in1_beta"][:] = 0
    y = exe.forward()[0].asnumpy()
    mean = x.mean(axis=2, keepdims=True)
    want = (x - mean) / np.sqrt(x.var(axis=2, keepdims=True) + 1e-3)
    np.testing.assert_allclose(y, want, **tol(np.float64))


def test_patched_gluon_class_constructs_ours():
    with mx_instnorm.patched_mxnet(gluon=True):
        block = nn.InstanceNorm(in_channels=3)
    assert isinstance(block, mx_instnorm.gluon.InstanceNorm)
    assert nn.InstanceNorm is not mx_instnorm.gluon.InstanceNorm
