"""The NumPy-alias shim for MXNet (``mx_instnorm_numpy_compat``), its
start-up ``.pth``, the wheel that ships both, and setup.py's refusal of
unsupported Pythons.

Import order and start-up behaviour are properties of a fresh interpreter,
so those tests run ``sys.executable`` in a subprocess, from a temporary
directory (the source tree is then not on ``sys.path``: they see what is
installed).
"""
import math
import os
import subprocess
import sys
import textwrap
import types
import zipfile

import numpy as np
import pytest

import mx_instnorm_numpy_compat as compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = "mx_instnorm_numpy_compat.pth"
NUMPY_HAS_ALIASES = tuple(int(p) for p in np.__version__.split(".")[:2]) < (1, 24)


def _run(code, tmp_path, env=None, check=True):
    """Run ``code`` in a fresh interpreter (cwd ``tmp_path``); return stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=str(tmp_path),
        env=dict(os.environ, MXNET_SUBGRAPH_VERBOSE="0", **(env or {})),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        timeout=300)
    if check:
        assert proc.returncode == 0, "exit %d\n%s\n%s" % (
            proc.returncode, proc.stdout, proc.stderr[-3000:])
    return proc


def _fake_numpy(**existing):
    """A module holding the functions the shim builds on, plus ``existing``."""
    fake = types.ModuleType("fake_numpy")
    for name in ("all", "any", "round", "prod", "sort", "isin", "asarray"):
        setattr(fake, name, getattr(np, name))
    # NumPy >= 2 has trapezoid; older ones only trapz (the shim needs one).
    fake.trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")
    for name, value in existing.items():
        setattr(fake, name, value)
    return fake


# ------------------------------------------------------- patch_numpy itself --

def test_patch_adds_every_missing_name_with_numpy_1_23_values():
    fake = _fake_numpy()
    added = compat.patch_numpy(fake)
    assert sorted(added) == sorted(compat.NAMES)
    assert fake.bool is bool and fake.int is int
    assert fake.compat.basestring is str
    assert fake.PINF == math.inf and fake.Inf == math.inf and fake.NINF == -math.inf
    assert fake.PZERO == 0.0 and math.copysign(1.0, fake.PZERO) == 1.0
    assert fake.NZERO == 0.0 and math.copysign(1.0, fake.NZERO) == -1.0
    assert math.isnan(fake.NAN) and math.isnan(fake.NaN)
    data = [[3.0, -1.0], [1.0, 2.0], [2.0, 0.5]]
    assert fake.alltrue([True, True]) and not fake.alltrue([True, False])
    assert fake.sometrue([False, True]) and not fake.sometrue([False, False])
    assert fake.product([2, 3, 4]) == 24
    # round_ rounds half to even, as Python's round does.
    halves = [0.5, 1.5, 2.5, -0.5]
    assert fake.round_(halves).tolist() == [float(round(v)) for v in halves]
    # msort sorts each column (axis 0); reference: Python's sorted per column.
    columns = [sorted(col) for col in zip(*data)]
    assert fake.msort(np.array(data)).tolist() == [list(r) for r in zip(*columns)]
    # in1d: membership of the flattened first argument.
    assert fake.in1d([[1, 5], [2, 7]], [2, 5]).tolist() == [False, True, True, False]
    assert fake.in1d([1, 5], [5], invert=True).tolist() == [True, False]
    # trapz: the trapezoidal rule, written out.
    y, x = [1.0, 4.0, 2.0], [0.0, 1.0, 3.0]
    expected = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(2))
    assert fake.trapz(y, x) == pytest.approx(expected, rel=1e-15)
    for name in ("mirr", "npv", "pmt", "ppmt", "pv", "rate"):
        with pytest.raises(RuntimeError, match="function %s was removed.*numpy_financial"
                           % name):
            getattr(fake, name)(0.1, [1.0])


def test_patch_never_changes_an_existing_name():
    own_bool, own_nan, own_in1d = object(), object(), object()
    own_compat = types.ModuleType("fake_numpy.compat")
    own_compat.basestring = bytes
    fake = _fake_numpy(bool=own_bool, NaN=own_nan, in1d=own_in1d, compat=own_compat)
    added = compat.patch_numpy(fake)
    assert fake.bool is own_bool and fake.NaN is own_nan and fake.in1d is own_in1d
    assert fake.compat is own_compat and own_compat.basestring is bytes
    assert set(added) == set(compat.NAMES) - {"bool", "NaN", "in1d", "compat.basestring"}
    # A second call finds nothing missing.
    assert compat.patch_numpy(fake) == []


def test_patch_adds_basestring_to_an_existing_compat_module():
    own_compat = types.ModuleType("fake_numpy.compat")
    fake = _fake_numpy(compat=own_compat)
    assert "compat.basestring" in compat.patch_numpy(fake)
    assert fake.compat is own_compat and own_compat.basestring is str


@pytest.mark.skipif(not NUMPY_HAS_ALIASES, reason="numpy >= 1.24 lacks some names")
def test_numpy_before_1_24_misses_nothing():
    assert compat.missing_names(np) == []


# ------------------------------------------------- fresh interpreters -------

def _installed_pth():
    """The .pth beside the installed shim module, or None."""
    folder = os.path.dirname(os.path.abspath(compat.__file__))
    path = os.path.join(folder, PTH)
    return path if os.path.isfile(path) else None


def test_pth_sits_beside_the_installed_shim_module():
    if os.path.dirname(os.path.abspath(compat.__file__)) == REPO:
        # An editable install serves the module from the checkout: the .pth
        # is then at the top of site-packages, next to setuptools' own.
        import site
        folders = site.getsitepackages() + [site.getusersitepackages()]
        assert any(os.path.isfile(os.path.join(f, PTH)) for f in folders), (
            "%s is in none of %s" % (PTH, folders))
    else:
        assert _installed_pth() is not None, "no %s beside %s" % (PTH, compat.__file__)


def test_startup_hook_waits_for_mxnet_and_removes_itself(tmp_path):
    out = _run("""
        import sys
        def hooked():
            return [type(f).__name__ for f in sys.meta_path].count("_MXNetImportHook")
        print(hooked(), "numpy" in sys.modules, "mxnet" in sys.modules)
        import mxnet
        print(hooked(), "numpy" in sys.modules)
        """, tmp_path).stdout.split()
    # At start-up: one hook, and neither numpy nor mxnet imported by it.
    assert out[:3] == ["1", "False", "False"]
    # After `import mxnet`: the hook is gone.
    assert out[3:] == ["0", "True"]


def test_import_mxnet_adds_only_missing_names_and_keeps_existing_ones(tmp_path):
    out = _run("""
        import numpy, mx_instnorm_numpy_compat as compat
        before = {n: id(numpy.__dict__[n]) for n in compat.NAMES if n in numpy.__dict__}
        missing = compat.missing_names(numpy)
        import mxnet
        after = {n: id(numpy.__dict__[n]) for n in compat.NAMES if n in numpy.__dict__}
        changed = [n for n in before if after.get(n) != before[n]]
        print("missing:", ",".join(missing) or "-")
        print("changed:", ",".join(changed) or "-")
        print("added:", ",".join(sorted(set(after) - set(before))) or "-")
        print("left:", ",".join(compat.missing_names(numpy)) or "-")
        """, tmp_path).stdout.splitlines()
    report = dict(line.split(": ", 1) for line in out)
    assert report["changed"] == "-"
    assert report["left"] == "-"
    added = set(report["added"].split(",")) - {"-"}
    missing = set(report["missing"].split(",")) - {"-"}
    # Only the missing top-level names land in numpy's namespace
    # ("compat.basestring" lands in numpy.compat).
    assert added == missing - {"compat.basestring"}
    if NUMPY_HAS_ALIASES:
        assert missing == set() and added == set()
    elif np.__version__.startswith("1."):
        assert "bool" in missing  # removed in 1.24; MXNet reads it at import
    else:
        # NumPy 2 has a bool of its own (numpy.bool_): kept, not replaced.
        assert "bool" not in missing and "NaN" in missing


_INSTANCE_NORM_CHECK = """
    import numpy as np
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
    y = mx_instnorm.nd.InstanceNorm(mx.nd.array(x), mx.nd.array(gamma),
                                    mx.nd.array(beta), eps=1e-3).asnumpy()
    x64 = x.astype(np.float64)
    d = x64 - x64.mean(axis=2, keepdims=True)
    ref = (d / np.sqrt((d * d).mean(axis=2, keepdims=True) + 1e-3)
           * gamma[:, None] + beta[:, None])
    print("%.3e" % np.abs(y - ref).max())
"""


@pytest.mark.parametrize("first", ["mxnet", "mx_instnorm"])
def test_fresh_interpreter_either_import_order(tmp_path, first):
    imports = ("import mxnet as mx\nimport mx_instnorm\n" if first == "mxnet"
               else "import mx_instnorm\nimport mxnet as mx\n")
    out = _run(imports + textwrap.dedent(_INSTANCE_NORM_CHECK), tmp_path).stdout
    assert float(out.split()[-1]) < 1e-5


# ---------------------------------------------------------- the wheel ------

_OFFLINE_SIGNS = ("No matching distribution found", "Could not find a version",
                  "Failed to establish a new connection", "Temporary failure in name",
                  "Network is unreachable")


def _can_build_without_isolation():
    """This environment has setuptools with a bdist_wheel (its own since
    setuptools 70.1, else the ``wheel`` package's)."""
    for module in ("setuptools.command.bdist_wheel", "wheel.bdist_wheel"):
        try:
            __import__(module)
        except ImportError:
            continue
        return True
    return False


def test_built_wheel_has_the_pth_and_the_module_at_its_top(tmp_path):
    if not os.path.isfile(os.path.join(REPO, "setup.py")):
        pytest.skip("not run from a source checkout (no setup.py beside tests/)")
    # Python 3.13 builds too (docs/install.md); the compiled library is not
    # what this test is about (MX_INSTNORM_BUILD=0 skips compiling it).
    env = dict(os.environ, MX_INSTNORM_ALLOW_UNSUPPORTED_PYTHON="1", MX_INSTNORM_BUILD="0")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", REPO,
               "-w", str(tmp_path)]
    if _can_build_without_isolation():
        # No download of the build requirements (and none of the NumPy < 2
        # that MXNet's metadata would pull into a Python 3.13 build env).
        command.append("--no-build-isolation")
    proc = subprocess.run(
        command, cwd=str(tmp_path), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
        timeout=300)
    if proc.returncode != 0 and any(s in proc.stdout for s in _OFFLINE_SIGNS):
        pytest.skip("cannot build a wheel here (build requirements unreachable)")
    assert proc.returncode == 0, proc.stdout[-3000:]
    wheels = [f for f in os.listdir(str(tmp_path)) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(os.path.join(str(tmp_path), wheels[0])) as wheel:
        names = wheel.namelist()
        assert PTH in names and "mx_instnorm_numpy_compat.py" in names
        line = wheel.read(PTH).decode("utf-8")
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        # In RECORD, so `pip uninstall` removes the hook with the package.
        assert PTH in wheel.read(record).decode("utf-8")
    # One `import` line (site.py runs only lines starting with "import").
    assert line.splitlines() == [
        "import mx_instnorm_numpy_compat; mx_instnorm_numpy_compat.install()"]


# --------------------------------------------------------- setup.py --------

def _run_setup_as(version, tmp_path, env=None):
    """Run the checkout's setup.py as if under Python ``version``."""
    if not os.path.isfile(os.path.join(REPO, "setup.py")):
        pytest.skip("not run from a source checkout (no setup.py beside tests/)")
    return _run("""
        import os, runpy, sys
        # setuptools (and the packaging it vendors) read sys.version_info when
        # imported: import them as the real interpreter first.
        import setuptools, setuptools.command.build_py
        sys.version_info = %r + tuple(sys.version_info)[2:]
        os.chdir(%r)
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
        """ % (version, REPO), tmp_path, env=env, check=False)


@pytest.mark.parametrize("version", [(3, 9), (3, 13)])
def test_setup_refuses_unsupported_python_in_one_line(tmp_path, version):
    proc = _run_setup_as(version, tmp_path, env={"MX_INSTNORM_ALLOW_UNSUPPORTED_PYTHON": ""})
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "ERROR: mx_instnorm supports Python 3.10, 3.11 and 3.12 (MXNet 1.9.1 needs "
        "numpy<2), not Python %d.%d: see docs/install.md" % version]


def test_setup_allows_python_3_13_for_the_documented_recipe(tmp_path):
    proc = _run_setup_as((3, 13), tmp_path,
                         env={"MX_INSTNORM_ALLOW_UNSUPPORTED_PYTHON": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "mx_instnorm"
