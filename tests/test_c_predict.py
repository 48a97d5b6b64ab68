"""A C program runs a converted graph through MXNet's C predict API.

tests/c/predict.c is compiled with gcc against the MXNet wheel's
``include/mxnet/c_predict_api.h`` and ``libmxnet.so``; it loads
``mx_instnorm.library_path()`` with ``MXLoadLib``, creates a predictor for
the converted model and runs a forward pass, with no Python in the process.
Its output must equal, bit for bit, the same graph run in Python on the
compiled operator, and match MXNet's built-in InstanceNorm network (the
independent reference) to float32 tolerance. On the ``python`` backend the
model is exported with the CustomOp and rewritten with ``to_compiled``
first (C has no Python for a CustomOp).

Before the library was linked with ``-Wl,-Bsymbolic`` the program died
with SIGFPE inside ``MXLoadLib`` (libmxnet's own lib_api symbols
interposed on the library's).
"""
import os
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

import mx_instnorm
from conftest import BUILTIN_TOL
from converted_model import INPUT_SHAPE, converted_model

HERE = os.path.dirname(os.path.abspath(__file__))
MXNET_DIR = os.path.dirname(os.path.abspath(mx.__file__))
TIMEOUT = 120


def _needs_library():
    if mx_instnorm.library_path() is None:
        pytest.skip("compiled operator not loaded: " + mx_instnorm.backend_reason())


@pytest.fixture(scope="module")
def predict_program(tmp_path_factory):
    """The compiled C program, or a skip saying what is missing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the program is linked with GNU ld options (-l:libmxnet.so, -rpath)")
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (gcc or cc) on PATH")
    header = os.path.join(MXNET_DIR, "include", "mxnet", "c_predict_api.h")
    if not os.path.isfile(header) or not os.path.isfile(os.path.join(MXNET_DIR, "libmxnet.so")):
        pytest.skip("the mxnet wheel at %s has no c_predict_api.h or libmxnet.so" % MXNET_DIR)
    program = str(tmp_path_factory.mktemp("c") / "predict")
    build = subprocess.run(
        [compiler, "-std=c99", "-Wall", "-Werror", "-O1", os.path.join(HERE, "c", "predict.c"),
         "-I", os.path.join(MXNET_DIR, "include"), "-L", MXNET_DIR, "-l:libmxnet.so",
         "-Wl,-rpath," + MXNET_DIR, "-o", program],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
        timeout=TIMEOUT)
    assert build.returncode == 0, build.stdout
    return program


def _run(program, library, symbol, params, x, out):
    x_file = out + ".in"
    x.astype(np.float32).tofile(x_file)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([program, library, symbol, params, x_file, out]
                          + [str(d) for d in x.shape],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT, env=env)


def _deployable(model, tmp_path, mx_backend):
    """The converted model's symbol file that C can run: on the python
    backend the graph names the CustomOp and is rewritten to the compiled op."""
    if mx_backend != "python":
        return model["symbol"]
    with open(model["symbol"]) as f:
        assert "mx_instnorm_InstanceNorm" not in f.read()
    path = str(tmp_path / "compiled-symbol.json")
    mx_instnorm.to_compiled(model["symbol"]).save(path)
    return path


def _python_output(symbol, params, x):
    block = mx.gluon.SymbolBlock.imports(symbol, ["data"], params)
    return block(mx.nd.array(x)).asnumpy()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_library_path_is_the_loaded_library():
    _needs_library()
    path = mx_instnorm.library_path()
    assert os.path.isabs(path) and os.path.isfile(path)
    # Independent of the package's own bookkeeping: the dynamic loader's map.
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "/" in line}
    assert os.path.realpath(path) in {os.path.realpath(m) for m in mapped}


def test_c_program_matches_python(predict_program, tmp_path, mx_backend, monkeypatch):
    _needs_library()
    model = converted_model(str(tmp_path))
    symbol = _deployable(model, tmp_path, mx_backend)
    out = str(tmp_path / "y.bin")
    done = _run(predict_program, mx_instnorm.library_path(), symbol, model["params"],
                model["x"], out)
    assert done.returncode == 0, "exit status %d\n%s%s" % (
        done.returncode, done.stdout, done.stderr)
    want_shape = INPUT_SHAPE[:1] + (4,) + INPUT_SHAPE[2:]
    assert done.stdout.split("\n")[0] == "output shape: %s" % " ".join(map(str, want_shape))
    got = np.fromfile(out, np.float32).reshape(want_shape)

    # The compiled operator computes the same in both processes.
    monkeypatch.setenv("MX_INSTNORM_BACKEND", "compiled")
    python_y = _python_output(symbol, model["params"], model["x"])
    np.testing.assert_array_equal(got, python_y)
    # And it is the network the user exported with the built-in op.
    np.testing.assert_allclose(got, model["native_y"], **BUILTIN_TOL)


def test_c_program_without_the_library_names_the_operator(predict_program, tmp_path,
                                                         mx_backend):
    """Without MXLoadLib the graph is refused with MXNet's message, not a crash."""
    _needs_library()
    model = converted_model(str(tmp_path))
    symbol = _deployable(model, tmp_path, mx_backend)
    done = _run(predict_program, "-", symbol, model["params"], model["x"],
                str(tmp_path / "y.bin"))
    assert done.returncode == 1, done.stderr
    assert "mx_instnorm_InstanceNorm" in done.stderr
    assert not os.path.exists(str(tmp_path / "y.bin"))
