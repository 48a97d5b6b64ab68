"""The one place that decides which backend computes InstanceNorm.

Two backends compute the same function with the same maths (derived once,
in :mod:`mx_instnorm.kernel.instance_norm`):

* ``'compiled'``: the C++ operator of ``libmx_instnorm.so``, built by
  ``pip install`` against the installed MXNet and registered with
  ``mx.library.load`` under the name :data:`COMPILED_OP`;
* ``'python'``: the Python ``CustomOp`` registered under ``OP_TYPE``, with
  the NumPy kernel on CPU and ``mx.nd`` operators on other contexts.

``MX_INSTNORM_BACKEND`` picks one: ``auto`` (the default: compiled when
the library loads, python otherwise), ``compiled`` (an error when it cannot
load) or ``python``. It is read on every call, so a process may switch; a
hybridized block keeps the backend its graph was built with until it is
rebuilt (``block.hybridize()`` or a new input layout).

The compiled operator has a CPU implementation only: nd calls on other
contexts always run the Python ``CustomOp``, whose generic path computes
with ``mx.nd`` operators on the data's own context. A graph built for a GPU
needs ``MX_INSTNORM_BACKEND=python``.
"""
import os

__all__ = ["BACKENDS", "backend", "backend_reason", "compiled_op", "use_compiled"]

BACKENDS = ("auto", "compiled", "python")
_ENV = "MX_INSTNORM_BACKEND"

# (operator name or None, reason it is unavailable or None); set once.
_loaded = None


def _requested():
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError("%s must be one of %s, got %r"
                         % (_ENV, ", ".join(BACKENDS), os.environ.get(_ENV)))
    return choice


def _load():
    global _loaded
    if _loaded is None:
        try:
            from . import compiled
        except ImportError as err:  # a partial source tree
            _loaded = (None, "its loader does not import: %s" % err)
            return _loaded
        try:
            _loaded = (compiled.load(), None)
        except compiled.CompiledUnavailable as err:
            _loaded = (None, str(err))
    return _loaded


def compiled_op():
    """The compiled operator's registered name, loading the library on first
    use; None when it cannot be loaded (see :func:`backend_reason`)."""
    return _load()[0]


def backend():
    """``'compiled'`` or ``'python'``: the backend used for CPU arrays now.

    Raises
    ------
    RuntimeError
        ``MX_INSTNORM_BACKEND=compiled`` and the compiled library cannot be
        loaded (the message says why).
    ValueError
        ``MX_INSTNORM_BACKEND`` holds something else than auto, compiled or
        python.

    Examples
    --------
    >>> import mx_instnorm
    >>> mx_instnorm.backend() in ('compiled', 'python')
    True
    """
    choice = _requested()
    if choice == "python":
        return "python"
    name, reason = _load()
    if name is None:
        if choice == "compiled":
            raise RuntimeError("%s=compiled, but mx_instnorm's compiled operator is "
                               "not available: %s" % (_ENV, reason))
        return "python"
    return "compiled"


def use_compiled():
    """Whether CPU work goes to the compiled operator now (see :func:`backend`)."""
    return backend() == "compiled"


def backend_reason():
    """One line on why :func:`backend` is what it is.

    Examples
    --------
    >>> import mx_instnorm
    >>> isinstance(mx_instnorm.backend_reason(), str)
    True
    """
    choice = _requested()
    if choice == "python":
        return "%s=python forces the Python CustomOp" % _ENV
    name, reason = _load()
    if name is None:
        return "the compiled operator is not available: %s" % reason
    from . import compiled
    return "compiled operator %s loaded from %s" % (name, compiled.library_path())
