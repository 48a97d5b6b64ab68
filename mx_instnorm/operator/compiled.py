"""Loads the compiled InstanceNorm operator (``libmx_instnorm.so``).

``pip install`` builds the library against the installed MXNet (see
``setup.py``); :func:`load` registers its operator with
``mx.library.load`` once per process and returns the operator's name,
:data:`OP_NAME`. When the library cannot be used, :func:`load` raises
:class:`CompiledUnavailable` with a one-line reason, every time (the
failure is cached too). Which backend runs is decided elsewhere
(:mod:`mx_instnorm.operator.backend`), never here.

The operator, as registered (see ``lib_instance_norm.cc``): inputs
``data, gamma, beta``, attributes ``eps`` (default 0.001) and ``axis``
(default 1), one output ``y``. Its backward reads ``dy``, ``data`` and
``gamma`` and always writes its three gradients (MXNet 1.9.1 passes no
``req`` to a library operator).

The raw functions. ``mx.library.load`` generates ``mx.nd.<OP_NAME>`` and
``mx.sym.<OP_NAME>``; :func:`load` replaces them with the safe versions of
:func:`_install_raw_functions` (the generated ones stay available through
:func:`generated_function`):

- MXNet 1.9.1's shape inference for library operators sizes a buffer by
  adding up the inputs' ranks, an unknown rank counting as -1, then writes
  every known size into it: ``mx.sym.<OP_NAME>(var, var, var)`` with only
  the data's shape given writes two sizes past the buffer's end (ranks 7, 8,
  12, 16 abort the process), and an unknown data rank writes one. The safe
  symbol function routes gamma and beta through a same-shape view whose
  shape is the data's channel count, known exactly when the data's rank is:
  so the operator's shape inference only ever runs with every rank known,
  and with the data's rank unknown inference stops earlier, at the node
  ``<name>_data_rank_check``, with an error.
- lib_api keeps every message the library ever reported and MXNet shows
  them all; the safe NDArray function raises an ``MXNetError`` with only the
  current one (:func:`mx_instnorm.operator._errors.library_message`).
"""
import ctypes
import importlib.util
import os
import re
import sys
import threading

__all__ = ["OP_NAME", "LIBRARY_NAME", "LIBRARY_API", "NOT_BUILT_NOTE",
           "CompiledUnavailable", "library_path", "load", "status", "generated_function"]

OP_NAME = "mx_instnorm_InstanceNorm"
LIBRARY_NAME = "libmx_instnorm.so"

# The library API (MX_LIBRARY_VERSION) the operator's glue is written for:
# MXNet 1.9.x's. setup.py builds only against it (its LIBRARY_API).
LIBRARY_API = 11
# Why setup.py built no library, written beside where it would be.
NOT_BUILT_NOTE = "libmx_instnorm.not-built.txt"

# Advice that works from any environment: pip builds against the mxnet
# installed in the environment it installs into (see setup.py).
_REINSTALL = ("reinstall mx_instnorm into this environment: `pip install "
              "--force-reinstall --no-deps DIR` (DIR: mx_instnorm's source tree)")
_UPGRADE = ("the compiled operator needs mxnet 1.9.x (library API %d); to use it: "
            "pip install \"mxnet>=1.9,<2\", then %s" % (LIBRARY_API, _REINSTALL))

_lock = threading.Lock()
_result = None  # ("ok", name) or ("error", reason) once load() has run


class CompiledUnavailable(RuntimeError):
    """The compiled operator cannot be used in this process; the message
    says why in one line."""


def library_path():
    """Where the compiled library is (or would be): beside this module.

    A source tree run in place (``python -m mx_instnorm`` from the
    repository root after ``pip install .``: ``-m`` puts the working
    directory first on ``sys.path``) has no library of its own; then the
    one ``pip install`` put in the installed copy of the same version is
    used.
    """
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)
    if os.path.exists(here):
        return here
    return _installed_library() or here


def _installed_library():
    """The library of an installed mx_instnorm of this very version found on
    ``sys.path``, or None."""
    from .._version import __version__
    own = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packages = [os.path.join(os.path.abspath(entry or os.curdir), "mx_instnorm")
                for entry in sys.path]
    # Editable installs map the package with a finder of their own.
    for finder in sys.meta_path:
        if getattr(finder, "__name__", "") == "PathFinder" or \
                not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec("mx_instnorm", None)
        except Exception:  # noqa: BLE001 - a foreign finder's failure is not ours
            continue
        packages.extend(getattr(spec, "submodule_search_locations", None) or [])
    for package in packages:
        package = os.path.abspath(package)
        candidate = os.path.join(package, "operator", LIBRARY_NAME)
        if package == own or not os.path.isfile(candidate):
            continue
        try:
            with open(os.path.join(package, "_version.py"), encoding="utf-8") as f:
                match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
        except OSError:
            continue
        if match and match.group(1) == __version__:
            return candidate
    return None


def _expected_library_version():
    """MX_LIBRARY_VERSION of the running MXNet, from the lib_api.h its
    wheel ships (None when the header is not there)."""
    spec = importlib.util.find_spec("mxnet")
    for root in (spec.submodule_search_locations or []) if spec else []:
        header = os.path.join(root, "include", "mxnet", "lib_api.h")
        try:
            with open(header, encoding="utf-8", errors="replace") as f:
                match = re.search(r"#define\s+MX_LIBRARY_VERSION\s+(\d+)", f.read())
        except OSError:
            continue
        if match:
            return int(match.group(1))
    return None


def _library_version(path):
    """The MX_LIBRARY_VERSION the library was built with (its _opVersion)."""
    lib = ctypes.CDLL(path)
    fn = lib._opVersion
    fn.restype = ctypes.c_int
    fn.argtypes = ()
    return int(fn())


def _not_built_note(path):
    """setup.py's reason for building no library at ``path``, or None."""
    try:
        with open(os.path.join(os.path.dirname(path), NOT_BUILT_NOTE), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _load_unlocked():
    path = library_path()
    try:
        import mxnet as mx
    except ImportError as err:
        raise CompiledUnavailable("mxnet does not import: %s" % err) from None
    version = getattr(mx, "__version__", "0")
    expected = _expected_library_version()
    # An mxnet without lib_api.h in its package (a source build) is judged
    # by its version; mx.library.load then has the last word.
    too_old = tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < (1, 9)
    if (expected if expected is not None else (0 if too_old else LIBRARY_API)) \
            != LIBRARY_API or not hasattr(mx, "library"):
        # Checked first: on this mxnet no library of ours can load, however
        # it was built.
        raise CompiledUnavailable(
            "mxnet %s has library API %s; %s" % (
                version, "none" if expected is None else expected, _UPGRADE))
    if not os.path.isfile(path):
        note = _not_built_note(path)
        if note is not None:
            raise CompiledUnavailable(
                "not built when mx_instnorm was installed: %s; after fixing that, %s"
                % (note, _REINSTALL))
        raise CompiledUnavailable(
            "no compiled library at %s (`pip install` builds it against the "
            "installed mxnet; `python setup.py build_ext --inplace` for a source "
            "tree): %s; with `pip install -v` it says why not"
            % (path, _REINSTALL))
    try:
        built = _library_version(path)
    except (OSError, AttributeError) as err:
        raise CompiledUnavailable("%s cannot be opened: %s" % (path, err)) from None
    if expected is not None and built != expected:
        # mx.library.load refuses it too, with a message that names no fix.
        raise CompiledUnavailable(
            "%s was built for library API %d but mxnet %s has %d: %s"
            % (path, built, version, expected, _REINSTALL))
    try:
        mx.library.load(path, verbose=False)
    except Exception as err:  # MXNetError, OSError: any failure means unavailable
        first = str(err).strip().splitlines()
        raise CompiledUnavailable("mx.library.load(%r) raised %s: %s" % (
            path, type(err).__name__, first[0] if first else "")) from None
    if not hasattr(mx.nd, OP_NAME) or not hasattr(mx.sym, OP_NAME):
        raise CompiledUnavailable("%s loaded but registered no %s operator" % (path, OP_NAME))
    _install_raw_functions(mx)
    return OP_NAME


def status():
    """``(name, None)`` once the library is registered, ``(None, reason)``
    when it cannot be: :func:`load`'s one cached result, without raising.
    The only cache of the load; :mod:`.backend` asks it on every call."""
    result = _result
    if result is None:
        try:
            load()
        except CompiledUnavailable:
            pass
        result = _result
    return (result[1], None) if result[0] == "ok" else (None, result[1])


def load():
    """Registers the compiled operator (once per process) and returns its
    name.

    Returns
    -------
    str
        :data:`OP_NAME`, now a function of ``mx.nd`` and ``mx.sym``.

    Raises
    ------
    CompiledUnavailable
        MXNet is not 1.9.x (its library API is not :data:`LIBRARY_API`), no
        library was built (the message gives setup.py's reason), the library
        was built for another library API, or ``mx.library.load`` failed. The
        same error is raised again on later calls, without retrying.
    """
    global _result
    with _lock:
        if _result is None:
            try:
                _result = ("ok", _load_unlocked())
            except CompiledUnavailable as err:
                _result = ("error", str(err))
    if _result[0] == "error":
        raise CompiledUnavailable(_result[1])
    return _result[1]


# ------------------------------------------------------- raw functions --
# The functions mx.library.load generated, by module name ("mxnet.ndarray",
# "mxnet.symbol"), kept when the safe ones replace them.
_generated = {}


def generated_function(F):
    """The function ``mx.library.load`` generated for the operator in ``F``
    (``mx.nd`` or ``mx.sym``), without the safeguards of the public one.

    mx_instnorm's own graph builder uses it: it declares gamma and beta as
    vectors itself (see :mod:`.functions`) and its graphs must keep their
    node layout. Only valid after :func:`load` succeeded.
    """
    return _generated[F.__name__]


def _install_raw_functions(mx):
    """Puts the safe functions where ``mx.library.load`` put the generated
    ones (``mx.nd``, ``mx.nd.op``, ``mx.sym``, ``mx.sym.op``), and again
    after any later ``mx.library.load`` (which regenerates every operator
    function)."""
    for module, submodule, make in ((mx.nd, mx.nd.op, _safe_nd_function),
                                    (mx.sym, mx.sym.op, _safe_sym_function)):
        current = getattr(submodule, OP_NAME)
        if getattr(current, "_mx_instnorm_generated", None) is None:
            _generated[module.__name__] = current
            safe = make(current)
            for where in (module, submodule):
                setattr(where, OP_NAME, safe)
    library_load = mx.library.load
    if getattr(library_load, "_mx_instnorm_reinstalls", False):
        return

    def load(path, verbose=True):  # mx.library.load's signature
        library_load(path, verbose)
        if hasattr(mx.sym.op, OP_NAME):
            _install_raw_functions(mx)

    load.__doc__ = library_load.__doc__
    load.__wrapped__ = library_load
    load._mx_instnorm_reinstalls = True
    mx.library.load = load


def _safe_nd_function(generated):
    from ._errors import reraise_library_error

    def nd_function(*args, **kwargs):
        try:
            return generated(*args, **kwargs)
        except RuntimeError as err:  # MXNetError
            reraise_library_error(err)
            raise

    _describe(nd_function, generated, "NDArray")
    return nd_function


def _safe_sym_function(generated):
    import mxnet as mx

    def sym_function(*args, **kwargs):
        inputs = list(args)
        if not inputs:
            inputs = [kwargs.pop(k) for k in ("data", "gamma", "beta") if k in kwargs]
        if len(inputs) != 3 or not all(isinstance(s, mx.sym.Symbol) for s in inputs):
            # Not a call that can build a node: the generated function says why.
            return generated(*args, **kwargs)
        try:
            axis = int(str(kwargs.get("axis", 1)))
        except ValueError:
            return generated(*inputs, **kwargs)  # the library refuses the axis
        name = mx.name.NameManager._current.value.get(kwargs.pop("name", None),
                                                       OP_NAME.lower())
        data, gamma, beta = inputs
        with mx.name.NameManager():
            like = _channel_vector(mx, data, axis, name)
            gamma = mx.sym._internal._identity_with_attr_like_rhs(
                gamma, like, name=name + "_gamma_vector")
            beta = mx.sym._internal._identity_with_attr_like_rhs(
                beta, like, name=name + "_beta_vector")
            return generated(data, gamma, beta, name=name, **kwargs)

    _describe(sym_function, generated, "Symbol")
    return sym_function


def _channel_vector(mx, data, axis, name):
    """Zeros of shape ``(C,)``, C the size of ``data``'s axis ``axis``, of
    whatever dtype their consumer has: their shape is known exactly when the
    data's rank is. ``arange_like`` along ``axis`` reads only the data's
    shape (behind ``BlockGrad``: no gradient flows back to the data), and its
    shape inference raises when the data's rank is unknown or ``axis`` is
    out of range: an error at ``<name>_data_rank_check``, where the
    operator's own would come only after MXNet's shim overflowed."""
    check = mx.sym.contrib.arange_like(mx.sym.BlockGrad(data, name=name + "_data_shape"),
                                       axis=axis, name=name + "_data_rank_check")
    zero = mx.sym._internal._zeros_without_dtype(shape=(1,), name=name + "_zero")
    return mx.sym.broadcast_like(zero, check, name=name + "_channel_zeros")


def _describe(function, generated, kind):
    function.__name__ = function.__qualname__ = OP_NAME
    function.__module__ = generated.__module__
    function.__doc__ = (
        "mx_instnorm's compiled InstanceNorm as the raw %s function of "
        "``mx.library.load``, made safe by mx_instnorm (see "
        "mx_instnorm.operator.compiled): inputs data, gamma, beta; "
        "keywords eps (default 0.001), axis (default 1), name.\n\n"
        "The generated function's documentation follows.\n%s"
        % (kind, generated.__doc__ or ""))
    function._mx_instnorm_generated = generated
