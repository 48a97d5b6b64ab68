"""``python -m mx_instnorm convert``: every graph conversion from the command
line, run as a user runs it (a subprocess), outside the repository.

The converted files are checked by running them with the original
``.params`` file against the original graph (MXNet's built-in operator).
"""
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import mx_instnorm
from conftest import BUILTIN_TOL

OURS = ("Custom", "mx_instnorm_InstanceNorm")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mx_instnorm", "convert", *args],
                          cwd=str(cwd), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _ops(path):
    with open(path) as f:
        return [n["op"] for n in json.load(f)["nodes"]]


@pytest.fixture
def model(tmp_path, rng):
    """An exported Gluon net with two built-in InstanceNorms (axis 1 and -1)."""
    net = nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(nn.Conv2D(4, 3, in_channels=3), nn.InstanceNorm(axis=-1, in_channels=6),
                nn.InstanceNorm(in_channels=4, epsilon=1e-4))
    net.initialize(mx.init.Normal(0.5))
    net.hybridize()
    x = mx.nd.array(rng.standard_normal((2, 3, 8, 8)))
    net(x)
    net.export(str(tmp_path / "model"))
    return tmp_path / "model-symbol.json", tmp_path / "model-0000.params", x


def _run(sym_file, params_file, x):
    block = mx.gluon.SymbolBlock.imports(str(sym_file), ["data"], str(params_file))
    return block(x).asnumpy()


def test_convert_to_ours_and_back(model, tmp_path):
    sym_file, params_file, x = model
    want = _run(sym_file, params_file, x)
    ours = tmp_path / "ours-symbol.json"
    result = _cli(str(sym_file), str(ours), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("converted net_instancenorm0_swapaxes1: InstanceNorm (axis -1")
    assert lines[1].startswith("converted net_instancenorm1_fwd: InstanceNorm (axis 1, eps 0.0001")
    assert lines[2].startswith("2 node(s) converted")
    ops = _ops(ours)
    assert "InstanceNorm" not in ops and "SwapAxis" not in ops
    assert sum(op in OURS for op in ops) == 2
    np.testing.assert_allclose(_run(ours, params_file, x), want, **BUILTIN_TOL)

    native = tmp_path / "native-symbol.json"
    result = _cli(str(ours), str(native), "--to", "native", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("2 node(s) converted")
    assert not set(OURS) & set(_ops(native))
    np.testing.assert_allclose(_run(native, params_file, x), want, **BUILTIN_TOL)


def test_convert_between_backends(model, tmp_path, mx_backend):
    sym_file, params_file, x = model
    want = _run(sym_file, params_file, x)
    ours = tmp_path / "ours-symbol.json"
    assert _cli(str(sym_file), str(ours), cwd=tmp_path).returncode == 0
    custom = tmp_path / "custom-symbol.json"
    result = _cli(str(ours), str(custom), "--to", "custom", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _ops(custom).count("Custom") == 2
    assert "mx_instnorm_InstanceNorm" not in _ops(custom)
    np.testing.assert_allclose(_run(custom, params_file, x), want, **BUILTIN_TOL)
    if mx_instnorm.COMPILED_OP is None:
        return
    compiled = tmp_path / "compiled-symbol.json"
    result = _cli(str(custom), str(compiled), "--to", "compiled", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _ops(compiled).count("mx_instnorm_InstanceNorm") == 2
    assert "Custom" not in _ops(compiled)
    np.testing.assert_allclose(_run(compiled, params_file, x), want, **BUILTIN_TOL)


def test_nothing_to_convert_says_so(model, tmp_path):
    sym_file, _, _ = model
    out = tmp_path / "same-symbol.json"
    result = _cli(str(sym_file), str(out), "--to", "native", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0 node(s) converted")
    with open(sym_file) as f, open(out) as g:
        assert json.load(f)["nodes"] == json.load(g)["nodes"]


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"^error: .*missing-symbol.json: no such file$"),
    ("not-json", r"^error: convert: .* is not graph JSON"),
    ("not-a-graph", r"^error: convert: .* is JSON but not an MXNet graph"),
    ("refused", r"^error: from_native cannot convert node 'in2'"),
    ("no-dir", r"^error: .*no-such-dir: no such directory$"),
])
def test_bad_input_one_line_error(tmp_path, case, pattern):
    source = tmp_path / "in-symbol.json"
    target = tmp_path / "out-symbol.json"
    if case == "missing":
        source = tmp_path / "missing-symbol.json"
    elif case == "not-json":
        source.write_text("not json at all")
    elif case == "not-a-graph":
        source.write_text('{"a": 1}')
    else:
        x = mx.sym.var("x")
        s = mx.sym.SwapAxis(mx.sym.InstanceNorm(mx.sym.SwapAxis(x, 1, 2), name="in2"), 1, 3)
        source.write_text(s.tojson())
        if case == "no-dir":
            source.write_text(mx.sym.InstanceNorm(x, name="in1").tojson())
            target = tmp_path / "no-such-dir" / "out-symbol.json"
    result = _cli(str(source), str(target), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert __import__("re").match(pattern, lines[0]), lines[0]
    assert not target.exists()


def test_unknown_target_kind_is_refused(tmp_path):
    result = _cli("a.json", "b.json", "--to", "onnx", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'onnx'" in result.stderr


def test_main_job_still_runs_without_arguments(tmp_path):
    # The argument parser of the main job is unchanged: --help names it.
    result = subprocess.run([sys.executable, "-m", "mx_instnorm", "--help"],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "documented examples" in result.stdout
