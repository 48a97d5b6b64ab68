"""Every error message, one case each, with the offending value echoed; after
each error the process is still usable and nothing was written."""
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import mxnet as mx
from mxnet.base import MXNetError

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm
from mx_instnorm.kernel import default_num_threads, instance_norm_backward, instance_norm_forward
from mx_instnorm.operator import implementation

from conftest import assert_close, ref_forward


@pytest.fixture
def usable(rng):
    """Call after an error: a valid call in the same process still works."""
    def check():
        x = rng.standard_normal((2, 3, 5)).astype(np.float32)
        gamma, beta = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
        y = mx_instnorm.nd.InstanceNorm(mx.nd.array(x), mx.nd.array(gamma), mx.nd.array(beta))
        assert_close(y.asnumpy(), ref_forward(x, gamma.astype(np.float32),
                                              beta.astype(np.float32), 1e-3)[0], np.float32)
    return check


def _arr(rng, shape, dtype=np.float32):
    return mx.nd.array(rng.standard_normal(shape), dtype=dtype)


# ------------------------------------------------------------------ nd ------
# (id, data shape, data dtype, gamma shape, gamma dtype, beta shape, beta dtype,
#  kwargs, exception, message)
ND_CASES = [
    ("rank2", (2, 3), "float32", (3,), "float32", (3,), "float32", {},
     ValueError, "rank >= 3 (batch, channel, spatial...), got rank 2, shape (2, 3)"),
    ("rank1", (6,), "float32", (6,), "float32", (6,), "float32", {},
     ValueError, "got rank 1, shape (6,)"),
    ("gamma_length", (2, 3, 4), "float32", (4,), "float32", (3,), "float32", {},
     ValueError, "gamma must have shape (3,) to match the 3 channels of data, got shape (4,)"),
    ("beta_length", (2, 3, 4), "float32", (3,), "float32", (2,), "float32", {},
     ValueError, "beta must have shape (3,) to match the 3 channels of data, got shape (2,)"),
    ("gamma_rank", (2, 3, 4), "float32", (3, 1), "float32", (3,), "float32", {},
     ValueError, "gamma must have shape (3,) to match the 3 channels of data, got shape (3, 1)"),
    ("param_length_other_axis", (2, 3, 4), "float32", (3,), "float32", (3,), "float32",
     {"axis": 2}, ValueError, "gamma must have shape (4,) to match the 4 channels"),
    ("axis_too_big", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"axis": 3},
     ValueError, "axis 3 is out of range for data of rank 3"),
    ("axis_too_negative", (2, 3, 4), "float32", (3,), "float32", (3,), "float32",
     {"axis": -4}, ValueError, "axis -4 is out of range for data of rank 3"),
    ("axis_batch", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"axis": 0},
     ValueError, "axis 0 is the batch axis"),
    ("axis_batch_negative", (2, 3, 4), "float32", (3,), "float32", (3,), "float32",
     {"axis": -3}, ValueError, "axis -3 is the batch axis"),
    ("axis_float", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"axis": 1.5},
     TypeError, "axis must be an integer, got 1.5"),
    ("axis_string", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"axis": "one"},
     TypeError, "axis must be an integer, got 'one'"),
    ("axis_bool", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"axis": True},
     TypeError, "axis must be an integer, got True"),
    ("eps_negative", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"eps": -0.1},
     ValueError, "eps must be a finite number >= 0, got -0.1"),
    ("eps_nan", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"eps": float("nan")},
     ValueError, "eps must be a finite number >= 0, got nan"),
    ("eps_inf", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"eps": float("inf")},
     ValueError, "eps must be a finite number >= 0, got inf"),
    ("eps_negative_string", (2, 3, 4), "float32", (3,), "float32", (3,), "float32",
     {"eps": "-1e-3"}, ValueError, "eps must be a finite number >= 0, got '-1e-3'"),
    ("eps_string", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"eps": "abc"},
     TypeError, "eps must be a number, got 'abc'"),
    ("eps_bool", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"eps": True},
     TypeError, "eps must be a number, got True"),
    ("eps_none", (2, 3, 4), "float32", (3,), "float32", (3,), "float32", {"eps": None},
     TypeError, "eps must be a number, got None"),
    ("dtype_int32", (2, 3, 4), "int32", (3,), "int32", (3,), "int32", {},
     TypeError, "data must be float16, bfloat16, float32 or float64, got int32"),
    ("dtype_uint8", (2, 3, 4), "uint8", (3,), "uint8", (3,), "uint8", {},
     TypeError, "data must be float16, bfloat16, float32 or float64, got uint8"),
    ("dtype_bool", (2, 3, 4), "bool", (3,), "float32", (3,), "float32", {},
     TypeError, "data must be float16, bfloat16, float32 or float64, got bool"),
    ("dtype_mismatch", (2, 3, 4), "float64", (3,), "float32", (3,), "float32", {},
     TypeError, "gamma/beta dtype float32 does not match data dtype float64 (allowed: float64)"),
    ("dtype_mismatch_half", (2, 3, 4), "float16", (3,), "float64", (3,), "float64", {},
     TypeError, "gamma/beta dtype float64 does not match data dtype float16 "
                "(allowed: float16, float32)"),
    ("gamma_beta_dtypes_differ", (2, 3, 4), "float32", (3,), "float32", (3,), "float64", {},
     TypeError, "gamma and beta must have the same dtype, got gamma float32 and beta float64"),
]


@pytest.mark.parametrize("case", ND_CASES, ids=[c[0] for c in ND_CASES])
def test_nd_error(rng, usable, case):
    _, dshape, ddtype, gshape, gdtype, bshape, bdtype, kwargs, exc, message = case
    data = _arr(rng, dshape, ddtype)
    gamma, beta = _arr(rng, gshape, gdtype), _arr(rng, bshape, bdtype)
    out = _arr(rng, dshape, ddtype)
    before = out.asnumpy().copy()
    with pytest.raises(exc, match=re.escape(message)):
        mx_instnorm.nd.InstanceNorm(data, gamma, beta, out=out, **kwargs)
    mx.nd.waitall()
    np.testing.assert_array_equal(out.asnumpy(), before)
    usable()


@pytest.mark.parametrize("which", ["data", "gamma", "beta"])
def test_nd_rejects_non_ndarray(rng, usable, which):
    args = {"data": _arr(rng, (2, 3, 4)), "gamma": _arr(rng, (3,)), "beta": _arr(rng, (3,))}
    args[which] = args[which].asnumpy()
    with pytest.raises(TypeError, match="%s must be an NDArray, got ndarray" % which):
        mx_instnorm.nd.InstanceNorm(**args)
    usable()


@pytest.mark.parametrize("shape,dtype,message", [
    ((2, 3, 5), "float32", "got (2, 3, 5) float32"),
    ((2, 3, 4), "float64", "got (2, 3, 4) float64"),
])
def test_nd_rejects_bad_out(rng, usable, shape, dtype, message):
    out = _arr(rng, shape, dtype)
    before = out.asnumpy().copy()
    with pytest.raises(ValueError, match=r"out must have the data's shape \(2, 3, 4\) and "
                                         r"dtype float32, " + re.escape(message)):
        mx_instnorm.nd.InstanceNorm(_arr(rng, (2, 3, 4)), _arr(rng, (3,)), _arr(rng, (3,)),
                                    out=out)
    np.testing.assert_array_equal(out.asnumpy(), before)
    usable()


# ----------------------------------------------------------------- sym ------
SYM_CREATION_CASES = [
    ({"eps": -1.0}, ValueError, "eps must be a finite number >= 0, got -1.0"),
    ({"eps": float("nan")}, ValueError, "eps must be a finite number >= 0, got nan"),
    ({"eps": "abc"}, TypeError, "eps must be a number, got 'abc'"),
    ({"eps": False}, TypeError, "eps must be a number, got False"),
    ({"axis": "x"}, TypeError, "axis must be an integer, got 'x'"),
    ({"axis": 2.0}, TypeError, "axis must be an integer, got 2.0"),
]


@pytest.mark.parametrize("kwargs,exc,message", SYM_CREATION_CASES,
                         ids=[str(c[0]) for c in SYM_CREATION_CASES])
def test_sym_creation_error(usable, kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), name="n", **kwargs)
    usable()


def test_sym_rejects_non_symbol(rng, usable):
    with pytest.raises(TypeError, match="gamma must be a Symbol, got NDArray"):
        mx_instnorm.sym.InstanceNorm(mx.sym.var("x"), _arr(rng, (3,)))
    usable()


# MXNet reports a CustomOp's infer_shape/infer_type failure as an MXNetError
# without the Python message; the message (with the offending value) is
# printed by MXNet's callback wrapper, where it is checked. The compiled
# backend's message is in the exception itself.
SYM_BIND_CASES = [
    ({"n_data": (2, 3)}, {}, "got rank 2, shape (2, 3)"),
    ({"n_data": (2, 3, 4), "n_gamma": (4,)}, {},
     "gamma must have shape (3,) to match the 3 channels of data, got shape (4,)"),
    ({"n_data": (2, 3, 4), "n_beta": (3, 1)}, {},
     "beta must have shape (3,) to match the 3 channels of data, got shape (3, 1)"),
    ({"n_data": (2, 3, 4)}, {"axis": 3}, "axis 3 is out of range for data of rank 3"),
    ({"n_data": (2, 3, 4)}, {"axis": 0}, "axis 0 is the batch axis"),
]


@pytest.mark.parametrize("shapes,kwargs,message", SYM_BIND_CASES,
                         ids=[c[2][:20] for c in SYM_BIND_CASES])
def test_sym_bind_shape_error(capfd, usable, shapes, kwargs, message):
    s = mx_instnorm.sym.InstanceNorm(name="n", **kwargs)
    # simple_bind re-raises MXNet's error as a RuntimeError.
    with pytest.raises((MXNetError, RuntimeError)) as info:
        s.simple_bind(mx.cpu(), **shapes)
    captured = capfd.readouterr()
    assert message in str(info.value) + captured.out + captured.err
    usable()


@pytest.mark.parametrize("types,message", [
    ({"n_data": np.int32}, "data must be float16, bfloat16, float32 or float64, got int32"),
    ({"n_data": np.float64, "n_gamma": np.float32},
     "gamma/beta dtype float32 does not match data dtype float64"),
    ({"n_data": np.float32, "n_gamma": np.float32, "n_beta": np.float64},
     "gamma and beta must have the same dtype, got gamma float32 and beta float64"),
], ids=["int32", "mismatch", "gamma_beta"])
def test_sym_type_error(capfd, usable, types, message):
    s = mx_instnorm.sym.InstanceNorm(name="n")
    with pytest.raises(MXNetError) as info:
        s.infer_type(**types)
    captured = capfd.readouterr()
    assert message in str(info.value) + captured.out + captured.err
    usable()


def test_raw_custom_bad_shape(rng, usable):
    with pytest.raises(MXNetError):
        y = mx.nd.Custom(_arr(rng, (2, 3)), _arr(rng, (3,)), _arr(rng, (3,)),
                         op_type=mx_instnorm.OP_TYPE)
        y.wait_to_read()
    with pytest.raises(MXNetError):
        y = mx.nd.Custom(_arr(rng, (2, 3, 4)), _arr(rng, (5,)), _arr(rng, (3,)),
                         op_type=mx_instnorm.OP_TYPE)
        y.wait_to_read()
    usable()


_RAW_BAD_KEYWORD = """
import mxnet as mx, mx_instnorm
from mxnet.base import MXNetError
for fn in (mx.nd.Custom, mx.sym.Custom):
    args = ([mx.nd.ones((2, 3, 4)), mx.nd.ones(3), mx.nd.ones(3)] if fn is mx.nd.Custom
            else [mx.sym.var('x'), mx.sym.var('g'), mx.sym.var('b')])
    try:
        out = fn(*args, op_type=mx_instnorm.OP_TYPE, {kw}={value!r})
        if fn is mx.nd.Custom:
            out.wait_to_read()
        else:
            out.infer_shape(x=(2, 3, 4))
    except MXNetError:
        print('raised', fn.__name__)
x = mx.nd.array([[[1.0, 2.0, 4.0]]])
print('usable', mx_instnorm.nd.InstanceNorm(x, mx.nd.ones(1), mx.nd.zeros(1)).shape)
"""


@pytest.mark.parametrize("kw,value,message", [
    ("eps", "-1", "eps must be a finite number >= 0, got '-1'"),
    ("eps", "abc", "eps must be a number, got 'abc'"),
    ("axis", "a", "axis must be an integer, got 'a'"),
])
def test_raw_custom_bad_keyword_raises_not_crashes(kw, value, message):
    """mx.nd.Custom / mx.sym.Custom with a keyword string the op rejects
    must raise MXNetError (the message, echoing the value, is printed by
    MXNet's callback wrapper) and leave the process usable, not kill it.
    Run in a subprocess so that a crash fails this test only."""
    proc = subprocess.run([sys.executable, "-c", _RAW_BAD_KEYWORD.format(kw=kw, value=value)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 0, "process died (rc %d): %s" % (
        proc.returncode, proc.stderr.decode(errors="replace")[-600:])
    out = proc.stdout.decode()
    assert "raised Custom" in out and out.count("raised") == 2, out
    assert "usable (1, 1, 3)" in out
    assert message in out + proc.stderr.decode(errors="replace")


_RAW_UNKNOWN_KEYWORD = """
import mxnet as mx, mx_instnorm
from mxnet.base import MXNetError
x = mx.nd.array([[[1.0, 2.0, 4.0]]])
try:
    mx.nd.Custom(x, mx.nd.ones(1), mx.nd.zeros(1), op_type=mx_instnorm.OP_TYPE,
                 epsilon='1e-5').wait_to_read()
except MXNetError:
    print('raised nd')
try:
    mx.sym.Custom(mx.sym.var('x'), mx.sym.var('g'), mx.sym.var('b'),
                  op_type=mx_instnorm.OP_TYPE, eps='1e-5', momentum='0.9').infer_shape(x=(1, 1, 3))
except MXNetError:
    print('raised sym')
print('usable', mx_instnorm.nd.InstanceNorm(x, mx.nd.ones(1), mx.nd.zeros(1)).shape)
"""


def test_raw_custom_unknown_keyword_does_not_kill_the_process():
    """An unknown keyword used to make the Prop's constructor raise inside a
    ctypes callback: a segmentation fault. Subprocess: a crash fails only
    this test."""
    proc = subprocess.run([sys.executable, "-c", _RAW_UNKNOWN_KEYWORD],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                          cwd=tempfile.gettempdir())
    out = proc.stdout.decode()
    assert proc.returncode == 0, "process died (rc %d): %s" % (
        proc.returncode, proc.stderr.decode(errors="replace")[-600:])
    assert "raised nd" in out and "raised sym" in out, out
    assert "usable (1, 1, 3)" in out
    assert "got unknown keyword epsilon='1e-5'; accepted keywords: eps, axis" in out
    assert "got unknown keyword momentum='0.9'; accepted keywords: eps, axis" in out


def test_raw_custom_unknown_keyword_message(rng, usable):
    from mx_instnorm import explain_errors
    with pytest.raises(MXNetError, match=re.escape(
            "TypeError: mx_instnorm.InstanceNorm got unknown keywords epsilon='1e-5', "
            "zeta='2'; accepted keywords: eps, axis")) as info:
        with explain_errors():
            mx.nd.Custom(_arr(rng, (2, 3, 4)), _arr(rng, (3,)), _arr(rng, (3,)),
                         op_type=mx_instnorm.OP_TYPE, zeta="2", epsilon="1e-5").wait_to_read()
    # The original MXNetError is kept as the cause, and our text comes first.
    assert isinstance(info.value.__cause__, MXNetError)
    assert str(info.value).startswith("TypeError: mx_instnorm.InstanceNorm got unknown")
    usable()


def test_mxnet_attributes_are_not_unknown_keywords(rng):
    """MXNet passes an AttrScope's ``__ctx_group__``/``__lr_mult__`` to the
    Prop with our keywords; they are accepted (they used to kill the
    process like any keyword the constructor did not declare)."""
    with mx.AttrScope(ctx_group="dev1", lr_mult="2"):
        s = mx.sym.Custom(mx.sym.var("x"), mx.sym.var("g"), mx.sym.var("b"),
                          op_type=mx_instnorm.OP_TYPE, eps="1e-5", name="n")
    assert s.infer_shape(x=(2, 3, 4))[0] == [(2, 3, 4), (3,), (3,)]
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    ex = s.bind(mx.cpu(), {"x": mx.nd.array(x), "g": mx.nd.array(gamma),
                           "b": mx.nd.array(beta)})
    assert_close(ex.forward()[0].asnumpy(),
                 ref_forward(x, gamma.astype(np.float32), beta.astype(np.float32),
                             1e-5)[0], np.float32)


# The message MXNet's callback wrapper only prints reaches the exception
# raised inside explain_errors(): first, with the exception's type name.
# Graphs of raw Custom nodes: the Python Prop whatever the backend.
def _raw_sym(**kwargs):
    return mx.sym.Custom(mx.sym.var("n_data"), mx.sym.var("n_gamma"), mx.sym.var("n_beta"),
                         op_type=mx_instnorm.OP_TYPE, name="n",
                         **{k: str(v) for k, v in kwargs.items()})


@pytest.mark.parametrize("shapes,kwargs,message", SYM_BIND_CASES,
                         ids=[c[2][:20] for c in SYM_BIND_CASES])
def test_explain_errors_sym_bind(usable, shapes, kwargs, message):
    from mx_instnorm import explain_errors
    s = _raw_sym(**kwargs)
    # simple_bind re-raises MXNet's error as a plain RuntimeError: same class.
    with pytest.raises(RuntimeError, match=r"^ValueError: .*" + re.escape(message)):
        with explain_errors():
            s.simple_bind(mx.cpu(), **shapes)
    usable()


@pytest.mark.parametrize("types,message", [
    ({"n_data": np.int32}, "data must be float16, bfloat16, float32 or float64, got int32"),
    ({"n_data": np.float64, "n_gamma": np.float32},
     "gamma/beta dtype float32 does not match data dtype float64"),
], ids=["int32", "mismatch"])
def test_explain_errors_infer_type(usable, types, message):
    from mx_instnorm import explain_errors
    s = _raw_sym()
    with pytest.raises(MXNetError, match=r"^TypeError: .*" + re.escape(message)):
        with explain_errors():
            s.infer_type(**types)
    usable()


def test_explain_errors_create_operator(rng, monkeypatch, usable):
    """create_operator runs in the calling thread too (an imperative call
    creates its operator before returning): a bad MX_INSTNORM_PATH reaches
    the exception."""
    from mx_instnorm import explain_errors
    monkeypatch.setenv("MX_INSTNORM_PATH", "bogus")
    with pytest.raises(MXNetError, match=r"^ValueError: MX_INSTNORM_PATH must be one of "
                                         r"auto, fast, generic, got 'bogus' \(raised by "
                                         r"mx_instnorm's InstanceNormProp.create_operator\)"):
        with explain_errors():
            mx.nd.Custom(_arr(rng, (2, 3, 4)), _arr(rng, (3,)), _arr(rng, (3,)),
                         op_type=mx_instnorm.OP_TYPE).wait_to_read()
    monkeypatch.delenv("MX_INSTNORM_PATH")
    usable()


def test_explain_errors_leaves_other_errors_alone(rng):
    """An MXNetError of another operator, with nothing recorded by ours,
    passes through unchanged, as does any other exception."""
    from mx_instnorm import explain_errors
    with pytest.raises(MXNetError) as info:
        with explain_errors():
            mx.nd.dot(_arr(rng, (2, 3)), _arr(rng, (4, 5))).wait_to_read()
    assert "mx_instnorm" not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(KeyError):
        with explain_errors():
            raise KeyError("k")
    # A failure of ours that the caller handled does not label a later,
    # unrelated error.
    with pytest.raises(RuntimeError, match="^unrelated$"):
        with explain_errors():
            try:
                _raw_sym().infer_shape(n_data=(2, 3))
            except MXNetError:
                pass
            raise RuntimeError("unrelated")


def test_explain_errors_is_a_decorator_and_nests(rng):
    from mx_instnorm import explain_errors

    @explain_errors()
    def bind():
        with explain_errors():
            return _raw_sym().infer_shape(n_data=(2, 3))
    with pytest.raises(MXNetError) as info:
        bind()
    # Explained once, not twice (MXNet's own text does not carry it).
    assert str(info.value).count("got rank 2, shape (2, 3)") == 1
    assert str(info.value).startswith("ValueError: InstanceNorm needs data of rank >= 3")


# --------------------------------------------------------------- Gluon ------
GLUON_CTOR_CASES = [
    ({"axis": 0}, ValueError, "axis 0 is the batch axis"),
    ({"axis": "c"}, TypeError, "axis must be an integer, got 'c'"),
    ({"epsilon": -1e-5}, ValueError, "epsilon must be a finite number >= 0, got -1e-05"),
    ({"epsilon": float("nan")}, ValueError, "epsilon must be a finite number >= 0, got nan"),
    ({"epsilon": "abc"}, TypeError, "epsilon must be a number, got 'abc'"),
    ({"epsilon": True}, TypeError, "epsilon must be a number, got True"),
    ({"in_channels": -1}, ValueError, "in_channels must be an integer >= 0, got -1"),
    ({"in_channels": 2.5}, ValueError, "in_channels must be an integer >= 0, got 2.5"),
]


@pytest.mark.parametrize("kwargs,exc,message", GLUON_CTOR_CASES,
                         ids=[str(c[0]) for c in GLUON_CTOR_CASES])
def test_gluon_constructor_error(usable, kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        InstanceNorm(**kwargs)
    usable()


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_gluon_forward_wrong_channels(rng, usable, hybridize):
    block = InstanceNorm(in_channels=3)
    block.initialize()
    if hybridize:
        block.hybridize()
    with pytest.raises(ValueError, match=re.escape(
            "was built for 3 channels but data of shape (2, 4, 5) has 4 on axis 1")):
        block(_arr(rng, (2, 4, 5)))
    # The block itself still works with the right input.
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    assert_close(block(mx.nd.array(x)).asnumpy(),
                 ref_forward(x, np.ones(3), np.zeros(3), 1e-5)[0], np.float32)
    usable()


def test_gluon_hybridized_bad_input_after_good_calls(rng, usable):
    """After good calls a hybridized block on the compiled backend lets the
    library validate (the fast path); bad input still gets the block's own
    messages, and the block keeps working."""
    block = InstanceNorm(in_channels=3)
    block.initialize()
    block.hybridize()
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    want = ref_forward(x, np.ones(3), np.zeros(3), 1e-5)[0]
    for _ in range(2):
        assert_close(block(mx.nd.array(x)).asnumpy(), want, np.float32)
    with pytest.raises(ValueError, match=re.escape(
            "was built for 3 channels but data of shape (2, 4, 5) has 4 on axis 1")):
        block(_arr(rng, (2, 4, 5)))
    with pytest.raises(ValueError, match=re.escape("got rank 2, shape (2, 3)")):
        block(_arr(rng, (2, 3)))
    with pytest.raises(TypeError, match="cast the block"):
        block(mx.nd.array(x, dtype=np.float64))
    assert_close(block(mx.nd.array(x)).asnumpy(), want, np.float32)
    usable()


def test_gluon_forward_wrong_channels_after_deferred_init(rng, usable):
    block = InstanceNorm(axis=-1)
    block.initialize()
    block(_arr(rng, (2, 5, 3)))
    with pytest.raises(ValueError, match=re.escape(
            "was built for 3 channels but data of shape (2, 5, 4) has 4 on axis -1")):
        block(_arr(rng, (2, 5, 4)))
    usable()


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_gluon_forward_low_rank(rng, usable, hybridize):
    block = InstanceNorm(in_channels=3)
    block.initialize()
    if hybridize:
        block.hybridize()
    with pytest.raises(ValueError, match=re.escape("got rank 2, shape (2, 3)")):
        block(_arr(rng, (2, 3)))
    usable()


def test_gluon_forward_axis_out_of_range(rng, usable):
    block = InstanceNorm(axis=3)
    block.initialize()
    with pytest.raises(ValueError, match="axis 3 is out of range for data of rank 3"):
        block(_arr(rng, (2, 3, 4)))
    usable()


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_gluon_forward_dtype_mismatch(rng, usable, hybridize):
    """float64 data into a float32 block: a TypeError naming both dtypes,
    raised before a graph is built (MXNet would give a bare MXNetError)."""
    block = InstanceNorm(in_channels=3)
    block.initialize()
    if hybridize:
        block.hybridize()
    x = rng.standard_normal((2, 3, 5))
    with pytest.raises(TypeError, match="gamma/beta dtype float32 does not match data "
                                        "dtype float64"):
        block(mx.nd.array(x, dtype="float64"))
    block.cast("float64")
    assert_close(block(mx.nd.array(x, dtype="float64")).asnumpy(),
                 ref_forward(x, np.ones(3), np.zeros(3), 1e-5)[0], np.float64)
    usable()


# -------------------------------------------------- kernel and environment --

def test_kernel_rejects_integer_data(rng):
    with pytest.raises(TypeError, match="dtype must be float16, float32 or float64, got int64"):
        instance_norm_forward(np.arange(24).reshape(2, 3, 4), np.ones(3), np.zeros(3))


def test_kernel_rejects_bad_param_shape(rng):
    with pytest.raises(ValueError, match=re.escape("gamma must have shape (3,)")):
        instance_norm_forward(rng.standard_normal((2, 3, 4)), np.ones(4), np.zeros(3))


def test_kernel_rejects_negative_eps(rng):
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1.0"):
        instance_norm_forward(rng.standard_normal((2, 3, 4)), np.ones(3), np.zeros(3), eps=-1)


def test_kernel_rejects_bad_out(rng):
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match=re.escape("out must be a numpy.ndarray of shape (2, 3, 4)")):
        instance_norm_forward(x, np.ones(3), np.zeros(3), out=np.empty((2, 3, 5)))
    with pytest.raises(TypeError, match="out must have dtype float64, got float32"):
        instance_norm_forward(x, np.ones(3), np.zeros(3), out=np.empty((2, 3, 4), np.float32))


def test_kernel_rejects_mismatched_dy(rng):
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match="dy must match x in shape and dtype"):
        instance_norm_backward(x.astype(np.float32), x, np.ones(3))


def test_bad_path_variable(monkeypatch):
    monkeypatch.setenv("MX_INSTNORM_PATH", "bogus")
    with pytest.raises(ValueError, match="MX_INSTNORM_PATH must be one of .*got 'bogus'"):
        implementation("cpu", custom_op=True)


@pytest.mark.parametrize("value", ["x", "0"])
def test_bad_thread_variable(monkeypatch, value):
    monkeypatch.setenv("MX_INSTNORM_NUM_THREADS", value)
    with pytest.raises(ValueError, match="MX_INSTNORM_NUM_THREADS must be a positive integer, "
                                         "got '%s'" % value):
        default_num_threads()


def test_main_job_error_gist_drops_the_stack_trace():
    # MXNet 1.6's errors, as raised by its built-in on float16 data: the
    # gist is the check's last words, never a "[bt]" line of the trace.
    from mx_instnorm.__main__ import _error_line
    err = MXNetError("[20:44:03] include/mxnet/operator.h:228: Check failed: in_type->at(i) "
                     "== mshadow::default_type_flag: Unsupported data type 2\n"
                     "Stack trace:\n  [bt] (0) libmxnet.so(+0x307d3b) [0x7fb0ffb07d3b]\n"
                     "  [bt] (8) /lib/x86_64-linux-gnu/libffi.so.8(+0x6f7a) [0x7fb10b088f7a]")
    assert _error_line(err) == "Unsupported data type 2 (MXNetError)"
    # MXNet 1.9's form (no stack trace): the same gist.
    assert _error_line(MXNetError("MXNetError: Check failed: ...: Unsupported data type 1")) \
        == "Unsupported data type 1 (MXNetError)"
