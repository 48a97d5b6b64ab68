"""Serving: thread settings of servers honoured, and a converted model
served by a real Multi Model Server.

Threads: Multi Model Server sets ``OMP_NUM_THREADS=1`` in each of its
workers. Without ``MX_INSTNORM_NUM_THREADS`` both backends follow MXNet's
own settings (``MXNET_OMP_MAX_THREADS`` over ``OMP_NUM_THREADS``), then
the CPU count. The thread count is observed from outside the code under
test: the threads a process has (``/proc/self/task``) while large calls
run, in a fresh process per setting; results stay identical.

MMS: ``multi-model-server==1.1.11`` with ``model-archiver==1.0.3`` (the
``serve`` extra; Java 11+) serves the converted model on 127.0.0.1 with
the handler docs/serving.md describes; its answers must equal the same
model computed directly in Python, and match the built-in network.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import mx_instnorm

from conftest import BUILTIN_TOL, ref_forward
from converted_model import INPUT_SHAPE, converted_model
from mx_instnorm.kernel import default_num_threads

THREAD_ENV = ("MX_INSTNORM_NUM_THREADS", "MXNET_OMP_MAX_THREADS", "OMP_NUM_THREADS")


# ------------------------------------------------------------------ threads --

def _compiled_num_threads():
    """The compiled kernel's thread count for the current environment, read
    through the library's exported ``mx_instnorm_num_threads()``."""
    import ctypes
    path = mx_instnorm.library_path()
    if path is None:
        pytest.skip("compiled operator not loaded: " + mx_instnorm.backend_reason())
    fn = ctypes.CDLL(path).mx_instnorm_num_threads
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn()


@pytest.mark.parametrize("kernel", ["numpy", "compiled"])
@pytest.mark.parametrize("env, want", [
    ({}, None),                                                  # the CPU count
    ({"OMP_NUM_THREADS": "1"}, 1),
    ({"OMP_NUM_THREADS": " 3 "}, 3),
    ({"OMP_NUM_THREADS": "5,2"}, 5),                             # nesting levels
    ({"OMP_NUM_THREADS": "0"}, None),                            # passed over
    ({"OMP_NUM_THREADS": "many"}, None),
    ({"MXNET_OMP_MAX_THREADS": "2", "OMP_NUM_THREADS": "1"}, 2),  # MXNet's order
    ({"MXNET_OMP_MAX_THREADS": "x", "OMP_NUM_THREADS": "1"}, 1),
    ({"MX_INSTNORM_NUM_THREADS": "4", "OMP_NUM_THREADS": "1",
      "MXNET_OMP_MAX_THREADS": "2"}, 4),
])
def test_kernel_thread_default(monkeypatch, kernel, env, want):
    """Both kernels, the same rules (the compiled one read through its
    exported query, in this process: os.environ is the C environment)."""
    if want is None and not hasattr(os, "sched_getaffinity"):
        pytest.skip("the CPU count of this process needs os.sched_getaffinity")
    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got = default_num_threads() if kernel == "numpy" else _compiled_num_threads()
    assert got == (want or len(os.sched_getaffinity(0)))


def test_bad_own_thread_count_still_raises(monkeypatch):
    """A bad MX_INSTNORM_NUM_THREADS is an error even where MXNet's settings
    would give a count (0: the compiled kernel's error value)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MX_INSTNORM_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="MX_INSTNORM_NUM_THREADS must be a positive integer, got '0'"):
        default_num_threads()
    assert _compiled_num_threads() == 0


# Runs in a fresh process: a small call first (one thread: it starts MXNet's
# own workers), then large calls while another thread samples how many
# threads the process has. Prints the most extra threads seen and saves y.
_COUNT_THREADS = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np, mxnet as mx, mx_instnorm
    assert mx_instnorm.backend() == os.environ["MX_INSTNORM_BACKEND"]
    small = mx.nd.ones((1, 2, 8, 8))
    mx_instnorm.nd.InstanceNorm(small, mx.nd.ones(2), mx.nd.zeros(2)).wait_to_read()
    rng = np.random.RandomState(0)
    x = mx.nd.array(rng.standard_normal((4, 16, 256, 256)).astype(np.float32))
    g = mx.nd.array(rng.uniform(0.5, 1.5, 16)); b = mx.nd.array(rng.standard_normal(16))
    mx.nd.waitall()
    most, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            most[0] = max(most[0], len(os.listdir("/proc/self/task")))
    sampler = threading.Thread(target=sample); sampler.start()
    time.sleep(0.05)  # the sampler is running: it is in the baseline
    base = len(os.listdir("/proc/self/task"))
    for _ in range(int(sys.argv[2])):
        y = mx_instnorm.nd.InstanceNorm(x, g, b, eps=1e-3)
        y.wait_to_read()
    done.set(); sampler.join()
    np.savez(sys.argv[1], y=y.asnumpy()[0], x=x.asnumpy()[0], gamma=g.asnumpy(),
             beta=b.asnumpy())
    print(most[0] - base)
""")


def _extra_threads(tmp_path, env, calls=6):
    out = str(tmp_path / ("y%d.npz" % len(os.listdir(str(tmp_path)))))
    full = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", _COUNT_THREADS, out, str(calls)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=full, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1]), dict(np.load(out))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task")
def test_operator_threads_follow_server_settings(tmp_path, mx_backend):
    """OMP_NUM_THREADS=1 (what MMS sets): no helper thread; OMP_NUM_THREADS=3:
    helpers beyond one; MXNET_OMP_MAX_THREADS wins over it, as in MXNet;
    MX_INSTNORM_NUM_THREADS wins over both. Results identical throughout."""
    one, y_one = _extra_threads(tmp_path, {"OMP_NUM_THREADS": "1"})
    three, y_three = _extra_threads(tmp_path, {"OMP_NUM_THREADS": "3"})
    capped, y_capped = _extra_threads(tmp_path, {"OMP_NUM_THREADS": "3",
                                                 "MXNET_OMP_MAX_THREADS": "1"})
    ours, y_ours = _extra_threads(tmp_path, {"OMP_NUM_THREADS": "1",
                                             "MX_INSTNORM_NUM_THREADS": "3"})
    # Sampling cannot promise to see a short-lived helper thread on a loaded
    # machine (the counts above one are left unchecked); none must appear
    # where one thread is asked for. MXNet's CustomOp machinery may start a
    # thread of its own during the large calls (seen: one), so the Python
    # backend is compared with the other single-thread run.
    if mx_backend == "compiled":
        assert one == 0 and capped == 0
    else:
        assert one <= 1 and capped <= 1
    assert three >= 0 and ours >= 0
    for run in (y_three, y_capped, y_ours):
        np.testing.assert_array_equal(run["y"], y_one["y"])
    want = ref_forward(y_one["x"][None], y_one["gamma"], y_one["beta"], 1e-3)[0][0]
    np.testing.assert_allclose(y_one["y"], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- MMS --------

HERE = os.path.dirname(os.path.abspath(__file__))
SERVING_DOC = os.path.join(HERE, os.pardir, "docs", "serving.md")
START_TIMEOUT = 240   # seconds: Java start-up, a worker, MXNet's import
REQUEST_TIMEOUT = 60


def _documented_handler():
    """The handler docs/serving.md shows (the first ```python block after
    its "## The handler" heading): the test serves exactly that."""
    with open(SERVING_DOC, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## The handler"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def _tool(name):
    """A console script of the environment running the tests, else PATH's."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.isfile(here) else shutil.which(name)


@pytest.fixture
def mms_tools():
    pytest.importorskip("mms", reason="multi-model-server not installed (pip install '.[serve]')")
    pytest.importorskip("model_archiver",
                        reason="model-archiver not installed (pip install '.[serve]')")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Multi Model Server needs Java: no java on PATH and no JAVA_HOME")
    tools = _tool("multi-model-server"), _tool("model-archiver")
    if None in tools:
        pytest.skip("multi-model-server or model-archiver script not found")
    return tools


def _free_port(rng=np.random.default_rng()):
    """A port free now below 32767 (MMS 1.1.11 refuses higher ones)."""
    for _ in range(200):
        port = int(rng.integers(20000, 32767))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port in 20000-32766 on 127.0.0.1")


def _get_json(url):
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as response:
        return json.loads(response.read().decode("utf-8"))


def _wait_ready(server, management, log):
    """Until a worker of the model is READY; fails if MMS exits or the
    deadline passes (with the end of MMS's log)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail("MMS exited with status %s:\n%s" % (server.returncode, _tail(log)))
        try:
            described = _get_json(management + "/models/model")
            if isinstance(described, list):
                described = described[0]
            if any(w.get("status") == "READY" for w in described.get("workers", [])):
                return
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(1.0)
    pytest.fail("no READY worker after %d s:\n%s" % (START_TIMEOUT, _tail(log)))


def _tail(path, lines=40):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _stop(server):
    """SIGTERM to MMS's process group (the launcher, Java, its workers),
    SIGKILL to whatever is left, and reap the launcher."""
    import signal
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                break
            server.poll()
            time.sleep(0.2)
        else:
            continue
        break
    server.wait(timeout=10)


def _serve(tmp_path, tools, handler):
    """Archives the converted model with ``handler`` and starts MMS on it;
    returns (model, inference URL, management URL, log path, process)."""
    server_script, archiver = tools
    model_dir = tmp_path / "model_dir"
    model_dir.mkdir()
    model = converted_model(str(model_dir))
    (model_dir / "service.py").write_text(handler)
    (model_dir / "signature.json").write_text(json.dumps({
        "symbol": os.path.basename(model["symbol"]),
        "params": os.path.basename(model["params"]), "shape": [1] + list(INPUT_SHAPE[1:])}))
    store = tmp_path / "model_store"
    store.mkdir()
    subprocess.run([archiver, "--model-name", "model", "--model-path", str(model_dir),
                    "--handler", "service:handle", "--runtime", "python",
                    "--export-path", str(store), "-f"],
                   check=True, timeout=REQUEST_TIMEOUT, cwd=str(tmp_path))

    inference, management = ("http://127.0.0.1:%d" % _free_port() for _ in range(2))
    config = tmp_path / "config.properties"
    config.write_text("\n".join([
        "inference_address=" + inference, "management_address=" + management,
        "model_store=" + str(store), "load_models=model.mar", "preload_model=true",
        "default_workers_per_model=1", ""]))
    private_tmp = tmp_path / "tmp"   # MMS keeps its pid file in the temp folder
    private_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(private_tmp), TEMP=str(private_tmp))
    log = str(tmp_path / "mms.log")
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [server_script, "--start", "--foreground", "--mms-config", str(config)],
            cwd=str(tmp_path), env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    return model, inference, management, log, server


def test_mms_serves_converted_model(tmp_path, mms_tools, mx_backend):
    model, inference, management, log, server = _serve(tmp_path, mms_tools,
                                                       _documented_handler())
    try:
        _wait_ready(server, management, log)
        request = urllib.request.Request(
            inference + "/predictions/model",
            data=json.dumps({"data": model["x"].tolist()}).encode("utf-8"),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            served = np.asarray(json.loads(response.read().decode("utf-8"))["prediction"],
                                dtype=np.float32)
    finally:
        _stop(server)

    import mxnet as mx
    direct = mx.gluon.SymbolBlock.imports(model["symbol"], ["data"], model["params"])
    np.testing.assert_array_equal(served, direct(mx.nd.array(model["x"])).asnumpy())
    np.testing.assert_allclose(served, model["native_y"], **BUILTIN_TOL)
    assert "is not registered" not in _tail(log, 400)


def test_mms_without_mx_instnorm_is_caught_at_start_up(tmp_path, mms_tools, mx_backend):
    """The documented handler minus its ``import mx_instnorm``: its load-time
    forward puts MXNet's "not registered" into MMS's log at start-up, before
    any client request, although MMS still lists the worker READY; the
    start-up smoke request docs/serving.md prescribes gets no answer."""
    if mx_backend != "compiled":
        pytest.skip("the compiled operator's graph: its message is the documented one")
    handler = _documented_handler()
    assert "import mx_instnorm " in handler
    handler = handler.replace("import mx_instnorm ", "pass  # import mx_instnorm left out ")
    model, inference, management, log, server = _serve(tmp_path, mms_tools, handler)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "mx_instnorm_InstanceNorm is not registered" not in _tail(log, 2000):
            assert time.monotonic() < deadline, "no load failure logged:\n" + _tail(log)
            assert server.poll() is None, "MMS exited:\n" + _tail(log)
            time.sleep(1.0)
        request = urllib.request.Request(
            inference + "/predictions/model",
            data=json.dumps({"data": model["x"][:1].tolist()}).encode("utf-8"),
            headers={"Content-Type": "application/json"})
        with pytest.raises((urllib.error.URLError, OSError)):
            # No worker ever loads the model: an error status or no answer.
            urllib.request.urlopen(request, timeout=10).close()
    finally:
        _stop(server)
