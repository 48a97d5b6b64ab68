"""The one place that decides which implementation computes InstanceNorm.

Three implementations compute the same function with the same maths
(derived once, in :mod:`mx_instnorm.kernel.instance_norm`):

* ``'compiled'``: the C++ operator of ``libmx_instnorm.so``, built by
  ``pip install`` against the installed MXNet and registered with
  ``mx.library.load`` under the name :data:`mx_instnorm.COMPILED_OP`
  (CPU only);
* ``'numpy'``: the Python ``CustomOp`` registered under ``OP_TYPE``, with
  the NumPy kernel on views of the CPU arrays' own memory;
* ``'generic'``: the same ``CustomOp`` computing with ``mx.nd`` operators
  on the arrays' own context (:mod:`.generic`); what a GPU runs.

:func:`implementation` answers "which one computes this call"; everything
else (the nd/sym functions, the CustomOp's ``create_operator``, the Gluon
block's graph cache) asks it. Two environment variables steer it, read on
every call, so a process may switch (a hybridized block keeps the graph it
built until it is rebuilt: ``block.hybridize()`` or a new input layout):

* ``MX_INSTNORM_BACKEND``: ``auto`` (the default: compiled when the library
  loads, the CustomOp otherwise), ``compiled`` (an error when it cannot
  load) or ``python`` (the CustomOp);
* ``MX_INSTNORM_PATH``: ``auto`` (the default), ``fast`` or ``generic``:
  within the CustomOp, ``generic`` computes with ``mx.nd`` on CPU too.

The compiled operator has a CPU implementation only: nd calls on other
contexts always run the CustomOp's generic path. A graph is built without
knowing where it will run, as for CPU; a graph for a GPU needs
``MX_INSTNORM_BACKEND=python``.

Examples
--------
>>> from mx_instnorm.operator.backend import implementation
>>> implementation("gpu")
'generic'
>>> implementation("cpu", custom_op=True) in ("numpy", "generic")
True
>>> implementation("cpu") in ("compiled", "numpy", "generic")
True
"""
import os

from . import compiled

__all__ = ["BACKENDS", "PATHS", "IMPLEMENTATIONS", "implementation", "backend",
           "backend_reason", "compiled_op", "use_compiled"]

BACKENDS = ("auto", "compiled", "python")
PATHS = ("auto", "fast", "generic")
IMPLEMENTATIONS = ("compiled", "numpy", "generic")
_ENV = "MX_INSTNORM_BACKEND"
_PATH_ENV = "MX_INSTNORM_PATH"
_CPU = ("cpu", "cpu_pinned", "cpu_shared")


# (variable, its raw value) -> the choice it spells: read on every call (a
# test or a server may change it at run time), parsed once per value.
_choices = {}


def _choice(env, allowed):
    raw = os.environ.get(env)
    value = _choices.get((env, raw))
    if value is None:
        value = (raw or "auto").strip().lower() or "auto"
        if value not in allowed:
            raise ValueError("%s must be one of %s, got %r" % (env, ", ".join(allowed), raw))
        _choices[(env, raw)] = value
    return value


def compiled_op():
    """The compiled operator's registered name, loading the library on first
    use; None when it cannot be loaded (see :func:`backend_reason`).

    >>> from mx_instnorm.operator.backend import compiled_op
    >>> compiled_op() in (None, 'mx_instnorm_InstanceNorm')
    True
    """
    return compiled.status()[0]


def backend():
    """``'compiled'`` or ``'python'``: the backend that builds graphs and
    computes CPU arrays now (the ``MX_INSTNORM_BACKEND`` part of
    :func:`implementation`).

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
    choice = _choice(_ENV, BACKENDS)
    if choice == "python":
        return "python"
    name, reason = compiled.status()
    if name is None:
        if choice == "compiled":
            raise RuntimeError("%s=compiled, but mx_instnorm's compiled operator is "
                               "not available: %s" % (_ENV, reason))
        return "python"
    return "compiled"


def implementation(device_type=None, custom_op=False):
    """Which implementation computes a call: ``'compiled'``, ``'numpy'`` or
    ``'generic'``.

    Parameters
    ----------
    device_type : str or None
        The data's ``context.device_type`` (``'cpu'``, ``'gpu'``, ...);
        None for a graph, whose context is not known when it is built
        (treated as CPU).
    custom_op : bool
        True where the CustomOp already runs (its ``create_operator``: a
        graph built on the Python backend, or converted with
        :func:`mx_instnorm.to_custom`): only ``'numpy'`` or ``'generic'``.

    Raises
    ------
    ValueError
        ``MX_INSTNORM_BACKEND`` or ``MX_INSTNORM_PATH`` holds an unknown
        value (``MX_INSTNORM_PATH`` is read only where the CustomOp runs).
    RuntimeError
        ``MX_INSTNORM_BACKEND=compiled`` and the library cannot be loaded.

    Examples
    --------
    >>> from mx_instnorm.operator.backend import implementation
    >>> implementation("gpu")
    'generic'
    """
    # The library operator is registered for plain CPU arrays; the NumPy
    # kernel reads any CPU memory (pinned and shared included).
    if device_type in (None, "cpu") and not custom_op and backend() == "compiled":
        return "compiled"
    if (device_type is not None and device_type not in _CPU) \
            or _choice(_PATH_ENV, PATHS) == "generic":
        return "generic"
    return "numpy"


def use_compiled(device_type=None):
    """Whether :func:`implementation` picks the compiled operator."""
    return implementation(device_type) == "compiled"


def backend_reason():
    """One line on why :func:`backend` is what it is.

    Examples
    --------
    >>> import mx_instnorm
    >>> isinstance(mx_instnorm.backend_reason(), str)
    True
    """
    choice = _choice(_ENV, BACKENDS)
    if choice == "python":
        return "%s=python forces the Python CustomOp" % _ENV
    name, reason = compiled.status()
    if name is None:
        return "the compiled operator is not available: %s" % reason
    return "compiled operator %s loaded from %s" % (name, compiled.library_path())
