"""Carrying the Prop's own message into the ``MXNetError`` the user catches.

MXNet 1.9.1 runs a CustomOpProp's ``infer_shape``, ``infer_type`` and
``create_operator`` inside ctypes callbacks (``python/mxnet/operator.py``).
An exception there is caught by MXNet's wrapper, which ``print``\\ s the
traceback to **stdout** and returns False; ``src/operator/custom/custom.cc``
then fails a ``CHECK`` and the user gets an ``MXNetError`` naming only that
check. Our message never reaches the exception.

So the Prop records the exception it raises (:func:`record_errors` on its
methods) and :func:`explain_errors`, around a call into MXNet, turns an
``MXNetError`` raised inside it into one of the same class whose text
starts with the recorded message, chained from the original::

    from mx_instnorm.operator._errors import explain_errors

    with explain_errors():
        executor = symbol.simple_bind(mx.cpu(), data=(2, 3))

    @explain_errors()          # or as a decorator
    def forward(self, x): ...

The record is per thread: MXNet calls the inference callbacks in the thread
that asked for inference (the one calling ``nd.Custom``, ``simple_bind``,
``infer_shape`` or running a Gluon block), which is the thread inside
:func:`explain_errors`.
"""
import contextlib
import functools
import threading

from mxnet.base import MXNetError

__all__ = ["record_errors", "explain_errors", "last_error", "library_message",
           "reraise_library_error"]

_state = threading.local()


def _record(err, where):
    _state.last = (err, where)


def last_error():
    """``(exception, where)`` recorded by the Prop in this thread, or None."""
    return getattr(_state, "last", None)


def _clear():
    _state.last = None


def record_errors(method):
    """Decorates a Prop callback: an exception it raises is recorded (for
    :func:`explain_errors`) and raised on unchanged."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - recorded, then re-raised as is
            _record(err, method.__name__)
            raise
    return wrapper


def _explained(err, recorded):
    cause, where = recorded
    text = "%s: %s (raised by mx_instnorm's InstanceNormProp.%s)" % (
        type(cause).__name__, cause, where)
    original = str(err)
    # Only the failure MXNet reports for a CustomOp callback (a check in
    # src/operator/custom/custom.cc) is ours to explain.
    if original.startswith(text) or "custom.cc" not in original:
        return None
    try:
        new = type(err)("%s\n\nMXNet's own report follows:\n%s" % (text, original))
    except Exception:  # noqa: BLE001 - an error class with another signature
        new = MXNetError("%s\n\nMXNet's own report follows:\n%s" % (text, original))
    return new


@contextlib.contextmanager
def explain_errors():
    """Re-raises an ``MXNetError`` raised inside it with the message the
    Prop recorded in this thread put first.

    ``Symbol.simple_bind`` re-raises MXNet's error as a plain
    ``RuntimeError`` (MXNetError's base class); that is handled the same way.
    The exception raised is of the original's class (so ``except
    MXNetError`` keeps working), its text starts with ``"<Type>: <our
    message> (raised by mx_instnorm's InstanceNormProp.<method>)"``, and its
    ``__cause__`` is the original. An ``MXNetError`` with nothing recorded
    since entering, or that is not MXNet's report of a failed CustomOp
    callback (no ``custom.cc`` in its text), passes through untouched, as
    does every other exception. Nesting is harmless: the innermost use
    consumes the record. Usable as a decorator too.
    """
    _clear()
    try:
        yield
    except (RuntimeError, MXNetError) as err:
        # MXNetError, or the plain RuntimeError simple_bind re-raises it as
        # (MXNet 1.6's MXNetError is no RuntimeError).
        recorded = last_error()
        _clear()
        if recorded is None:
            raise
        new = _explained(err, recorded)
        if new is None:
            raise
        raise new from err


# ------------------------------------------- the compiled operator's errors --
# lib_api (MXNet's extension-library API) keeps every message a library ever
# reported through its public MX_ERROR_MSG, and MXNet appends them all to each
# error of a library operator, oldest first:
#
#     MXNetError: Check failed: retval: Error calling FCompute for custom
#     operator 'mx_instnorm_InstanceNorm'
#     Extension Traceback:
#             [0] .../lib_instance_norm.cc[146]: <the first failure's message>
#             [1] .../lib_instance_norm.cc[160]: <this failure's message>
#
# The current message is the last entry.
_TRACEBACK = "Extension Traceback:"


def library_message(err):
    """The message the compiled operator reported for this error (the last
    entry of MXNet's "Extension Traceback", without its file and line), or
    None when ``err`` carries none."""
    text = str(err)
    if _TRACEBACK not in text:
        return None
    entries = [line.strip() for line in text.split(_TRACEBACK, 1)[1].splitlines()
               if line.strip().startswith("[")]
    if not entries:
        return None
    entry = entries[-1].split("] ", 1)[-1]  # "[i] file[line]: message"
    return entry.split("]: ", 1)[1] if "]: " in entry else entry


def reraise_library_error(err):
    """Raises ``err`` again as an error of its class whose text is the
    library's current message first, then MXNet's report with only that
    message left in its "Extension Traceback"; returns if ``err`` carries
    no library message."""
    message = library_message(err)
    if message is None:
        return
    text = str(err)
    head, tail = text.split(_TRACEBACK, 1)
    last = [line for line in tail.splitlines() if line.strip().startswith("[")][-1]
    report = "%s%s\n%s" % (head, _TRACEBACK, last)
    try:
        new = type(err)("%s\n\nMXNet's report:\n%s" % (message, report))
    except Exception:  # noqa: BLE001 - an error class with another signature
        new = MXNetError("%s\n\nMXNet's report:\n%s" % (message, report))
    raise new from None
