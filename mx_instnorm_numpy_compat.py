"""Restore the NumPy names that MXNet 1.9.1 reads and newer NumPy removed.

This is a compatibility fix for MXNet itself, not for mx_instnorm: MXNet
1.9.1 (the newest release on PyPI) reads ``numpy.bool`` when it is imported,
an alias NumPy 1.24 removed, and its ``mxnet.numpy`` modules read more
names that NumPy 2.0 and 2.4 removed (``np.NaN``, ``np.alltrue``,
``np.in1d``, ...). Python 3.12 needs NumPy >= 1.26 and Python 3.13 NumPy 2,
so ``import mxnet`` fails there without these names.

How it is loaded: ``mx_instnorm_numpy_compat.pth``, installed at the top of
site-packages with mx_instnorm, runs :func:`install` when Python starts.
That imports nothing but this module: it puts a finder on
:data:`sys.meta_path` that waits for the first ``import mxnet``, then adds
the missing names to ``numpy`` (importing it), removes itself, and lets the
import go on. With NumPy < 1.24 (Python 3.10 and 3.11) no name is missing
and nothing is added.

Rules: a name is added only where ``numpy`` lacks it; an existing name is
never changed (NumPy 2 has a ``numpy.bool`` of its own, the ``numpy.bool_``
type, and keeps it). Each value is what NumPy 1.23 gave for that name.
"""
import sys

__all__ = ["NAMES", "install", "missing_names", "patch_numpy"]

# Every name MXNet 1.9.1 reads from numpy that some NumPy release removed:
# "bool" (1.24; mxnet/numpy/utils.py at import), "int" (1.24;
# mxnet.test_utils), the constants, functions and ``compat.basestring``
# (2.0; mxnet/numpy/utils.py, mxnet/numpy/fallback.py, Gluon's estimator
# defaults, the numpy-op front ends), "in1d" and "trapz" (2.4; fallback.py).
# The financial functions were already placeholders in NumPy 1.20-1.26
# (calling one raised, pointing to numpy-financial); fallback.py still
# binds them at import.
_FINANCIAL = ("mirr", "npv", "pmt", "ppmt", "pv", "rate")
NAMES = ("bool", "int", "PZERO", "NZERO", "NINF", "PINF", "NAN", "NaN", "Inf",
         "alltrue", "sometrue", "round_", "product", "msort", "in1d", "trapz",
         "compat.basestring") + _FINANCIAL


def _expired(name):
    """NumPy 1.20-1.26's placeholder for a removed financial function."""
    def expired(*args, **kwargs):
        raise RuntimeError(
            "In accordance with NEP 32, the function %s was removed from NumPy "
            "version 1.20. A replacement for this function is available in the "
            "numpy_financial library: https://pypi.org/project/numpy-financial"
            % name)
    expired.__name__ = name
    return expired


def _values(np):
    """name -> the value NumPy 1.23 had, built from what ``np`` still has."""
    def msort(a):
        """Sort along the first axis (NumPy's removed ``msort``)."""
        return np.sort(a, axis=0)

    def in1d(ar1, ar2, assume_unique=False, invert=False):
        """Flattened :func:`numpy.isin` (NumPy's removed ``in1d``)."""
        return np.isin(np.asarray(ar1).ravel(), ar2,
                       assume_unique=assume_unique, invert=invert)

    inf = float("inf")
    values = {
        "bool": bool, "int": int,
        "PZERO": 0.0, "NZERO": -0.0, "NINF": -inf, "PINF": inf,
        "NAN": float("nan"), "NaN": float("nan"), "Inf": inf,
        "alltrue": np.all, "sometrue": np.any, "round_": np.round,
        "product": np.prod, "msort": msort, "in1d": in1d,
        "trapz": getattr(np, "trapezoid", None),
        "compat.basestring": str,
    }
    values.update((name, _expired(name)) for name in _FINANCIAL)
    return values


def _has(obj, name):
    import warnings
    with warnings.catch_warnings():
        # NumPy 1.20-1.23 warn on access to the aliases they deprecated.
        warnings.simplefilter("ignore")
        try:
            getattr(obj, name)
        except AttributeError:
            return False
    return True


def missing_names(np=None):
    """The names of :data:`NAMES` that ``np`` (default: numpy) lacks.

    >>> import numpy
    >>> missing = missing_names(numpy)
    >>> set(missing) <= set(NAMES)
    True
    """
    if np is None:
        import numpy as np
    missing = []
    for name in NAMES:
        owner, _, attr = name.rpartition(".")
        target = np
        if owner:
            if not _has(np, owner):
                missing.append(name)
                continue
            target = getattr(np, owner)
        if not _has(target, attr):
            missing.append(name)
    return missing


def patch_numpy(np=None):
    """Add the names of :data:`NAMES` that ``np`` lacks; return them.

    Names ``np`` has are left as they are. Calling it again adds nothing.
    """
    if np is None:
        import numpy as np
    missing = missing_names(np)
    if not missing:
        return []
    import types
    values = _values(np)
    added = []
    for name in missing:
        value = values[name]
        if value is None:
            continue  # (trapz with a NumPy that has neither trapz nor trapezoid)
        owner, _, attr = name.rpartition(".")
        target = np
        if owner:
            if not _has(np, owner):
                # NumPy without a ``compat`` submodule: a plain namespace
                # holding only what MXNet reads from it.
                setattr(np, owner, types.ModuleType("%s.%s" % (np.__name__, owner)))
            target = getattr(np, owner)
        setattr(target, attr, value)
        added.append(name)
    return added


class _MXNetImportHook:
    """A :data:`sys.meta_path` finder that finds nothing: on the first import
    of ``mxnet`` (or a submodule) it removes itself, patches numpy, and
    leaves the import to the ordinary finders."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mxnet" or fullname.startswith("mxnet."):
            _remove_hook()
            try:
                patch_numpy()
            except ImportError:
                pass  # no numpy: MXNet's own import reports it
        return None


def _remove_hook():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MXNetImportHook)]


def install():
    """Patch numpy now if MXNet is already imported, else when it is first
    imported. Idempotent; imports nothing until then."""
    if "mxnet" in sys.modules:
        patch_numpy()
        return
    if not any(isinstance(f, _MXNetImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _MXNetImportHook())
