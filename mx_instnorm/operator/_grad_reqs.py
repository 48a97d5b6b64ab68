"""What MXNet was asked to do with each autograd leaf's gradient.

A leaf (an NDArray marked with ``attach_grad`` or
``autograd.mark_variables``, a Gluon parameter's data) has a request,
'write', 'add' or 'null', that MXNet keeps in its C++ autograd node and
honours by passing ``req`` to the operator that produces the leaf's
gradient. MXNet 1.9.1 does not pass ``req`` to a library operator, and no
C API reads a leaf's request back, so :mod:`.functions` must know it before
feeding a leaf to the compiled operator: a leaf whose gradient is written
(or not computed) can take the operator's gradient directly, one whose
gradient is added needs a view in between (see ``functions._compiled``).

So the request is recorded where it is given. Every Python path that marks
a variable (``NDArray.attach_grad``, ``mxnet.numpy.ndarray.attach_grad``,
``autograd.mark_variables``, ``contrib.autograd``, Gluon parameters) calls
``_LIB.MXAutogradMarkVariables``, looking the function up on MXNet's one
ctypes library object at each call; this module replaces that attribute,
once, by a wrapper that calls MXNet's function and then records each
gradient buffer with its request.

A buffer is known by its storage chunk: the object every NDArray of that
memory shares (``std::shared_ptr<Chunk>``, the first member of
``mxnet::NDArray``, read through the handle; checked when this module is
imported, and without it nothing is recorded). A leaf's ``grad`` is a new
NDArray of the chunk it was marked with. The chunk is fixed when the NDArray
is made, in the calling thread, unlike the memory address, which the engine
thread sets when it first runs an operator on the array.

Reading back is conservative: a leaf marked before this module was imported,
or through the C API directly, has no record and reads ``UNKNOWN`` (the
callers then keep the view), and so does a chunk given twice in one marking
with different requests. A record outlives its chunk, but a chunk is only
looked up through a leaf's gradient; a gradient marked through the wrapper
replaces any record at its address, and one marked before the import was
alive, at its own address, during the life of every chunk recorded since.
"""
import ctypes

import mxnet as mx
from mxnet.base import _LIB, check_call

from ._ndview import _OUT_POINTER as _OUT, _get_data_nogil, c_function

__all__ = ["UNKNOWN", "has_history", "leaf_grad_memory", "leaf_grad_req", "recording"]

UNKNOWN = "unknown"

# MXNet's OpReqType codes, as mark_variables sends them.
_REQ_NAMES = {0: "null", 1: "write", 3: "add"}
# Records kept at most: past this the table starts again empty (every leaf
# reads UNKNOWN until it is marked again), so that a program marking fresh
# arrays in a loop does not grow it without bound.
_MAX_RECORDS = 1 << 16

# storage chunk address -> request name.
_records = {}
# Whether leaf_grad_memory may read a chunk's memory (checked at import).
_memory_layout = False


# None of these waits for the engine: the GIL is kept.
_get_grad = c_function("MXNDArrayGetGrad", ctypes.c_void_p, _OUT)
_free = c_function("MXNDArrayFree", ctypes.c_void_p)
_get_symbol = c_function("MXAutogradGetSymbol", ctypes.c_void_p, _OUT)
_free_symbol = c_function("MXSymbolFree", ctypes.c_void_p)


def _chunk(handle):
    """The storage chunk of the NDArray at ``handle`` (an address)."""
    return ctypes.c_void_p.from_address(handle).value


def _chunk_memory(chunk):
    """(first address, end) of a chunk's memory, or None while the engine
    has not allocated it. ``Chunk`` starts with its ``Storage::Handle``,
    which starts with ``dptr`` and ``size``: two words the engine thread
    writes once, each whole, so that a read racing the allocation sees
    either nothing yet (None) or the final values."""
    words = (ctypes.c_size_t * 2).from_address(chunk)
    return (words[0], words[0] + words[1]) if words[0] and words[1] else None


def leaf_grad_req(arr):
    """The request recorded for ``arr``'s gradient.

    Returns
    -------
    str or None
        ``'write'``, ``'add'`` or ``'null'`` as ``arr`` was marked; ``None``
        when ``arr`` has no gradient buffer (it is not a leaf); ``UNKNOWN``
        when its marking was not recorded.
    """
    # Called for every input of every recorded call: written for speed.
    grad = ctypes.c_void_p()
    rc = _get_grad(arr.handle, ctypes.byref(grad))
    if rc:
        check_call(rc)
    handle = grad.value
    if not handle:
        return None
    req = _records.get(ctypes.c_void_p.from_address(handle).value, UNKNOWN)
    check_call(_free(handle))
    return req


def leaf_grad_memory(arr):
    """(first address, end) of the memory of ``arr``'s gradient buffer; None
    when ``arr`` has none, when it is not allocated yet, or when the chunk
    layout did not check out at import."""
    if not _memory_layout:
        return None
    grad = ctypes.c_void_p()
    check_call(_get_grad(arr.handle, ctypes.byref(grad)))
    if not grad.value:
        return None
    try:
        return _chunk_memory(_chunk(grad.value))
    finally:
        check_call(_free(grad))


def has_history(arr):
    """Whether autograd recorded ``arr`` (a leaf, or the output of a
    recorded operator): only then can a gradient reach it. The C API has no
    direct question; getting its recorded graph fails otherwise."""
    sym = ctypes.c_void_p()
    if _get_symbol(arr.handle, ctypes.byref(sym)) != 0:
        return False
    check_call(_free_symbol(sym))
    return True


def _record(num_var, grad_handles, reqs):
    marked = {}
    for i in range(int(getattr(num_var, "value", num_var))):
        chunk = _chunk(grad_handles[i])
        req = _REQ_NAMES.get(int(reqs[i]), UNKNOWN)
        marked[chunk] = req if marked.get(chunk, req) == req else UNKNOWN
    if len(_records) + len(marked) > _MAX_RECORDS:
        _records.clear()
    _records.update(marked)


def _layout_holds():
    """Whether the first word of an NDArray is its chunk: equal for two
    NDArrays of one buffer, different for a copy."""
    a = mx.nd.zeros((2, 2))
    same, other = a.reshape((4,)), a.copy()
    return (_chunk(a.handle.value) == _chunk(same.handle.value)
            != _chunk(other.handle.value))


def _memory_layout_holds():
    """Whether a chunk's first two words are its memory's address and size,
    as MXNet's C API reports them for an array made and finished."""
    a = mx.nd.arange(6)
    a.wait_to_read()
    part = a[2:4]
    address = ctypes.c_void_p()
    check_call(_get_data_nogil(part.handle, ctypes.byref(address)))
    memory = _chunk_memory(_chunk(a.handle.value))
    return memory is not None and memory[0] + 8 == address.value and memory[1] >= memory[0] + 24


def recording():
    """Whether requests are being recorded (the wrapper is installed)."""
    return getattr(_LIB.MXAutogradMarkVariables, "_mx_instnorm_records", False)


def _install():
    global _memory_layout  # pylint: disable=global-statement
    if recording() or not _layout_holds():
        return
    _memory_layout = _memory_layout_holds()
    mark = _LIB.MXAutogradMarkVariables

    def mark_and_record(num_var, var_handles, reqs, grad_handles):
        rc = mark(num_var, var_handles, reqs, grad_handles)
        try:
            if rc != 0:
                raise RuntimeError("marking failed")
            _record(num_var, grad_handles, reqs)
        except Exception:  # pylint: disable=broad-except
            # Whatever went wrong, no record may be stale.
            _records.clear()
        return rc

    mark_and_record._mx_instnorm_records = True
    _LIB.MXAutogradMarkVariables = mark_and_record


_install()
