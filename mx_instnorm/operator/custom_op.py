"""The InstanceNorm CustomOp: the Op computes, the Prop declares.

``InstanceNormProp`` parses its string keywords strictly, infers the shapes
(``gamma``/``beta`` get ``(C,)`` from the data, which Gluon's deferred
initialization relies on) and dtypes of every argument, and declares that
backward needs only ``dy``, ``x`` and ``gamma``. ``InstanceNormOp`` runs
what :func:`mx_instnorm.operator.backend.implementation` picks for its
context when it is created:

* ``'numpy'`` (CPU arrays): NumPy views of the NDArrays' own memory are
  handed to :mod:`mx_instnorm.kernel`, which writes outputs and gradients
  in place, honouring ``req``;
* ``'generic'`` (any context): :mod:`.generic`, the same maths in ``mx.nd``
  operators on the arrays' own context; what a GPU runs, and CPU too with
  ``MX_INSTNORM_PATH=generic`` (tests check both paths against the same
  references).

The per-instance ``mean``/``rstd`` the NumPy forward computes are kept on
the Op instance (a few bytes per instance, never an output) together with
the address of the data they came from; backward reuses them when it sees
the same data address and recomputes them otherwise.
"""
import atexit

import mxnet as mx
import numpy as np
from mxnet.ndarray.ndarray import _DTYPE_MX_TO_NP

from .. import kernel
from . import _params, generic
from ._errors import record_errors
from ._ndview import numpy_view
from .backend import implementation

__all__ = ["OP_TYPE", "InstanceNormOp", "InstanceNormProp",
           "bf16_to_float32", "float32_to_bf16"]

OP_TYPE = "mx_instnorm.InstanceNorm"


_BF16_BITS = np.dtype(np.uint16)


def bf16_to_float32(bits):
    """bfloat16 bit patterns (uint16) as float32 values: exact.

    >>> bf16_to_float32(np.array([0x3f80, 0xc040], np.uint16))
    array([ 1., -3.], dtype=float32)
    """
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values):
    """float32 values as bfloat16 bit patterns, rounded to nearest even; a
    NaN stays a quiet NaN.

    >>> [hex(b) for b in float32_to_bf16(np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8]))]
    ['0x3f80', '0x3f80', '0x3f82']
    """
    values = np.ascontiguousarray(values, np.float32)
    bits = values.view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = ((bits + np.uint32(0x7fff) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


class InstanceNormOp(mx.operator.CustomOp):
    """Computes instance normalization; see :mod:`mx_instnorm.kernel`."""

    def __init__(self, eps, axis, shapes, dtypes, path):
        super().__init__()
        self._eps = eps
        self._axis = _params.normalize_axis(axis, len(shapes[0]))
        self._shapes = [tuple(int(d) for d in s) for s in shapes]
        # create_operator receives MXNet's dtype codes (0 float32, 1 float64, ...).
        self._dtypes = [np.dtype(_DTYPE_MX_TO_NP[int(d)]) for d in dtypes]
        self._path = path
        self._saved = None

    # -- numpy path --------------------------------------------------------
    # The arrays MXNet hands a CustomOp on a CPU context are dense and in the
    # plain layout (our Prop declares no sparse storage), so the path chosen
    # from the context in create_operator holds for every call.
    def _view(self, arr, which):
        return numpy_view(arr, self._shapes[which], self._dtypes[which])

    def forward(self, is_train, req, in_data, out_data, aux):
        if self._path == "numpy" and self._dtypes[0] == _params.BFLOAT16:
            self._bf16_forward(req, in_data, out_data)
            return
        if self._path == "numpy":
            x = self._view(in_data[0], 0)
            y = None if req[0] == "null" else self._view(out_data[0], 0)
            _, mean, rstd = kernel.instance_norm_forward(
                x, self._view(in_data[1], 1), self._view(in_data[2], 2),
                self._eps, self._axis, out=y, req=req[0])
            self._saved = (mean, rstd, x.__array_interface__["data"][0])
            return
        if req[0] == "null":
            return
        self._generic_forward(req, in_data, out_data)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        if all(r == "null" for r in req):
            return
        if self._path == "numpy" and self._dtypes[0] == _params.BFLOAT16:
            self._bf16_backward(req, out_grad, in_data, in_grad)
            return
        if self._path == "numpy":
            x = self._view(in_data[0], 0)
            mean = rstd = None
            saved = self._saved
            if saved is not None and saved[2] == x.__array_interface__["data"][0]:
                mean, rstd = saved[0], saved[1]
            grads = [None if r == "null" else self._view(g, i)
                     for i, (r, g) in enumerate(zip(req, in_grad))]
            kernel.instance_norm_backward(
                self._view(out_grad[0], 0), x, self._view(in_data[1], 1),
                mean, rstd, self._eps, self._axis,
                grads[0], grads[1], grads[2], req=tuple(req))
            return
        self._generic_backward(req, out_grad, in_data, in_grad)

    # -- bfloat16 (fast path) ---------------------------------------------
    # NumPy has no bfloat16 arithmetic: the NumPy kernel computes in float32
    # from the exactly widened data and each result is rounded once, to
    # nearest even, into bfloat16 (as the compiled kernel does).
    def _float32(self, arr, which):
        if self._dtypes[which] == _params.BFLOAT16:
            return bf16_to_float32(numpy_view(arr, self._shapes[which], _BF16_BITS))
        return self._view(arr, which)

    def _put(self, arr, which, req, value):
        if req == "null":
            return
        if self._dtypes[which] != _params.BFLOAT16:
            dst = self._view(arr, which)
            dst[...] = dst + value if req == "add" else value
            return
        dst = numpy_view(arr, self._shapes[which], _BF16_BITS)
        dst[...] = float32_to_bf16(bf16_to_float32(dst) + value if req == "add" else value)

    def _bf16_forward(self, req, in_data, out_data):
        x = self._float32(in_data[0], 0)
        # The statistics are recomputed in backward (these widened copies
        # have no address to recognize the data by).
        y, _, _ = kernel.instance_norm_forward(
            x, self._float32(in_data[1], 1), self._float32(in_data[2], 2),
            self._eps, self._axis, req="write" if req[0] != "null" else "null")
        if y is not None:
            self._put(out_data[0], 0, req[0], y)

    def _bf16_backward(self, req, out_grad, in_data, in_grad):
        grads = kernel.instance_norm_backward(
            self._float32(out_grad[0], 0), self._float32(in_data[0], 0),
            self._float32(in_data[1], 1), None, None, self._eps, self._axis,
            req=tuple("null" if r == "null" else "write" for r in req))
        for i, (r, g) in enumerate(zip(req, grads)):
            if g is not None:
                self._put(in_grad[i], i, r, g)

    # -- generic path ------------------------------------------------------
    def _generic_forward(self, req, in_data, out_data):
        x, gamma, beta = in_data
        if 0 in self._shapes[0]:
            return
        y = generic.forward(x, gamma, beta, self._eps, self._axis)
        self.assign(out_data[0], req[0], generic.cast(y, self._dtypes[0]))

    def _generic_backward(self, req, out_grad, in_data, in_grad):
        if 0 in self._shapes[0]:
            for r, g in zip(req[1:], in_grad[1:]):
                if r in ("write", "inplace"):
                    g[:] = 0
            return
        grads = generic.backward(out_grad[0], in_data[0], in_data[1], self._eps,
                                 self._axis, want=[r != "null" for r in req])
        for i, grad in enumerate(grads):
            if grad is not None:
                self.assign(in_grad[i], req[i], generic.cast(grad, self._dtypes[i]))


class InstanceNormProp(mx.operator.CustomOpProp):
    """Declares arguments, shapes, dtypes and backward dependencies."""

    def __init__(self, eps="0.001", axis="1", **others):
        super().__init__(need_top_grad=True)
        # MXNet calls this constructor from a ctypes callback that does not
        # catch exceptions (an exception here kills the process), so a bad
        # or unknown keyword is kept and raised from infer_shape/infer_type/
        # create_operator instead, which MXNet turns into an MXNetError.
        self._error = None
        # MXNet passes its own attributes (``__ctx_group__``, ``__lr_mult__``
        # from an AttrScope, ...) along with ours; they are not ours to judge.
        unknown = sorted(k for k in others if not (k.startswith("__") and k.endswith("__")))
        try:
            self.eps = _params.parse_eps(eps)
            self.axis = _params.parse_axis(axis)
            if unknown:
                raise TypeError(
                    "%s got unknown keyword%s %s; accepted keywords: eps, axis"
                    % (OP_TYPE, "s" if len(unknown) > 1 else "",
                       ", ".join("%s=%r" % (k, others[k]) for k in unknown)))
        except (TypeError, ValueError) as err:
            self._error = err
            self.eps, self.axis = 1e-3, 1

    def _raise_bad_keyword(self):
        if self._error is not None:
            raise type(self._error)(str(self._error))

    def list_arguments(self):
        return ["data", "gamma", "beta"]

    def list_outputs(self):
        return ["output"]

    @record_errors
    def infer_shape(self, in_shape):
        self._raise_bad_keyword()
        data = tuple(in_shape[0])
        if len(data) == 0:
            # Unknown yet (partial inference): nothing to tell.
            return in_shape, [data], []
        channels = _params.check_data_shape(data, self.axis)
        if channels < 0:
            return in_shape, [data], []
        params = []
        for name, shape in (("gamma", in_shape[1]), ("beta", in_shape[2])):
            shape = tuple(shape)
            # (), (0,) and (-1,) mean "not known yet" (Gluon's deferred init).
            if shape not in ((), (0,), (-1,)):
                _params.check_param_shape(name, shape, channels)
            params.append((channels,))
        return [data] + params, [data], []

    @record_errors
    def infer_type(self, in_type):
        self._raise_bad_keyword()
        data, gamma, beta = in_type
        if data is None:
            data = gamma if gamma is not None else np.float32
        if gamma is None and beta is None:
            # Half data keeps float32 parameters, as AMP wants them and as
            # the compiled operator infers.
            half = np.dtype(data) in (np.dtype(np.float16), _params.BFLOAT16)
            gamma = beta = np.float32 if half else data
        elif gamma is None:
            gamma = beta
        elif beta is None:
            beta = gamma
        _params.check_dtypes(data, gamma, beta)
        return [data, gamma, beta], [data], []

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        # dy, x and gamma; the output y and beta are not needed.
        return [out_grad[0], in_data[0], in_data[1]]

    @record_errors
    def create_operator(self, ctx, in_shapes, in_dtypes):
        self._raise_bad_keyword()
        device_type = str(ctx).split("(")[0]
        return InstanceNormOp(self.eps, self.axis, in_shapes, in_dtypes,
                              implementation(device_type, custom_op=True))


_registered = False


def _finish_pending_work():
    """Waits for MXNet's queued work at interpreter exit.

    MXNet 1.9.1 shuts its engine down (``MXNotifyShutdown``, registered with
    ``atexit`` when mxnet is imported) while CustomOp callbacks may still be
    queued; a script that ends with CustomOp results not yet read then dies
    at exit now and then ("terminate called without an active exception",
    or a corrupted heap): 12 of 30 runs of a script with a trivial CustomOp
    on a loaded 2-core machine, 0 of 30 with ``mx.nd.waitall()`` at its end.
    Registered after mxnet's handler, this one runs before it.
    """
    try:
        mx.nd.waitall()
    except Exception:  # noqa: BLE001 - exiting: a failed op was reported already
        pass


def register():
    """Registers the op under :data:`OP_TYPE` (once per process) and the
    exit-time wait of :func:`_finish_pending_work`. (The before-fork drain,
    :mod:`mx_instnorm.integration._fork`, is installed by the package.)"""
    global _registered
    if not _registered:
        mx.operator.register(OP_TYPE)(InstanceNormProp)
        atexit.register(_finish_pending_work)
        _registered = True
