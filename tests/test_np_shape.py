"""Under mx.util.np_shape(True) (NumPy shape semantics), where -1, not 0,
means "unknown" and 0 is a real size: deferred Gluon initialization, the
sym function on empty data, and error messages that stay ours.

References: conftest's float64 ``ref_forward``/``ref_backward`` and
MXNet's own ``nn.InstanceNorm`` for the messages it accepts.
"""
import mxnet as mx
import numpy as np
import pytest

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm
from conftest import CHAIN_TOL, random_inputs, ref_backward, ref_forward

TOL = CHAIN_TOL


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("shape,axis", [((2, 3, 5), 1), ((2, 4, 5, 3), -1)])
def test_gluon_deferred_init(rng, hybridize, shape, axis):
    x, _, _ = random_inputs(rng, shape, axis, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    with mx.util.np_shape(True):
        block = InstanceNorm(axis=axis, scale=True)  # in_channels=0: deferred
        block.initialize()
        if hybridize:
            block.hybridize()
        data = mx.nd.array(x)
        data.attach_grad()
        with mx.autograd.record():
            y = block(data)
        y.backward(mx.nd.array(dy))
        c = shape[axis]
        assert block.gamma.shape == (c,)
        ones, zeros = np.ones(c), np.zeros(c)
        np.testing.assert_allclose(y.asnumpy(), ref_forward(x, ones, zeros, 1e-5, axis)[0],
                                   **TOL)
        dx, dg, db = ref_backward(dy, x, ones, 1e-5, axis)
        np.testing.assert_allclose(data.grad.asnumpy(), dx, **TOL)
        np.testing.assert_allclose(block.gamma.grad().asnumpy(), dg, **TOL)
        np.testing.assert_allclose(block.beta.grad().asnumpy(), db, **TOL)


def test_gluon_bad_rank_keeps_its_message():
    with mx.util.np_shape(True):
        block = InstanceNorm()
        block.initialize()
        with pytest.raises(ValueError, match="rank >= 3.*got rank 2"):
            block(mx.nd.ones((2, 3)))


def test_gluon_channel_mismatch_after_init(rng):
    with mx.util.np_shape(True):
        block = InstanceNorm()
        block.initialize()
        block(mx.nd.array(rng.standard_normal((2, 3, 4))))
        with pytest.raises(ValueError, match="built for 3 channels.*has 5"):
            block(mx.nd.array(rng.standard_normal((2, 5, 4))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sym_on_empty_data(dtype):
    """A bound sym graph on an empty batch: empty output, zero parameter
    gradients, backward runs."""
    with mx.util.np_shape(True):
        s = mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), name="in1")
        exe = s.simple_bind(mx.cpu(), x=(0, 3, 4), type_dict={"x": dtype})
        exe.arg_dict["in1_gamma"][:] = 1.5
        exe.arg_dict["in1_beta"][:] = 0.5
        for name in ("in1_gamma", "in1_beta"):
            exe.grad_dict[name][:] = 7  # grad_req 'write' overwrites it
        y = exe.forward(is_train=True)[0]
        exe.backward([mx.nd.zeros((0, 3, 4), dtype=dtype)])
        assert y.shape == (0, 3, 4) and y.dtype == dtype
        for name in ("in1_gamma", "in1_beta"):
            assert np.array_equal(exe.grad_dict[name].asnumpy(), np.zeros(3))
        assert exe.grad_dict["x"].shape == (0, 3, 4)


def test_sym_on_data_with_zero_channels():
    with mx.util.np_shape(True):
        s = mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), name="in1")
        exe = s.simple_bind(mx.cpu(), x=(2, 0, 4), grad_req="null")
        y = exe.forward()[0]
        assert y.shape == (2, 0, 4)
