"""The oneDNN hazard: MXNet 1.9.1 hands a CustomOp a default-layout copy of
an input that a oneDNN Convolution left in a blocked layout (8 or 16
channels: nChw8c / nChw16c), and may free that copy while the Python op is
still reading it. Whatever the package does about it, the op must give the
right answer, every time, in every execution mode. 4 channels (no blocked
layout) is the control. Each mode runs REPEATS calls with fresh data.

The oracle is the same network built with MXNet's built-in InstanceNorm
(float32, axis 1).
"""
import numpy as np
import pytest

import mxnet as mx
from mxnet.gluon import nn

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm
from conftest import BUILTIN_TOL, scaled

REPEATS = 30
IN_SHAPE = (2, 3, 9, 9)
CHANNELS = [4, 8, 16]
OUT_CHANNELS = 8  # the conv after the norm: blocked too, so dy is as well


def assert_matches(got, want, what=""):
    """float32 against float32 through convolutions: relative to the size of
    the values (BUILTIN_TOL's 1e-4, scaled by the largest magnitude)."""
    np.testing.assert_allclose(got, want, err_msg=what, **scaled(BUILTIN_TOL, want))


def _params(rng, channels):
    return {
        "w1": rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) * 0.5,
        "b1": rng.standard_normal(channels).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "beta": rng.standard_normal(channels).astype(np.float32),
        "w2": rng.standard_normal((OUT_CHANNELS, channels, 3, 3)).astype(np.float32) * 0.3,
        "b2": rng.standard_normal(OUT_CHANNELS).astype(np.float32),
    }


def _inputs(rng):
    return [(rng.standard_normal(IN_SHAPE) * 2 + 1).astype(np.float32) for _ in range(REPEATS)]


def _nd_net(norm, x, p, channels):
    h = mx.nd.Convolution(x, p["w1"], p["b1"], kernel=(3, 3), pad=(1, 1), num_filter=channels)
    h = norm(h, p["gamma"], p["beta"])
    return mx.nd.Convolution(h, p["w2"], p["b2"], kernel=(3, 3), pad=(1, 1),
                             num_filter=OUT_CHANNELS)


def _ours(h, g, b):
    return mx_instnorm.nd.InstanceNorm(h, g, b, eps=1e-3)


def _builtin(h, g, b):
    return mx.nd.InstanceNorm(h, g, b, eps=1e-3)


@pytest.mark.parametrize("channels", CHANNELS)
def test_imperative_after_convolution(path, rng, channels):
    p = {k: mx.nd.array(v) for k, v in _params(rng, channels).items()}
    for i, xv in enumerate(_inputs(rng)):
        x = mx.nd.array(xv)
        h = mx.nd.Convolution(x, p["w1"], p["b1"], kernel=(3, 3), pad=(1, 1),
                              num_filter=channels)
        y = mx_instnorm.nd.InstanceNorm(h, p["gamma"], p["beta"])
        y_b = mx.nd.InstanceNorm(h, p["gamma"], p["beta"], eps=1e-3)
        assert_matches(y.asnumpy(), y_b.asnumpy(), "call %d" % i)


@pytest.mark.parametrize("channels", CHANNELS)
def test_autograd_conv_norm_conv(path, rng, channels):
    """Forward and backward, with a Convolution after the op so that dy
    comes from a convolution's backward."""
    params = _params(rng, channels)
    for i, xv in enumerate(_inputs(rng)):
        dy = rng.standard_normal((2, OUT_CHANNELS, 9, 9)).astype(np.float32)
        results = []
        for norm in (_ours, _builtin):
            x = mx.nd.array(xv)
            p = {k: mx.nd.array(v) for k, v in params.items()}
            for a in [x] + list(p.values()):
                a.attach_grad()
            with mx.autograd.record():
                y = _nd_net(norm, x, p, channels)
            y.backward(mx.nd.array(dy))
            results.append([y.asnumpy(), x.grad.asnumpy()] +
                           [p[k].grad.asnumpy() for k in sorted(p)])
        for j, (a, b) in enumerate(zip(*results)):
            assert_matches(a, b, "call %d, array %d" % (i, j))


def _gluon_net(cls, channels):
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(nn.Conv2D(channels, 3, padding=1, in_channels=3),
                cls(scale=True, in_channels=channels),
                nn.Conv2D(OUT_CHANNELS, 3, padding=1, in_channels=channels))
    return net


def _gluon_pair(rng, channels, tmp_path):
    """The same network with our block and with the built-in, sharing
    parameter values (random gamma and beta)."""
    ours = _gluon_net(InstanceNorm, channels)
    ours.initialize(mx.init.Normal(0.3))
    ours[1].gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, channels)))
    ours[1].beta.set_data(mx.nd.array(rng.standard_normal(channels)))
    fname = str(tmp_path / "pair.params")
    ours.save_parameters(fname)
    builtin = _gluon_net(nn.InstanceNorm, channels)
    builtin.load_parameters(fname)
    return ours, builtin


def _gluon_step(net, xv, dy):
    x = mx.nd.array(xv)
    x.attach_grad()
    with mx.autograd.record():
        y = net(x)
    y.backward(mx.nd.array(dy))
    grads = [p.grad().asnumpy() for _, p in sorted(net.collect_params().items())
             if p.grad_req != "null"]
    return [y.asnumpy(), x.grad.asnumpy()] + grads


@pytest.mark.parametrize("static_alloc", [False, True], ids=["default", "static_alloc"])
@pytest.mark.parametrize("channels", CHANNELS)
def test_hybridized_gluon_conv_norm_conv(path, rng, tmp_path, channels, static_alloc):
    ours, builtin = _gluon_pair(rng, channels, tmp_path)
    ours.hybridize(static_alloc=static_alloc, static_shape=static_alloc)
    builtin.hybridize()
    for i, xv in enumerate(_inputs(rng)):
        dy = rng.standard_normal((2, OUT_CHANNELS, 9, 9)).astype(np.float32)
        got, want = _gluon_step(ours, xv, dy), _gluon_step(builtin, xv, dy)
        assert len(got) == len(want) == 8  # y, dx, 2 convs x 2, gamma, beta
        for j, (a, b) in enumerate(zip(got, want)):
            assert_matches(a, b, "call %d, array %d" % (i, j))


def _sym_net(norm, channels):
    h = mx.sym.Convolution(mx.sym.var("data"), kernel=(3, 3), pad=(1, 1),
                           num_filter=channels, name="c1")
    h = norm(h, mx.sym.var("gamma"), mx.sym.var("beta"), eps=1e-3, name="n")
    return mx.sym.Convolution(h, kernel=(3, 3), pad=(1, 1), num_filter=OUT_CHANNELS, name="c2")


@pytest.mark.parametrize("channels", CHANNELS)
def test_symbolic_simple_bind(path, rng, channels):
    params = _params(rng, channels)
    names = {"c1_weight": "w1", "c1_bias": "b1", "gamma": "gamma", "beta": "beta",
             "c2_weight": "w2", "c2_bias": "b2"}
    executors = []
    for norm in (mx_instnorm.sym.InstanceNorm, mx.sym.InstanceNorm):
        ex = _sym_net(norm, channels).simple_bind(mx.cpu(), data=IN_SHAPE)
        for arg, key in names.items():
            ex.arg_dict[arg][:] = params[key]
        executors.append(ex)
    for i, xv in enumerate(_inputs(rng)):
        dy = mx.nd.array(rng.standard_normal((2, OUT_CHANNELS, 9, 9)))
        results = []
        for ex in executors:
            ex.arg_dict["data"][:] = xv
            ex.forward(is_train=True)
            ex.backward([dy])
            results.append([ex.outputs[0].asnumpy()] +
                           [ex.grad_dict[k].asnumpy() for k in ["data"] + sorted(names)])
        for j, (a, b) in enumerate(zip(*results)):
            assert_matches(a, b, "call %d, array %d" % (i, j))


@pytest.mark.filterwarnings("ignore:Cannot decide type")  # SymbolBlock.imports, harmless
@pytest.mark.parametrize("channels", CHANNELS)
def test_exported_and_reimported_block(path, rng, tmp_path, channels):
    ours, builtin = _gluon_pair(rng, channels, tmp_path)
    ours.hybridize()
    ours(mx.nd.array(_inputs(rng)[0]))
    prefix = str(tmp_path / "net")
    ours.export(prefix)
    imported = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                            prefix + "-0000.params")
    imported.hybridize()
    builtin.hybridize()
    for i, xv in enumerate(_inputs(rng)):
        dy = rng.standard_normal((2, OUT_CHANNELS, 9, 9)).astype(np.float32)
        got, want = [], []
        for net, store in ((imported, got), (builtin, want)):
            x = mx.nd.array(xv)
            x.attach_grad()
            with mx.autograd.record():
                y = net(x)
            y.backward(mx.nd.array(dy))
            store += [y.asnumpy(), x.grad.asnumpy()]
        for j, (a, b) in enumerate(zip(got, want)):
            assert_matches(a, b, "call %d, array %d" % (i, j))
