"""``InstanceNorm`` as nd and sym functions, on the implementation that
:func:`.backend.implementation` picks.

Both validate what they can see before anything runs (eps, axis, and for
NDArrays shapes and dtypes), so bad input raises a clear ``ValueError`` or
``TypeError`` here rather than an opaque failure inside an operator.
:func:`instance_norm` builds the fragment every entry point (nd, sym, the
Gluon block, :func:`mx_instnorm.patch_mxnet`) runs: the compiled operator
fed through views that keep ``grad_req='add'`` correct, or the Python
CustomOp with the layout guards of :mod:`._onednn` (see docs/onednn.md).
"""
import ctypes
import os

import mxnet as mx
from mxnet.base import check_call

from . import _params, backend, compiled
from ._errors import explain_errors
from ._grad_reqs import has_history, leaf_grad_memory, leaf_grad_req
from ._ndview import c_function
from ._onednn import guard_input, guard_output
from .custom_op import OP_TYPE

__all__ = ["exec_addto", "instance_norm", "nd_instance_norm", "sym_instance_norm"]

_NDArray = mx.nd.NDArray

# mx.nd / mx.sym functions of the compiled operator, looked up once per name.
_compiled_functions = {}


def _compiled_function(F, op_name):
    key = (F.__name__, op_name)
    fn = _compiled_functions.get(key)
    if fn is None:
        # Graphs keep the generated symbol function's single node (gamma and
        # beta are declared as vectors here instead: _declare_rank_one).
        fn = _compiled_functions[key] = (compiled.generated_function(F) if F is mx.sym
                                         else getattr(F, op_name))
    return fn


def _view(F, arr, name, suffix):
    """``arr`` through a same-shape ``identity`` node of its own (see
    :func:`instance_norm`: where gradients are accumulated)."""
    return F.identity(arr, **_named(name, suffix))


def _named(name, suffix):
    return {} if name is None else {"name": name + suffix}


# The operator's internal attribute that says, per call, where backward
# puts each gradient (lib_instance_norm.cc, GradDest).
GRADS_KEY = "__mx_instnorm_grads__"


def _gradient_destinations(arrays):
    """The arrays to feed the compiled operator while autograd records, and
    the value of its ``GRADS_KEY`` attribute (None: write every gradient).

    Per input: a leaf marked 'write' takes the gradient directly; 'null',
    and data with no gradient buffer and no history, get none computed
    ('-': no write, no memory touched); an 'add' leaf gets it added in place
    when MXNet hands over the leaf's own buffer ('+lo:hi', its memory), or
    written when MXNet hands over a buffer of its own to sum later (the
    leaf has other consumers). A leaf whose request is not known, or not
    honoured in place (MXNET_EXEC_ENABLE_ADDTO, a buffer not allocated yet),
    goes through a view, as in a graph. gamma and beta with no gradient
    buffer are written: C elements, not worth asking autograd about.
    """
    addto = exec_addto()
    fed, dests = [], []
    for i, arr in enumerate(arrays):
        req = leaf_grad_req(arr)
        dest = None
        if req is None:
            dest = "-" if i == 0 and not has_history(arr) else "w"
        elif req == "null":
            dest = "-"
        elif req == "write" and not addto:
            dest = "w"
        elif req == "add" and not addto:
            memory = leaf_grad_memory(arr)
            dest = None if memory is None else "+%d:%d" % memory
        if dest is None:
            arr, dest = arr.reshape(arr.shape), "w"
        fed.append(arr)
        dests.append(dest)
    return fed, (None if dests == ["w", "w", "w"] else ",".join(dests))


def exec_addto():
    """Whether MXNet may sum gradients in place (``MXNET_EXEC_ENABLE_ADDTO``):
    then an op can be asked to add to any gradient entry."""
    return os.environ.get("MXNET_EXEC_ENABLE_ADDTO", "").strip().lower() not in (
        "", "0", "false")


def _compiled(F, data, gamma, beta, eps, axis, name, out):
    """The fragment over the compiled operator.

    MXNet 1.9.1 does not pass ``req`` to a library operator, which therefore
    always overwrites its gradient outputs: fed directly by an array whose
    gradient is accumulated (a variable with ``grad_req='add'``, or any
    entry whose gradients an executor sums in place under
    ``MXNET_EXEC_ENABLE_ADDTO``), it would silently drop what was there.

    Imperatively (``F`` is ``mx.nd``, under ``autograd.record()``) each
    input's request is known: the op is told per call where each gradient
    goes (:func:`_gradient_destinations`) and no input needs a view, unless
    its marking was not recorded. A graph must stay right under whatever
    requests it is bound with, so there such an input goes through an
    ``identity`` view of its own, whose gradient only our op writes and
    whose own backward honours ``req``: ``gamma`` and ``beta`` always (C
    elements), the data when it is a graph input (a variable) or when
    in-place summing is enabled; the data inside a network (a convolution's
    output) needs none, and a view there would cost a copy each way in a
    default hybridized graph. The op needs no layout guard: it runs
    synchronously as a native operator, after MXNet's own reorders of
    oneDNN layouts. It has one output, named ``<name>_output`` as the
    built-in's.
    """
    op = _compiled_function(F, backend.compiled_op())
    kwargs = dict(_op_kwargs(eps, axis))
    if F is mx.nd:
        if mx.autograd.is_recording():
            (data, gamma, beta), grads = _gradient_destinations((data, gamma, beta))
            if grads is not None:
                kwargs[GRADS_KEY] = grads
        if out is not None:
            kwargs["out"] = out
        return op(data, gamma, beta, **kwargs)
    for param in (gamma, beta):
        _declare_rank_one(param)
    if exec_addto() or data.get_children() is None:
        data = _view(F, data, name, "_data")
    gamma, beta = _view(F, gamma, name, "_gamma"), _view(F, beta, name, "_beta")
    if name is not None:
        kwargs["name"] = name
    return op(data, gamma, beta, **kwargs)


# Small calls notice every microsecond of Python around the op: eps and
# axis are parsed, and the op's string arguments made, once per value.
_parsed = {}
_kwargs = {}
_CACHE_SIZE = 256


def _remember(cache, key, value):
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _parse(eps, axis):
    """(eps, axis) parsed as :mod:`._params` does; raises as it does."""
    key = (type(eps), eps, type(axis), axis)
    try:
        return _parsed[key]
    except KeyError:
        return _remember(_parsed, key, (_params.parse_eps(eps), _params.parse_axis(axis)))
    except TypeError:  # an unhashable value: parsed, not remembered
        return _params.parse_eps(eps), _params.parse_axis(axis)


def _op_kwargs(eps, axis):
    """The compiled operator's arguments for a parsed eps and axis."""
    try:
        return _kwargs[(eps, axis)]
    except KeyError:
        return _remember(_kwargs, (eps, axis), {"eps": repr(float(eps)), "axis": str(int(axis))})


# Never waits for the engine: the GIL is kept.
_get_context = c_function("MXNDArrayGetContext", ctypes.c_void_p,
                          ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))


def _on_plain_cpu(arr):
    """Whether ``arr`` lives on the plain CPU context (``arr.context`` makes
    a Context object: a tenth of a tiny call)."""
    dev_type, dev_id = ctypes.c_int(), ctypes.c_int()
    check_call(_get_context(arr.handle, ctypes.byref(dev_type), ctypes.byref(dev_id)))
    return dev_type.value == 1  # Context.devstr2type['cpu']


def _declare_rank_one(param):
    """Marks a gamma/beta variable whose shape is not declared as a vector.

    MXNet 1.9.1's shape inference for library operators sizes a buffer by
    adding up the inputs' ranks, an unknown rank counting as -1, and then
    writes every known dimension into it: with gamma and beta of unknown
    rank it writes past the buffer's end (rank-2 data: a crash). A variable
    declared as a vector of unknown length (what Gluon's deferred
    parameters are) has rank 1, and the library fills in its length.
    """
    if param.get_children() is None and param.attr("__shape__") is None:
        param._set_attr(__shape__="(-1,)" if mx.util.is_np_shape() else "(0,)")


def _custom(F, data, gamma, beta, eps, axis, name, out, rank, empty):
    """The fragment over the Python CustomOp, with the layout guards of
    :mod:`._onednn`. In a graph (hybridized block, Module, ``F`` in a user's
    HybridBlock) both guards are always there: the output copy that a
    CachedOp needs for correct gradients after a oneDNN convolution, and the
    in-place input reshape, or a copying ``expand_dims``/``squeeze`` pair
    where the rank is unknown or above 4, or the data is empty."""
    kwargs = {"op_type": OP_TYPE, "eps": repr(float(eps)), "axis": str(int(axis))}
    if F is mx.nd:
        if name is not None:
            kwargs["name"] = name
        if out is not None:
            kwargs["out"] = out
        return guard_output(F, F.Custom(guard_input(F, data), gamma, beta, **kwargs))
    if name is not None:
        # The last node of the fragment carries ``name``, as the built-in's
        # single node does, so ``<name>_output`` names the result.
        kwargs["name"] = name + "_op"
    copy_input = rank is None or rank > 4 or empty
    y = F.Custom(guard_input(F, data, copy_input, name), gamma, beta, **kwargs)
    return guard_output(F, y, name)


def instance_norm(F, data, gamma, beta, eps, axis, name=None, out=None,
                  rank=None, empty=False):
    """The graph fragment, for ``F`` = ``mx.nd`` or ``mx.sym`` (no checks).

    :func:`.backend.implementation` picks the operator: for a graph
    (``F`` is ``mx.sym``) as for CPU, for NDArrays from their context.
    ``rank`` and ``empty`` describe the data where known (they pick the
    Python backend's input guard in a graph).
    """
    if F is not mx.nd:
        device_type = None
    else:
        device_type = "cpu" if _on_plain_cpu(data) else data.context.device_type
    if backend.use_compiled(device_type):
        return _compiled(F, data, gamma, beta, eps, axis, name, out)
    return _custom(F, data, gamma, beta, eps, axis, name, out, rank, empty)


def _expect(kind, name, value):
    if not isinstance(value, kind):
        article = "an" if kind.__name__[0] in "AEIOUN" else "a"
        raise TypeError("%s must be %s %s, got %s"
                        % (name, article, kind.__name__, type(value).__name__))


def nd_instance_norm(data, gamma, beta, eps=1e-3, axis=1, out=None, name=None):
    r"""Instance normalization of an NDArray.

    .. math::

        y = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{Var}(x) + \epsilon}}
            \, \gamma + \beta

    with the mean and the biased variance taken, for each batch item and
    channel, over every axis except 0 and ``axis``.

    Parameters
    ----------
    data : NDArray
        float16, bfloat16, float32 or float64, rank >= 3, batch on axis 0.
        On the Python backend bfloat16 is widened to float32 (exactly) for
        the NumPy kernel and each result rounded back to nearest even.
    gamma, beta : NDArray, shape (C,)
        Same dtype as ``data`` (or float32 with float16 or bfloat16 data).
    eps : float, default 1e-3
        Added to the variance, inside the square root; >= 0.
    axis : int, default 1
        The channel axis; negative counts from the end; not 0.
    out : NDArray, optional
        Where to write the result.
    name : str, optional

    Returns
    -------
    NDArray
        Same shape and dtype as ``data``.

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> x = mx.nd.array([[[1.1, 2.2]], [[3.3, 4.4]]])
    >>> y = mx_instnorm.nd.InstanceNorm(x, mx.nd.array([1.5]), mx.nd.array([0.5]))
    >>> print(y.asnumpy().round(5))
    [[[-0.99753  1.99753]]
    <BLANKLINE>
     [[-0.99753  1.99753]]]
    """
    eps, axis = _parse(eps, axis)
    if (out is None and type(data) is _NDArray and type(gamma) is _NDArray
            and type(beta) is _NDArray and _on_plain_cpu(data) and backend.use_compiled("cpu")):
        # Tiny calls notice every C API round trip (~1 us each): the library
        # validates shapes and dtypes itself, so they are checked here only
        # when it refuses, to raise the ValueError/TypeError the Python
        # backend raises, with the same message.
        try:
            return _compiled(mx.nd, data, gamma, beta, eps, axis, name, None)
        except mx.MXNetError:
            pass
    for arg_name, value in (("data", data), ("gamma", gamma), ("beta", beta)):
        _expect(mx.nd.NDArray, arg_name, value)
    shape, dtype = data.shape, data.dtype
    channels = _params.check_data_shape(shape, axis)
    _params.check_param_shape("gamma", gamma.shape, channels)
    _params.check_param_shape("beta", beta.shape, channels)
    _params.check_dtypes(dtype, gamma.dtype, beta.dtype)
    if out is not None:
        _expect(mx.nd.NDArray, "out", out)
        if out.shape != shape or out.dtype != dtype:
            raise ValueError("out must have the data's shape %s and dtype %s, got "
                             "%s %s" % (shape, dtype.__name__, out.shape,
                                        out.dtype.__name__))
    if 0 in shape and not mx.util.is_np_shape():
        # MXNet's legacy shape rules read a 0 as "unknown" and no operator
        # can run on such an array; the result of an empty batch is empty.
        return out if out is not None else mx.nd.empty(shape, dtype=dtype)
    if backend.use_compiled(data.context.device_type):
        # The library's own errors carry its message already.
        return _compiled(mx.nd, data, gamma, beta, eps, axis, name, out)
    with explain_errors():
        return _custom(mx.nd, data, gamma, beta, eps, axis, name, out, len(shape), False)


def sym_instance_norm(data=None, gamma=None, beta=None, eps=1e-3, axis=1, name=None):
    r"""Instance normalization as a Symbol; see :func:`nd_instance_norm`.

    As with ``mx.sym.InstanceNorm``, arguments left out become variables
    named ``<name>_data``, ``<name>_gamma`` and ``<name>_beta``.

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> s = mx_instnorm.sym.InstanceNorm(mx.sym.var('x'), name='in1')
    >>> s.list_arguments()
    ['x', 'in1_gamma', 'in1_beta']
    >>> s.infer_shape(x=(2, 3, 4))[0]
    [(2, 3, 4), (3,), (3,)]
    """
    eps = _params.parse_eps(eps)
    axis = _params.parse_axis(axis)
    name = mx.name.NameManager._current.value.get(name, "instancenorm")
    data = mx.sym.var(name + "_data") if data is None else data
    gamma = mx.sym.var(name + "_gamma") if gamma is None else gamma
    beta = mx.sym.var(name + "_beta") if beta is None else beta
    for arg_name, value in (("data", data), ("gamma", gamma), ("beta", beta)):
        _expect(mx.sym.Symbol, arg_name, value)
    # ``name`` already carries any Prefix in scope: build under a plain
    # NameManager so that it is not applied twice.
    with mx.name.NameManager():
        return instance_norm(mx.sym, data, gamma, beta, eps, axis, name)
