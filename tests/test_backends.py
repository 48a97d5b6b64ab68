"""The choice of backend (MX_INSTNORM_BACKEND, mx_instnorm.backend()) and
graphs moving between the two backends (to_custom, to_compiled, the load
hook where the compiled operator is missing).

Every choice is checked in a fresh interpreter (the library is loaded once
per process). References: conftest's float64 ``ref_forward``/``ref_backward``.
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import mxnet as mx
import numpy as np
import pytest

import mx_instnorm
from mx_instnorm.gluon import InstanceNorm
from mx_instnorm.operator import compiled
from conftest import CHAIN_TOL, assert_close, random_inputs, ref_backward, ref_forward

COMPILED_AVAILABLE = mx_instnorm.operator.backend.compiled_op() is not None
needs_compiled = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="compiled backend "
                                    "unavailable: " + mx_instnorm.backend_reason())


def _run(code, env=None, cwd=None, args=()):
    # Never the repository root: `python -c` puts the working directory
    # first on sys.path, and the source tree there has no compiled library.
    cwd = cwd or tempfile.gettempdir()
    full_env = dict(os.environ)
    full_env.pop("MX_INSTNORM_BACKEND", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)] + list(args),
                          env=full_env, cwd=cwd, capture_output=True, text=True, timeout=300)


REPORT = """
    import mxnet as mx, mx_instnorm
    print("BACKEND", mx_instnorm.backend())
    print("REASON", mx_instnorm.backend_reason())
    print("OP", mx_instnorm.COMPILED_OP)
"""


def test_python_forced():
    proc = _run(REPORT, {"MX_INSTNORM_BACKEND": "python"})
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND python" in proc.stdout
    assert "MX_INSTNORM_BACKEND=python" in proc.stdout


@needs_compiled
@pytest.mark.parametrize("value", ["auto", "compiled", " Compiled ", ""])
def test_compiled_chosen(value):
    proc = _run(REPORT, {"MX_INSTNORM_BACKEND": value})
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND compiled" in proc.stdout
    assert "OP mx_instnorm_InstanceNorm" in proc.stdout


def test_invalid_value_is_named():
    proc = _run("""
        import mx_instnorm
        try:
            mx_instnorm.backend()
        except ValueError as err:
            print("ERR", err)
    """, {"MX_INSTNORM_BACKEND": "cuda"})
    assert proc.returncode == 0, proc.stderr
    assert "ERR MX_INSTNORM_BACKEND must be one of auto, compiled, python, got 'cuda'" \
        in proc.stdout


def test_implementation_rules(monkeypatch):
    """The one choice: compiled for CPU calls and graphs on the compiled
    backend, the CustomOp's numpy path on CPU otherwise, generic for other
    contexts and under MX_INSTNORM_PATH=generic."""
    impl = mx_instnorm.operator.implementation
    monkeypatch.setenv("MX_INSTNORM_BACKEND", "python")
    monkeypatch.delenv("MX_INSTNORM_PATH", raising=False)
    assert [impl("cpu"), impl(None), impl("cpu_pinned"), impl("gpu")] == \
        ["numpy", "numpy", "numpy", "generic"]
    monkeypatch.setenv("MX_INSTNORM_PATH", "fast")
    assert impl("cpu") == "numpy" and impl("gpu") == "generic"
    monkeypatch.setenv("MX_INSTNORM_PATH", "generic")
    assert impl("cpu") == "generic" and impl("cpu", custom_op=True) == "generic"
    monkeypatch.setenv("MX_INSTNORM_PATH", "bogus")
    with pytest.raises(ValueError, match="MX_INSTNORM_PATH must be one of auto, fast, generic"):
        impl("cpu")
    if not COMPILED_AVAILABLE:
        return
    monkeypatch.setenv("MX_INSTNORM_BACKEND", "auto")
    # The CustomOp's path is not read where the compiled operator computes.
    assert impl("cpu") == impl(None) == "compiled"
    monkeypatch.delenv("MX_INSTNORM_PATH")
    assert impl("gpu") == "generic" and impl("cpu", custom_op=True) == "numpy"
    # The library operator takes plain CPU arrays only; pinned memory goes
    # to the NumPy kernel, as before.
    assert impl("cpu_pinned") == "numpy"
    assert mx_instnorm.backend() == "compiled"


# The library made unloadable from outside: a copy of the package whose .so
# is absent, imported from a folder first on sys.path. Its version differs
# from the installed package's, whose library it would otherwise use (as a
# source tree run in place does).
_WITHOUT_LIBRARY = """
    import shutil, sys, os, importlib.util
    src = os.path.dirname(importlib.util.find_spec("mx_instnorm").origin)
    dst = os.path.join(sys.argv[1], "mx_instnorm")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if sys.argv[2] != "same":
        with open(os.path.join(dst, "_version.py"), "w") as f:
            f.write("__version__ = '0.0.0+nolibrary'\\n")
"""


def _copy_without_library(folder, version):
    proc = _run(_WITHOUT_LIBRARY, args=(folder, version))
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture
def package_without_library(tmp_path):
    return _copy_without_library(str(tmp_path), "other")


@needs_compiled
def test_source_tree_uses_the_installed_library(tmp_path):
    """A checkout run in place (python -m from the repository root) has no
    library of its own; the installed copy's, of the same version, is used."""
    folder = _copy_without_library(str(tmp_path), "same")
    proc = _run(REPORT, cwd=folder, env={"PYTHONPATH": folder})
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND compiled" in proc.stdout
    origin = _run("import mx_instnorm; print(mx_instnorm.__file__)", cwd=folder,
                  env={"PYTHONPATH": folder}).stdout
    assert origin.startswith(folder)


def test_missing_library_falls_back_with_a_reason(package_without_library):
    proc = _run(REPORT, cwd=package_without_library,
                env={"PYTHONPATH": package_without_library})
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND python" in proc.stdout
    assert "OP None" in proc.stdout
    reason = [ln for ln in proc.stdout.splitlines() if ln.startswith("REASON")][0]
    assert "not available" in reason
    if compiled._expected_library_version() == compiled.LIBRARY_API:
        assert "libmx_instnorm.so" in reason
    else:
        # MXNet other than 1.9.x: no library could load, built or not; the
        # reason says so first, with the upgrade that fixes it.
        assert 'needs mxnet 1.9.x (library API 11); to use it: pip install "mxnet>=1.9,<2"' \
            in reason


def test_compiled_forced_without_library_raises(package_without_library):
    proc = _run("""
        import mx_instnorm
        try:
            mx_instnorm.backend()
        except RuntimeError as err:
            print("ERR", err)
    """, env={"PYTHONPATH": package_without_library, "MX_INSTNORM_BACKEND": "compiled"},
                cwd=package_without_library)
    assert proc.returncode == 0, proc.stderr
    assert "ERR MX_INSTNORM_BACKEND=compiled, but mx_instnorm's compiled operator is " \
           "not available" in proc.stdout


# --------------------------------------------------------------- graphs --

def _exported(tmp_path, rng, backend):
    """A network of our block (axis 1) and our block (axis -1) exported on
    ``backend``; returns (prefix, x, expected y, the first block's (gamma, beta))
    with a float64 reference."""
    os.environ["MX_INSTNORM_BACKEND"] = backend
    try:
        net = mx.gluon.nn.HybridSequential(prefix="net_")
        with net.name_scope():
            net.add(InstanceNorm(axis=1, epsilon=1e-3, scale=True, in_channels=3),
                    InstanceNorm(axis=-1, epsilon=1e-2, in_channels=5))
        net.initialize()
        x, g, b = random_inputs(rng, (2, 3, 4, 5), 1, np.float32)
        net[0].gamma.set_data(mx.nd.array(g))
        net[0].beta.set_data(mx.nd.array(b))
        net.hybridize()
        net(mx.nd.array(x))
        prefix = str(tmp_path / ("net_" + backend))
        net.export(prefix)
    finally:
        del os.environ["MX_INSTNORM_BACKEND"]
    y = ref_forward(x, g, b, 1e-3, 1)[0]
    y = ref_forward(y, np.ones(5), np.zeros(5), 1e-2, -1)[0]
    return prefix, x, y, (g, b)


def _ops(symbol):
    return [n["op"] for n in json.loads(symbol.tojson())["nodes"]]


@needs_compiled
def test_to_custom_and_back(rng, tmp_path):
    prefix, x, want, _ = _exported(tmp_path, rng, "compiled")
    custom = mx_instnorm.to_custom(prefix + "-symbol.json")
    assert _ops(custom).count("Custom") == 2 and mx_instnorm.COMPILED_OP not in _ops(custom)
    compiled = mx_instnorm.to_compiled(custom)
    assert _ops(compiled).count(mx_instnorm.COMPILED_OP) == 2
    params = mx.nd.load(prefix + "-0000.params")
    for sym in (custom, compiled):
        assert sym.list_arguments() == mx.sym.load(prefix + "-symbol.json").list_arguments()
        assert sym.list_outputs() == mx.sym.load(prefix + "-symbol.json").list_outputs()
        args = {k[4:]: v for k, v in params.items() if k.startswith("arg:")}
        args["data"] = mx.nd.array(x)
        y = sym.bind(mx.cpu(), args).forward()[0].asnumpy()
        np.testing.assert_allclose(y, want, **CHAIN_TOL)


@needs_compiled
def test_graph_of_python_backend_runs_compiled(rng, tmp_path):
    prefix, x, want, (gamma, beta) = _exported(tmp_path, rng, "python")
    assert "Custom" in _ops(mx.sym.load(prefix + "-symbol.json"))
    sym = mx_instnorm.to_compiled(prefix + "-symbol.json")
    block = mx.gluon.SymbolBlock(sym, mx.sym.var("data"))
    block.collect_params().load(prefix + "-0000.params", ignore_extra=True,
                                restore_prefix="")
    data = mx.nd.array(x)
    data.attach_grad()
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with mx.autograd.record():
        y = block(data)
    y.backward(mx.nd.array(dy))
    np.testing.assert_allclose(y.asnumpy(), want, **CHAIN_TOL)
    # The float64 gradient through both layers (the second: gamma 1, beta 0).
    y1 = ref_forward(x, gamma, beta, 1e-3, 1)[0]
    dy1 = ref_backward(dy, y1, np.ones(5), 1e-2, -1)[0]
    np.testing.assert_allclose(data.grad.asnumpy(), ref_backward(dy1, x, gamma, 1e-3, 1)[0],
                               **CHAIN_TOL)


@needs_compiled
def test_compiled_graph_where_library_is_missing(rng, tmp_path, package_without_library):
    """Loading names the fix; to_custom makes it run there."""
    prefix, x, want, _ = _exported(tmp_path, rng, "compiled")
    np.save(str(tmp_path / "x.npy"), x)
    proc = _run("""
        import sys, numpy as np, mxnet as mx, mx_instnorm
        prefix, folder = sys.argv[1:3]
        assert mx_instnorm.backend() == "python"
        try:
            mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                         prefix + "-0000.params")
        except mx.MXNetError as err:
            print("LOAD ERROR:", str(err).splitlines()[0])
        sym = mx_instnorm.to_custom(prefix + "-symbol.json")
        block = mx.gluon.SymbolBlock(sym, mx.sym.var("data"))
        block.collect_params().load(prefix + "-0000.params", ignore_extra=True)
        np.save(folder + "/y.npy", block(mx.nd.array(np.load(folder + "/x.npy"))).asnumpy())
    """, env={"PYTHONPATH": package_without_library}, cwd=package_without_library,
                args=(prefix, str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOAD ERROR: this graph uses mx_instnorm's compiled operator" in proc.stdout
    assert "mx_instnorm.to_custom" in proc.stdout
    np.testing.assert_allclose(np.load(str(tmp_path / "y.npy")), want, **CHAIN_TOL)


def test_to_custom_rejects_what_is_not_a_graph(tmp_path):
    with pytest.raises(ValueError, match="is none of these"):
        mx_instnorm.to_custom(str(tmp_path / "missing-symbol.json"))
    with pytest.raises(TypeError, match="got int"):
        mx_instnorm.to_custom(3)


# A graph and parameters exported by mx_instnorm 0.1.0 itself (see
# tests/data/make_v0_1_graph.py): two Custom nodes (axis 1, eps 1e-3; axis
# -1, eps 1e-2) between 0.1's layout guards.
V0_1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "instnorm_v0_1")


def _v0_1_case(rng):
    """x, dy and the float64 reference ``(y, dx, dgamma of the first
    layer)`` for the 0.1 graph's own parameters."""
    p = {k[4:]: v.asnumpy() for k, v in mx.nd.load(V0_1 + "-0000.params").items()}
    g0, b0 = p["net_instancenorm0_gamma"], p["net_instancenorm0_beta"]
    g1, b1 = p["net_instancenorm1_gamma"], p["net_instancenorm1_beta"]
    x = (rng.standard_normal((2, 3, 4, 5)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y1 = ref_forward(x, g0, b0, 1e-3, 1)[0]
    y = ref_forward(y1, g1, b1, 1e-2, -1)[0]
    dy1 = ref_backward(dy, y1, g1, 1e-2, -1)[0]
    dx, dg0, _ = ref_backward(dy1, x, g0, 1e-3, 1)
    return x, dy, (y, dx, dg0)


@pytest.mark.parametrize("backend", ["auto", "python"])
def test_graph_of_version_0_1_loads_and_trains(rng, monkeypatch, backend):
    """0.1's file, as 0.1 wrote it, imports into a SymbolBlock and gives
    today's results, gradients included, whatever the backend."""
    monkeypatch.setenv("MX_INSTNORM_BACKEND", backend)
    ops = _ops(mx.sym.load(V0_1 + "-symbol.json"))
    assert ops.count("Custom") == 2 and "mx_instnorm_InstanceNorm" not in ops
    x, dy, (want_y, want_dx, want_dg0) = _v0_1_case(rng)
    block = mx.gluon.SymbolBlock.imports(V0_1 + "-symbol.json", ["data"], V0_1 + "-0000.params")
    data = mx.nd.array(x)
    data.attach_grad()
    with mx.autograd.record():
        y = block(data)
    y.backward(mx.nd.array(dy))
    np.testing.assert_allclose(y.asnumpy(), want_y, **CHAIN_TOL)
    np.testing.assert_allclose(data.grad.asnumpy(), want_dx, **CHAIN_TOL)
    np.testing.assert_allclose(block.collect_params()["net_instancenorm0_gamma"].grad().asnumpy(),
                               want_dg0, **CHAIN_TOL)


@needs_compiled
def test_graph_of_version_0_1_to_compiled(rng):
    """to_compiled turns 0.1's Custom nodes into the compiled operator, with
    the same results."""
    sym = mx_instnorm.to_compiled(V0_1 + "-symbol.json")
    ops = _ops(sym)
    assert "Custom" not in ops and ops.count(mx_instnorm.COMPILED_OP) == 2
    x, _, (want_y, _, _) = _v0_1_case(rng)
    params = mx.nd.load(V0_1 + "-0000.params")
    args = {k[4:]: v for k, v in params.items() if k.startswith("arg:")}
    args["data"] = mx.nd.array(x)
    np.testing.assert_allclose(sym.bind(mx.cpu(), args).forward()[0].asnumpy(), want_y,
                               **CHAIN_TOL)
