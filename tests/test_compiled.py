"""The compiled operator (``libmx_instnorm.so``) called directly, through
:mod:`mx_instnorm.operator.compiled`, against the float64 references of
conftest, MXNet's built-in InstanceNorm and finite differences.

The whole module skips, with the loader's reason, where the library is not
built or cannot be loaded.
"""
import os
import re
import threading

import numpy as np
import pytest

import mxnet as mx
from mxnet.test_utils import check_numeric_gradient

from conftest import (BUILTIN_SHAPES, BUILTIN_TOL, FD_TOL, LARGE_SHAPES_AXES, SHAPES_AXES,
                      assert_close, random_inputs, ref_backward, ref_forward)
from mx_instnorm.operator import compiled

try:
    OP = compiled.load()
except compiled.CompiledUnavailable as err:
    pytest.skip("compiled operator unavailable: %s" % err, allow_module_level=True)

nd_op = getattr(mx.nd, OP)
sym_op = getattr(mx.sym, OP)

# (data dtype, gamma/beta dtype): every combination the operator accepts.
DTYPE_PAIRS = [(np.float16, np.float16), (np.float16, np.float32),
               (np.float32, np.float32), (np.float64, np.float64)]


def run(x, gamma, beta, dy, eps=1e-3, axis=1):
    """Forward and backward through the nd operator under autograd:
    ``(y, dx, dgamma, dbeta)`` as NumPy arrays."""
    args = [mx.nd.array(a, dtype=a.dtype) for a in (x, gamma, beta)]
    for a in args:
        a.attach_grad()
    with mx.autograd.record():
        y = nd_op(*args, eps=eps, axis=axis)
    y.backward(mx.nd.array(dy, dtype=dy.dtype))
    return (y.asnumpy(),) + tuple(a.grad.asnumpy() for a in args)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES + LARGE_SHAPES_AXES)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS)
def test_matches_reference(rng, shape, axis, dtype, param_dtype):
    x, gamma, beta = random_inputs(rng, shape, axis, dtype, param_dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, dx, dgamma, dbeta = run(x, gamma, beta, dy, 1e-3, axis)
    want_dx, want_dgamma, want_dbeta = ref_backward(dy, x, gamma, 1e-3, axis)
    assert y.dtype == dtype and dx.dtype == dtype
    assert dgamma.dtype == param_dtype and dbeta.dtype == param_dtype
    assert_close(y, ref_forward(x, gamma, beta, 1e-3, axis)[0], dtype)
    assert_close(dx, want_dx, dtype)
    # Parameter gradients sum over the whole batch: compared relative to
    # their largest entry.
    scale = 1 + np.abs(want_dgamma).max()
    assert_close(dgamma / scale, want_dgamma / scale, param_dtype if param_dtype == dtype else dtype)
    scale = 1 + np.abs(want_dbeta).max()
    assert_close(dbeta / scale, want_dbeta / scale, param_dtype if param_dtype == dtype else dtype)


@pytest.mark.parametrize("shape", BUILTIN_SHAPES)
def test_matches_builtin(rng, shape):
    x, gamma, beta = random_inputs(rng, shape, 1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, dx, dgamma, dbeta = run(x, gamma, beta, dy, 1e-3, 1)
    args = [mx.nd.array(a) for a in (x, gamma, beta)]
    for a in args:
        a.attach_grad()
    with mx.autograd.record():
        want = mx.nd.InstanceNorm(*args, eps=1e-3)
    want.backward(mx.nd.array(dy))
    np.testing.assert_allclose(y, want.asnumpy(), **BUILTIN_TOL)
    for got, ref in zip((dx, dgamma, dbeta), args):
        np.testing.assert_allclose(got, ref.grad.asnumpy(), **BUILTIN_TOL)


@pytest.mark.parametrize("shape,axis", [((2, 3, 5), 1), ((2, 4, 3), -1), ((2, 3, 2, 3), 2)])
def test_numeric_gradient(rng, shape, axis):
    x, gamma, beta = random_inputs(rng, shape, axis, np.float64)
    s = sym_op(mx.sym.var("data"), mx.sym.var("gamma"), mx.sym.var("beta"),
               eps=1e-3, axis=axis)
    check_numeric_gradient(s, {"data": x, "gamma": gamma, "beta": beta},
                           numeric_eps=1e-6, dtype=np.float64, **FD_TOL)


def test_large_offset_keeps_digits(rng):
    # A one-pass E[x^2] - E[x]^2 loses every digit here; the NumPy kernel
    # measured an error of about 1.6e-6.
    x = (1e4 + rng.standard_normal((4, 8, 32, 32))).astype(np.float32)
    gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, dx, dgamma, _ = run(x, gamma, beta, dy)
    assert np.abs(y - ref_forward(x, gamma, beta, 1e-3)[0]).max() <= 1.6e-6
    want_dx, want_dgamma, _ = ref_backward(dy, x, gamma, 1e-3)
    assert_close(dx, want_dx, np.float32)
    assert_close(dgamma / 100, want_dgamma / 100, np.float32)


@pytest.mark.parametrize("shape,axis", [((2, 3, 4000), 1), ((2, 4000, 3), -1)])
def test_outlier_first_element(rng, shape, axis):
    # Backward recomputes the statistics shifted by each instance's first
    # element; a first element 60 standard deviations out takes the exact
    # path.
    x, gamma, beta = random_inputs(rng, shape, axis, np.float32)
    ax = axis % len(shape)
    x[tuple(slice(None) if i in (0, ax) else 0 for i in range(len(shape)))] += 60
    dy = rng.standard_normal(shape).astype(np.float32)
    y, dx, dgamma, _ = run(x, gamma, beta, dy, 1e-3, axis)
    want_dx, want_dgamma, _ = ref_backward(dy, x, gamma, 1e-3, axis)
    assert_close(y, ref_forward(x, gamma, beta, 1e-3, axis)[0], np.float32)
    assert_close(dx, want_dx, np.float32)
    assert_close(dgamma / 100, want_dgamma / 100, np.float32)


def test_huge_magnitudes_are_not_flattened(rng):
    # Squares of 1e30 overflow float32: y must still be normalized, not beta.
    x = (rng.standard_normal((2, 3, 20, 20)) * 1e30).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.full(3, 0.5, np.float32)
    args = [mx.nd.array(a) for a in (x, gamma, beta)]
    for a in args:
        a.attach_grad()
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with mx.autograd.record():
        y = nd_op(*args)
    y.backward(mx.nd.array(dy))
    assert_close(y.asnumpy(), ref_forward(x, gamma, beta, 1e-3)[0], np.float32)
    assert y.asnumpy().std() > 0.5
    # dx is O(1 / 1e30): compared after scaling back.
    want_dx, want_dgamma, want_dbeta = ref_backward(dy, x, gamma, 1e-3)
    assert_close(args[0].grad.asnumpy() * 1e30, want_dx * 1e30, np.float32)
    assert_close(args[1].grad.asnumpy() / 100, want_dgamma / 100, np.float32)


@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS)
def test_constant_input(rng, dtype, param_dtype):
    shape = (2, 3, 4, 5)
    x = np.full(shape, 2.5, dtype)
    gamma = np.array([1.5, -2.0, 0.5], param_dtype)
    beta = np.array([0.25, -1.0, 3.0], param_dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, dx, dgamma, dbeta = run(x, gamma, beta, dy)
    np.testing.assert_array_equal(y, np.broadcast_to(beta.astype(dtype).reshape(1, 3, 1, 1), shape))
    for grad in (dx, dgamma, dbeta):
        assert np.isfinite(grad).all()
    want_dx, _, want_dbeta = ref_backward(dy, x, gamma, 1e-3)
    assert_close(dx, want_dx, dtype)


@pytest.mark.parametrize("shape,axis", [((3, 4, 50), 1), ((3, 50, 4), -1), ((3, 4, 6, 5), 2)])
def test_nan_confined_to_its_instance(rng, shape, axis):
    x, gamma, beta = random_inputs(rng, shape, axis, np.float32)
    where = [1] + [0] * (len(shape) - 1)
    where[axis] = 2
    x[tuple(where)] = np.nan
    y, dx, _, _ = run(x, gamma, beta, np.ones(shape, np.float32), 1e-3, axis)
    for arr in (y, dx):
        bad = np.moveaxis(np.isnan(arr), axis, 1)
        assert bad[1, 2].all() and bad.sum() == bad[1, 2].size


@pytest.mark.parametrize("shape,axis", [((0, 3, 4), 1), ((2, 0, 4), 1), ((2, 3, 0), 1),
                                        ((0, 4, 3), -1), ((2, 4, 0), -1)])
def test_zero_size(shape, axis):
    with mx.util.np_shape(True):
        c = shape[axis]
        args = [mx.nd.zeros(shape), mx.nd.ones((c,)), mx.nd.zeros((c,))]
        for a in args:
            a.attach_grad()
        with mx.autograd.record():
            y = nd_op(*args, axis=axis)
        y.backward(mx.nd.ones(shape))
        assert y.shape == shape
        assert args[0].grad.shape == shape
        np.testing.assert_array_equal(args[1].grad.asnumpy(), np.zeros(c))
        np.testing.assert_array_equal(args[2].grad.asnumpy(), np.zeros(c))


def _error_text(call):
    with pytest.raises(mx.MXNetError) as info:
        outputs = call()
        for out in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
            out.wait_to_read()
    return str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps="abc"), "eps must be a finite number >= 0, got 'abc'"),
    (dict(eps="0x1p3"), "eps must be a finite number >= 0, got '0x1p3'"),
    (dict(eps=-1.0), "eps must be a finite number >= 0, got '-1.0'"),
    (dict(eps="nan"), "eps must be a finite number >= 0, got 'nan'"),
    (dict(eps="inf"), "eps must be a finite number >= 0, got 'inf'"),
    (dict(axis="x"), "axis must be an integer, got 'x'"),
    (dict(axis=1.5), "axis must be an integer, got '1.5'"),
    (dict(axis=0), "axis 0 is the batch axis; InstanceNorm normalizes each batch item "
                   "separately, pick a channel axis in 1..3"),
    (dict(axis=4), "axis 4 is out of range for data of rank 4 (valid: -3..3, not 0)"),
    (dict(axis=-5), "axis -5 is out of range for data of rank 4"),
    (dict(momentum=0.9), "unknown keyword momentum='0.9'; accepted keywords: eps, axis"),
])
def test_bad_attributes(kwargs, message):
    args = (mx.nd.ones((2, 3, 4, 5)), mx.nd.ones(3), mx.nd.zeros(3))
    text = _error_text(lambda: nd_op(*args, **kwargs))
    # The message comes first, and only this call's message is there,
    # although lib_api keeps (and MXNet shows) every earlier one.
    assert text.startswith(OP + ": " + message)
    assert text.count("lib_instance_norm.cc") == 1
    assert nd_op(*args).shape == (2, 3, 4, 5)


def test_earlier_messages_are_left_out():
    args = (mx.nd.ones((2, 3, 4)), mx.nd.ones(3), mx.nd.zeros(3))
    texts = [_error_text(lambda: nd_op(*args, eps="bad%d" % i)) for i in range(3)]
    for i, text in enumerate(texts):
        assert "bad%d" % i in text
        assert all("bad%d" % j not in text for j in range(3) if j != i)


def test_repeated_failure_adds_one_message():
    # lib_api keeps every message and MXNet copies them all for each error
    # (quadratic cost): the same failure again adds nothing. A graph's error
    # shows lib_api's whole list.
    args = (mx.nd.ones((2, 3, 4)), mx.nd.ones(5), mx.nd.zeros(5))
    message = "gamma must have shape (3,) to match the 3 channels of data, got shape (5,)"
    for _ in range(30):
        assert message in _error_text(lambda: nd_op(*args))
    generated = compiled.generated_function(mx.sym)
    s = generated(mx.sym.var("d"), mx.sym.var("g", shape=(7,)), mx.sym.var("b", shape=(7,)))
    with pytest.raises(mx.MXNetError) as info:
        s.infer_shape(d=(2, 6, 4))
    text = str(info.value)
    assert "gamma must have shape (6,) to match the 6 channels of data, got shape (7,)" in text
    assert text.count(message) <= 1


@pytest.mark.parametrize("data,gamma,beta,message", [
    ((2, 3), (3,), (3,), "InstanceNorm needs data of rank >= 3 (batch, channel, spatial...), "
                         "got rank 2, shape (2, 3)"),
    ((2, 3, 4), (4,), (3,), "gamma must have shape (3,) to match the 3 channels of data, "
                            "got shape (4,)"),
    ((2, 3, 4), (3,), (3, 1), "beta must have shape (3,) to match the 3 channels of data, "
                              "got shape (3, 1)"),
])
def test_bad_shapes(data, gamma, beta, message):
    args = [mx.nd.ones(s) for s in (data, gamma, beta)]
    assert message in _error_text(lambda: nd_op(*args))


@pytest.mark.parametrize("dtypes,message", [
    (("int32", "int32", "int32"),
     "InstanceNorm data must be float16, bfloat16, float32 or float64, got int32"),
    # A dtype lib_api's enum does not name (MXNet's bool, code 7) is refused
    # too, by name, never computed as another.
    (("bool", "float32", "float32"),
     "InstanceNorm data must be float16, bfloat16, float32 or float64, got bool"),
    (("float32", "int32", "int32"), "gamma/beta dtype int32 does not match data dtype "
                                    "float32 (allowed: float32)"),
    (("float32", "float64", "float64"), "gamma/beta dtype float64 does not match data dtype "
                                        "float32 (allowed: float32)"),
    (("float16", "float64", "float64"), "gamma/beta dtype float64 does not match data dtype "
                                        "float16 (allowed: float16, float32)"),
    (("float32", "float32", "float16"),
     "gamma and beta must have the same dtype, got gamma float32 and beta float16"),
])
def test_bad_dtypes(dtypes, message):
    args = [mx.nd.ones(s, dtype=d) for s, d in zip(((2, 3, 4), (3,), (3,)), dtypes)]
    assert message in _error_text(lambda: nd_op(*args))


def test_unknown_dtype_in_type_inference():
    s = sym_op(mx.sym.var("data"), mx.sym.var("gamma"), mx.sym.var("beta"))
    with pytest.raises(mx.MXNetError, match="InstanceNorm data must be float16, bfloat16, float32 "
                                            "or float64, got int8"):
        s.infer_type(data=np.int8)


# The backward operator MXNet registers for the library's backward, called
# directly: (dy, data, gamma, beta, y) -> (ddata, dgamma, dbeta). MXNet's
# autograd always hands it consistent arrays; a graph or a caller that does
# not must get an error, not a read past an array's end.
def _backward(inputs, outputs, **attrs):
    import ctypes
    from mxnet.base import _LIB, OpHandle, c_str, check_call
    from mxnet._ctypes.ndarray import _imperative_invoke
    handle = OpHandle()
    check_call(_LIB.NNGetOpHandle(c_str("_backward_" + OP), ctypes.byref(handle)))
    result = _imperative_invoke(handle.value, list(inputs), list(attrs),
                                [str(v) for v in attrs.values()], outputs, False, True)
    mx.nd.waitall()
    return result


def _backward_case(rng, dy_shape=(2, 3, 4), x_shape=(2, 3, 4), gamma_shape=(3,),
                   dx_shape=(2, 3, 4), dgamma_shape=(3,), dtype="float32", dy_dtype=None):
    x = mx.nd.array(rng.standard_normal(x_shape), dtype=dtype)
    dy = mx.nd.array(rng.standard_normal(dy_shape), dtype=dy_dtype or dtype)
    gamma = mx.nd.array(rng.standard_normal(gamma_shape), dtype=dtype)
    beta = mx.nd.zeros(gamma_shape, dtype=dtype)
    outputs = [mx.nd.zeros(dx_shape, dtype=dtype),
               mx.nd.zeros(dgamma_shape, dtype=dtype), mx.nd.zeros((3,), dtype=dtype)]
    return [dy, x, gamma, beta, x], outputs


def test_backward_called_directly_matches_reference(rng):
    inputs, outputs = _backward_case(rng)
    dx, dgamma, dbeta = (a.asnumpy() for a in _backward(inputs, outputs, eps=1e-3))
    want = ref_backward(*(a.asnumpy() for a in inputs[:3]), 1e-3)
    for got, ref in zip((dx, dgamma, dbeta), want):
        assert_close(got, ref, np.float32)


@pytest.mark.parametrize("case,message", [
    (dict(dy_shape=(2, 3, 5)), "the output gradient must have shape (2, 3, 4), got (2, 3, 5)"),
    (dict(dy_shape=(2, 3)), "the output gradient must have shape (2, 3, 4), got (2, 3)"),
    (dict(dy_dtype="float64"), "the output gradient must have the data's dtype float32, "
                               "got float64"),
    (dict(gamma_shape=(4,)), "gamma must have shape (3,) to match the 3 channels of data, "
                             "got shape (4,)"),
    (dict(x_shape=(2, 3)), "InstanceNorm needs data of rank >= 3"),
    (dict(dx_shape=(2, 3, 3)), "the data gradient must have shape (2, 3, 4), got (2, 3, 3)"),
    (dict(dgamma_shape=(2,)), "the gamma gradient must have shape (3,), got (2,)"),
    (dict(dtype="int32"), "InstanceNorm data must be float16, bfloat16, float32 or float64, got int32"),
])
def test_backward_validates_its_inputs(rng, case, message):
    inputs, outputs = _backward_case(rng, **case)
    with pytest.raises(mx.MXNetError) as info:
        _backward(inputs, outputs)
    assert message in str(info.value)


def test_bad_thread_count(monkeypatch):
    monkeypatch.setenv("MX_INSTNORM_NUM_THREADS", "two")
    args = (mx.nd.ones((2, 3, 4)), mx.nd.ones(3), mx.nd.zeros(3))
    assert "MX_INSTNORM_NUM_THREADS must be a positive integer, got 'two'" in _error_text(
        lambda: nd_op(*args))


# Big enough to be split over threads (> 2 MiB of float32), one per layout:
# channels first, channels last, and a middle channel axis.
SPLIT_CASES = [((4, 16, 96, 96), 1), ((4, 96, 96, 80), -1), ((2, 8, 12, 64, 64), 2)]


@pytest.mark.parametrize("shape,axis", SPLIT_CASES)
def test_bitwise_identical_for_every_thread_count(rng, monkeypatch, shape, axis):
    x, gamma, beta = random_inputs(rng, shape, axis, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("MX_INSTNORM_NUM_THREADS", threads)
        results.append(run(x, gamma, beta, dy, 1e-3, axis))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    assert_close(results[0][0], ref_forward(x, gamma, beta, 1e-3, axis)[0], np.float32)


def test_concurrent_python_threads(rng):
    cases = [random_inputs(rng, (2, 8, 128, 128), 1, np.float32) for _ in range(4)]
    expected = [nd_op(*(mx.nd.array(a) for a in case)).asnumpy() for case in cases]
    got, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(5):
                got[i] = nd_op(*(mx.nd.array(a) for a in cases[i])).asnumpy()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


# A child forked after threaded calls: tests/test_fork.py (in subprocesses,
# under a timeout, on both backends); forking the test process itself could
# hang the whole suite.


def test_out_array(rng):
    x, gamma, beta = random_inputs(rng, (2, 3, 4, 5), 1, np.float32)
    out = mx.nd.full((2, 3, 4, 5), 7.0)
    result = nd_op(*(mx.nd.array(a) for a in (x, gamma, beta)), out=out)
    assert result is out
    assert_close(out.asnumpy(), ref_forward(x, gamma, beta, 1e-3)[0], np.float32)


def test_symbol_inference_and_executor(rng):
    data = mx.sym.var("data")
    s = sym_op(data, mx.sym.var("gamma"), mx.sym.var("beta"), eps=1e-3, axis=-1)
    args, outs, _ = s.infer_shape(data=(2, 5, 6, 3))
    assert args == [(2, 5, 6, 3), (3,), (3,)] and outs == [(2, 5, 6, 3)]
    # Half data infers float32 parameters (AMP keeps them float32) unless
    # they are given.
    args, outs, _ = s.infer_type(data=np.float16)
    assert args == [np.float16, np.float32, np.float32] and outs == [np.float16]
    args, _, _ = s.infer_type(data=np.float16, gamma=np.float16)
    assert args == [np.float16] * 3
    args, outs, _ = s.infer_type(data=np.float64)
    assert args == [np.float64] * 3 and outs == [np.float64]

    x, gamma, beta = random_inputs(rng, (2, 5, 6, 3), -1, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    # gamma's gradient not requested: the operator must not mind.
    ex = s.simple_bind(mx.cpu(), data=x.shape,
                          grad_req={"data": "write", "gamma": "null", "beta": "write"})
    ex.forward(is_train=True, data=x, gamma=gamma, beta=beta)
    ex.backward(mx.nd.array(dy))
    assert_close(ex.outputs[0].asnumpy(), ref_forward(x, gamma, beta, 1e-3, -1)[0], np.float32)
    want_dx, _, want_dbeta = ref_backward(dy, x, gamma, 1e-3, -1)
    assert_close(ex.grad_dict["data"].asnumpy(), want_dx, np.float32)
    assert_close(ex.grad_dict["beta"].asnumpy(), want_dbeta, np.float32)


def test_shape_inference_error_is_ours():
    s = sym_op(mx.sym.var("data"), mx.sym.var("gamma"), mx.sym.var("beta"), axis=0)
    with pytest.raises(mx.MXNetError, match=re.escape("axis 0 is the batch axis")):
        s.infer_shape(data=(2, 3, 4))


def test_unknown_data_shape_is_a_clear_error():
    # MXNet's library-operator shim must never see an unknown data rank (it
    # would write past its buffer): the raw symbol function's check stops
    # inference before, at a node named for it.
    s = sym_op(mx.sym.var("data"), mx.sym.var("gamma"), mx.sym.var("beta"), name="in7")
    with pytest.raises(mx.MXNetError, match="in7_data_rank_check"):
        s.infer_shape_partial(gamma=(3,), beta=(3,))


def test_unknown_data_size_is_a_clear_error():
    # A known rank with an unknown size reaches the operator, which says
    # what it needs.
    s = sym_op(mx.sym.var("data"), mx.sym.var("gamma"), mx.sym.var("beta"))
    with pytest.raises(mx.MXNetError, match=re.escape(
            "infers shapes from the data shape only, and it is not fully known: (2, 3, -1)")):
        s.infer_shape_partial(data=(2, 3, 0))


def test_raw_symbol_function_keeps_names_and_runs(rng):
    s = sym_op(mx.sym.var("x"), mx.sym.var("g"), mx.sym.var("b"), eps=1e-3, name="norm")
    assert s.list_arguments() == ["x", "g", "b"]
    assert s.list_outputs() == ["norm_output"]
    assert sym_op is mx.sym.op.__dict__[OP] and nd_op is mx.nd.op.__dict__[OP]
    # Computed gamma of unknown rank: its shape comes from the data's.
    computed = sym_op(mx.sym.var("x"), mx.sym.var("g") * 2, mx.sym.var("b"), axis=-1)
    args, _, _ = computed.infer_shape(x=(2, 4, 5))
    assert args == [(2, 4, 5), (5,), (5,)]
    x, gamma, beta = random_inputs(rng, (2, 4, 5), -1, np.float64)
    ex = computed.bind(mx.cpu(), {"x": mx.nd.array(x, dtype=np.float64),
                                  "g": mx.nd.array(gamma / 2, dtype=np.float64),
                                  "b": mx.nd.array(beta, dtype=np.float64)})
    assert_close(ex.forward()[0].asnumpy(), ref_forward(x, gamma, beta, 1e-3, -1)[0], np.float64)


def test_library_exports_only_lib_api_entry_points():
    import shutil
    import subprocess
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm on PATH")
    out = subprocess.run([nm, "-D", "--defined-only", compiled.library_path()],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert "initialize" in names and "_opRegGet" in names and "_msgGet" in names
    assert "mx_instnorm_num_threads" in names
    assert [n for n in names
            if not re.match(r"^(initialize|mx_instnorm_num_threads|_op|_part|_pass|_msg)", n)] == []


def test_loader_is_idempotent():
    assert compiled.load() == OP == compiled.OP_NAME
    assert compiled.load() == OP
    assert issubclass(compiled.CompiledUnavailable, RuntimeError)


def test_loader_refuses_another_library_version(monkeypatch):
    # An mxnet whose library API is not 1.9's (1.7 has 7): the reason names
    # it and says what to do.
    monkeypatch.setattr(compiled, "_result", None)
    monkeypatch.setattr(compiled, "_expected_library_version", lambda: 7)
    with pytest.raises(compiled.CompiledUnavailable,
                       match=r"has library API 7; the compiled operator needs mxnet 1\.9\.x "
                             r"\(library API 11\); to use it: pip install \"mxnet>=1\.9,<2\", "
                             r"then reinstall mx_instnorm"):
        compiled.load()
    # The failure is cached: the same reason again, nothing retried.
    monkeypatch.setattr(compiled, "_expected_library_version", lambda: 11)
    with pytest.raises(compiled.CompiledUnavailable, match="has library API 7"):
        compiled.load()


def test_loader_without_lib_api_header_judges_by_version():
    # An mxnet 1.9 whose package lacks include/mxnet/lib_api.h (built from
    # source): no API to compare, so mx.library.load decides, and loads it.
    # In a fresh process: loading a library again regenerates every mx.nd
    # and mx.sym operator function, which other tests compare by identity.
    import subprocess
    import sys
    code = ("import mx_instnorm\n"
            "from mx_instnorm.operator import compiled\n"
            "compiled._result = None\n"
            "compiled._expected_library_version = lambda: None\n"
            "print(compiled.load())\n")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == compiled.OP_NAME


def test_loader_refuses_a_library_built_for_another_api(monkeypatch):
    monkeypatch.setattr(compiled, "_result", None)
    monkeypatch.setattr(compiled, "_library_version", lambda path: 10)
    with pytest.raises(compiled.CompiledUnavailable,
                       match=r"built for library API 10 but mxnet .* has 11: reinstall "
                             r"mx_instnorm into this environment"):
        compiled.load()


def test_loader_gives_the_reason_setup_py_wrote(monkeypatch, tmp_path):
    # setup.py writes why it built nothing beside where the library would be.
    monkeypatch.setattr(compiled, "_result", None)
    monkeypatch.setattr(compiled, "library_path", lambda: str(tmp_path / compiled.LIBRARY_NAME))
    (tmp_path / compiled.NOT_BUILT_NOTE).write_text(
        "the C++ compiler false exited with status 1\n")
    with pytest.raises(compiled.CompiledUnavailable,
                       match=r"not built when mx_instnorm was installed: the C\+\+ compiler "
                             r"false exited with status 1; after fixing that, reinstall"):
        compiled.load()


def test_loader_without_library(monkeypatch, tmp_path):
    monkeypatch.setattr(compiled, "_result", None)
    monkeypatch.setattr(compiled, "library_path", lambda: str(tmp_path / "missing.so"))
    with pytest.raises(compiled.CompiledUnavailable, match="no compiled library at"):
        compiled.load()
