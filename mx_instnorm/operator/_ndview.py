"""NumPy views of CPU NDArray memory, for the CustomOp's numpy path.

``MXNDArrayGetData`` (MXNet's C API) returns the address of an NDArray's
first element (byte offset included); wrapped with ``__array_interface__``
it becomes an ndarray that reads and writes MXNet's buffer directly: no
``asnumpy()`` copy in, no ``mx.nd.array()`` copy out.

This is only sound where the caller owns the memory for the duration of the
access: inside ``CustomOp.forward``/``backward`` the engine has finished
every producer of the inputs and holds the outputs for this op, and the
arrays MXNet hands a CustomOp are plain, default-layout, dense copies
(``AllocateNDArrayCopy`` in src/operator/custom/custom.cc).
"""
import ctypes
import math

import numpy as np
from mxnet.base import _LIB, check_call


def c_function(name, *argtypes, keep_gil=True):
    """MXNet's C API function ``name`` with its argument types declared. The
    GIL is kept during the call (``ctypes.PyDLL``: cheaper) unless
    ``keep_gil`` is False (``ctypes.CDLL``), which a call that may wait for
    the engine needs."""
    fn = getattr((ctypes.PyDLL if keep_gil else ctypes.CDLL)(_LIB._name), name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_OUT_POINTER = ctypes.POINTER(ctypes.c_void_p)


# MXNDArrayGetData converts an array a oneDNN operator left in a blocked
# layout: it queues a reorder and waits for the engine. An engine thread may
# need the GIL to get there (it runs CustomOp callbacks, among them the
# delete callback when it drops the last reference to an op), so a call that
# can wait must release the GIL: ctypes.CDLL does.
_get_data_nogil = c_function("MXNDArrayGetData", ctypes.c_void_p, _OUT_POINTER,
                             keep_gil=False)

# The same function through PyDLL, keeping the GIL, for numpy_view only:
# inside a CustomOp callback the arrays are plain copies MXNet has finished
# (the call reads a pointer and never waits), and releasing and re-taking
# the GIL around each call, with the engine thread and the user's thread
# competing for it, cost more than the call itself.
_get_data = c_function("MXNDArrayGetData", ctypes.c_void_p, _OUT_POINTER)

__all__ = ["c_function", "numpy_view", "plain_layout"]


class _Interface:
    """The smallest object NumPy accepts as an array description."""

    __slots__ = ("__array_interface__",)

    def __init__(self, address, shape, typestr):
        self.__array_interface__ = {
            "data": (address, False),
            "shape": shape,
            "typestr": typestr,
            "version": 3,
        }


def plain_layout(arr):
    """Makes MXNet convert ``arr`` to the plain layout in place if a oneDNN
    operator left it blocked (``MXNDArrayGetData`` does that once the array
    is computed, hence the wait); free for a plain array."""
    arr.wait_to_read()
    check_call(_get_data_nogil(arr.handle, ctypes.byref(ctypes.c_void_p())))


def numpy_view(arr, shape, dtype):
    """An ndarray over the memory of the CPU NDArray ``arr``.

    Only for arrays MXNet handed a CustomOp callback (plain, computed): the
    call keeps the GIL.

    ``shape`` (a tuple of ints) and ``dtype`` (a ``numpy.dtype``) are what
    the caller already knows of ``arr`` (from the Prop), which saves two C
    API round trips per array.
    """
    if not math.prod(shape):
        return np.empty(shape, dtype)
    address = ctypes.c_void_p()
    check_call(_get_data(arr.handle, ctypes.byref(address)))
    if not address.value:
        raise RuntimeError("MXNDArrayGetData returned no memory for an NDArray "
                           "of shape %s" % (shape,))
    return np.asarray(_Interface(address.value, shape, dtype.str))
