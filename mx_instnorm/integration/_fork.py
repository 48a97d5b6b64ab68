"""Makes ``fork()`` safe after the Python CustomOp has run.

MXNet 1.9.1 installs ``pthread_atfork`` handlers: before every ``fork()``
(``LibraryInitializer::atfork_prepare``) it joins the CustomOp worker
threads (``CustomOperator::Stop``) and stops the engine, which waits for all
work and joins its threads. CPython holds the GIL through ``fork()``. A
thread that needs the GIL at that moment therefore deadlocks the parent, and
MXNet's threads need it more often than one would think: the last reference
to a CustomOp's state is dropped *after* the op has reported completion,

* by the CustomOp worker thread, when it destroys its copy of the queued
  work (``CustomOperator::ThreadTarget``), or
* by an engine thread, when it deletes the finished temporary operator
  (``ThreadedEngine::OnComplete`` deletes it after it has woken the
  threads waiting to read the operator's outputs),

and dropping it calls the op's Python delete callback, which waits for the
GIL. So "read a result, then fork" hangs whenever that tail has not run yet;
``mx.nd.waitall()`` does not help, and neither does queued, not yet run,
CustomOp work (the worker must run it before it can be joined).

:func:`_drain` runs as an ``os.register_at_fork(before=...)`` handler, with
the GIL released around every wait:

1. ``MXNDArrayWaitAll``: every queued operator, CustomOp callbacks included,
   has run.
2. A barrier: one call of a no-op CustomOp, waited for. It goes through the
   engine's CPU worker and the CustomOp worker queue, each first-in
   first-out, so it ends after every tail those threads had left. But MXNet
   gives a queued CustomOp call a new worker thread when none is free, and
   a worker counts itself free just before its tail: if a thread appeared
   while the barrier ran, the worker with the tail was busy, so after 1 ms
   (GIL released) the barrier runs again (up to 20 times). The barrier is
   recorded by autograd and its output kept until the next fork (or exit),
   so its own state is released on the forking thread, never as a tail.
   (A bound executor would keep its state too, but binding one logs
   "Subgraph backend MKLDNN is activated" on stderr.)
3. ``MXNDArrayWaitAll`` again.

After that no MXNet thread needs the GIL, and MXNet's handlers stop and
restart its threads as usual. What remains uncovered: with two or more
CustomOp workers (MXNet starts more only when several CustomOp calls are
queued at once), a barrier that finds one of them free passes that one
only; a tail left on another gets the GIL during the waits unless it has
not reached it by their end. Forks that skip Python's at-fork handlers
(``subprocess`` without ``preexec_fn`` on Python < 3.10, which calls plain
``fork()``) are not covered.
"""
import atexit
import ctypes
import os
import threading
import time

import mxnet as mx
from mxnet.base import _LIB, check_call

__all__ = ["install"]

BARRIER_OP_TYPE = "mx_instnorm._fork_barrier"

# Through ctypes.CDLL, so the GIL is released while MXNet waits.
_wait_all = ctypes.CDLL(_LIB._name).MXNDArrayWaitAll
_wait_all.argtypes = ()
_wait_all.restype = ctypes.c_int

_installed = False
_MAX_ROUNDS = 20
# The last barrier's output. Recorded by autograd, it holds the barrier op's
# state (and its Prop) until the next fork replaces it, so that MXNet's
# threads never drop the last reference to them (which would call a Python
# delete callback: the very tail the barrier waits for).
_barrier = None


class _BarrierOp(mx.operator.CustomOp):
    """Does nothing: its forward only marks its turn in the queues."""

    def forward(self, is_train, req, in_data, out_data, aux):
        pass

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        pass


class _BarrierProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=False)

    def list_arguments(self):
        return ["data"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _BarrierOp()


def _customop_used():
    # MXNet numbers every CustomOp Prop and Op it creates (any op type);
    # none yet means no CustomOp thread and no callback can be pending. Read
    # defensively: a private attribute of mxnet.operator.
    registry = getattr(mx.operator, "_registry", None)
    return getattr(registry, "counter", 1) > 0


def _in_mxnet_thread():
    # A CustomOp callback runs on a thread Python did not start; forking
    # from there, waiting for the queues would wait for ourselves.
    return isinstance(threading.current_thread(), threading._DummyThread)


def _threads():
    """The OS threads of this process now, or None where /proc is missing."""
    try:
        return set(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _pass_barrier():
    """One call of the barrier op, waited for with the GIL released."""
    global _barrier
    # Replacing the previous barrier's output frees its state here, on this
    # thread, where its delete callback finds the GIL.
    _barrier = None
    data = mx.nd.zeros((1,), ctx=mx.cpu())
    data.attach_grad()
    with mx.autograd.record(train_mode=False):
        out = mx.nd.Custom(data, op_type=BARRIER_OP_TYPE)
    out.wait_to_read()
    _barrier = out


def _drain():
    """The before-fork handler (see the module docstring)."""
    if not _customop_used() or _in_mxnet_thread():
        return
    try:
        check_call(_wait_all())
        for _ in range(_MAX_ROUNDS):
            before = _threads()
            _pass_barrier()
            if before is not None and _threads() <= before:
                break
            # MXNet started a thread for the barrier (a CustomOp worker,
            # or the engine's after a fork): the worker we meant to pass
            # was busy, and its tail may still come. Let it run, then again.
            time.sleep(0.001)
        check_call(_wait_all())
    except mx.base.MXNetError:
        # A failed operator: its error stays on the arrays it was to write
        # and is raised when they are read. A fork handler cannot raise.
        pass


def _release_barrier():
    # At exit, before MXNet shuts its engine down (atexit runs handlers in
    # reverse order; mxnet registered its own at import, before this one):
    # freeing the recorded output after that crashes the interpreter.
    global _barrier
    _barrier = None


def install():
    """Registers the barrier op and the before-fork handler (once)."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    mx.operator.register(BARRIER_OP_TYPE)(_BarrierProp)
    os.register_at_fork(before=_drain)
    atexit.register(_release_barrier)
    _installed = True
