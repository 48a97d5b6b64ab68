"""Forking after the op has run: os.fork, multiprocessing, DataLoader workers.

Each scenario runs in a fresh interpreter (the script below, written to a
file so that the spawn start method can import it) under a timeout, in a
process group of its own: a hang fails the test with the scenario's name and
output, it never hangs the suite. Before any fork the script's main process
runs the op imperatively and through a hybridized Gluon block, on a small
input and on a 4 MiB one (over the size at which the kernel splits work
over its thread pool; ``MX_INSTNORM_NUM_THREADS=2`` makes it use the pool on
any machine). Every result a child computes is compared with a float64
reference written in the script.

What used to go wrong (commit 68633b0): a forked child waited forever on
the copy of the kernel's thread pool, whose threads ``fork()`` does not
copy; and the parent deadlocked in ``fork()`` right after reading a result,
in MXNet's own fork handler, which joins the CustomOp worker thread while
that thread waits for the GIL to run a delete callback
(:mod:`mx_instnorm.integration._fork`).

Each scenario runs once per backend (conftest's ``mx_backend`` sets
``MX_INSTNORM_BACKEND``, which the script inherits); the script skips, with
the reason, when ``mx_instnorm.backend()`` is missing or not the requested
one.
"""
import os
import signal
import subprocess
import sys

import pytest

from conftest import tol

TIMEOUT_S = 90
SKIP_RC = 77

SCRIPT = r'''
import os
import sys
import traceback

import numpy as np
import mxnet as mx
import mx_instnorm

EPS = 1e-3
SMALL = (2, 3, 5, 7)
LARGE = (4, 16, 128, 128)  # float32: 4 MiB


def check_backend():
    want = os.environ["MX_INSTNORM_BACKEND"]
    get = getattr(mx_instnorm, "backend", None)
    if get is None:
        if want == "python":
            return  # a version from before the backends: Python is all it has
        print("SKIP: this mx_instnorm has no backend() to select %r" % want)
        sys.exit(SKIP_RC)
    try:
        got = get()
    except Exception as err:  # the requested backend cannot load
        print("SKIP: backend %r unavailable: %s" % (want, err))
        sys.exit(SKIP_RC)
    if got != want:
        print("SKIP: backend() is %r, not %r" % (got, want))
        sys.exit(SKIP_RC)


def inputs(shape, seed):
    rng = np.random.RandomState(seed)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    beta = rng.uniform(-1, 1, shape[1]).astype(np.float32)
    return x, gamma, beta


def reference(x, gamma, beta):
    """float64 instance norm over every axis after the first two."""
    x = x.astype(np.float64)
    red = tuple(range(2, x.ndim))
    mean = x.mean(axis=red, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    pshape = (1, -1) + (1,) * (x.ndim - 2)
    return ((x - mean) / np.sqrt(var + EPS) * gamma.reshape(pshape)
            + beta.reshape(pshape))


_blocks = {}


def run_op(x, gamma, beta, hybrid):
    if not hybrid:
        return mx_instnorm.nd.InstanceNorm(mx.nd.array(x), mx.nd.array(gamma),
                                           mx.nd.array(beta), eps=EPS)
    channels = x.shape[1]
    block = _blocks.get(channels)
    if block is None:
        block = mx_instnorm.gluon.InstanceNorm(epsilon=EPS, scale=True,
                                               in_channels=channels)
        block.initialize()
        block.hybridize()
        _blocks[channels] = block
    block.gamma.set_data(mx.nd.array(gamma))
    block.beta.set_data(mx.nd.array(beta))
    return block(mx.nd.array(x))


def max_error(shape, seed, hybrid):
    """Runs the op; returns right after reading its result (asnumpy), the
    moment a fork used to deadlock."""
    x, gamma, beta = inputs(shape, seed)
    expected = reference(x, gamma, beta)
    return float(np.max(np.abs(run_op(x, gamma, beta, hybrid).asnumpy() - expected)))


def use_all(seed):
    """The op on both sizes, imperative and hybridized: the worst error."""
    return max(max_error(shape, seed, hybrid)
               for shape in (SMALL, LARGE) for hybrid in (False, True))


def assert_close(err, what):
    if not err < 1e-4:
        print("FAIL: %s: max error %g against the float64 reference" % (what, err))
        sys.exit(1)


def pool_task(seed):
    return use_all(seed)


class OpDataset(mx.gluon.data.Dataset):
    """Each item: the op applied to a 1 MiB sample, in the worker."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        x, gamma, beta = inputs((1,) + LARGE[1:], 100 + i)
        return run_op(x, gamma, beta, hybrid=False)[0]


class RawDataset(mx.gluon.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return inputs((1,) + LARGE[1:], 100 + i)[0][0]


def batchify_with_op(samples):
    x = np.stack(samples)
    _, gamma, beta = inputs((1,) + LARGE[1:], 100)
    return run_op(x, gamma, beta, hybrid=False)


def expected_items(batchify):
    items = []
    for i in range(4):
        x, gamma, beta = inputs((1,) + LARGE[1:], 100 + i)
        if batchify:  # every sample normalized with the first sample's params
            gamma, beta = inputs((1,) + LARGE[1:], 100)[1:]
        items.append(reference(x, gamma, beta)[0])
    return np.stack(items)


def scenario_os_fork():
    assert_close(use_all(0), "parent before fork")
    pid = os.fork()
    if pid == 0:
        try:
            err = use_all(1)
            os._exit(0 if err < 1e-4 else 3)
        except BaseException:
            traceback.print_exc()
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        print("FAIL: forked child exited with %d" % os.waitstatus_to_exitcode(status))
        sys.exit(1)
    assert_close(use_all(2), "parent after fork")


def scenario_pool(method):
    import multiprocessing
    assert_close(use_all(0), "parent before the pool")
    with multiprocessing.get_context(method).Pool(2) as pool:
        errors = pool.map(pool_task, [1, 2, 3, 4])
    assert_close(max(errors), "%s pool workers" % method)
    assert_close(use_all(5), "parent after the pool")


def scenario_dataloader(batchify):
    assert_close(use_all(0), "parent before the DataLoader")
    if batchify:
        loader = mx.gluon.data.DataLoader(RawDataset(), batch_size=2, num_workers=2,
                                          batchify_fn=batchify_with_op)
    else:
        loader = mx.gluon.data.DataLoader(OpDataset(), batch_size=2, num_workers=2)
    got = np.concatenate([batch.asnumpy() for batch in loader])
    err = float(np.max(np.abs(got - expected_items(batchify))))
    assert_close(err, "DataLoader workers (%s)" % ("batchify_fn" if batchify else "__getitem__"))
    assert_close(use_all(5), "parent after the DataLoader")


def scenario_fork_after_read():
    forks = 30
    cases = [(shape, hybrid) for shape in (SMALL, LARGE) for hybrid in (False, True)]
    for i in range(forks):
        shape, hybrid = cases[i % len(cases)]
        err = max_error(shape, i, hybrid)  # ends with asnumpy()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if err < 1e-4 else 3)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            print("FAIL: fork %d: child exited with %d"
                  % (i, os.waitstatus_to_exitcode(status)))
            sys.exit(1)
    print("forks", forks)


def scenario_preexec_fn():
    # subprocess forks through Python's at-fork handlers when preexec_fn is
    # given (otherwise, from Python 3.10, it uses vfork and skips them).
    import subprocess
    for i in range(8):
        err = max_error(SMALL if i % 2 else LARGE, i, i % 4 >= 2)
        subprocess.run(["true"], preexec_fn=lambda: None, check=True)
        assert_close(err, "parent")


SCENARIOS = {
    "os_fork": scenario_os_fork,
    "fork_pool": lambda: scenario_pool("fork"),
    "spawn_pool": lambda: scenario_pool("spawn"),
    "dataloader_getitem": lambda: scenario_dataloader(False),
    "dataloader_batchify": lambda: scenario_dataloader(True),
    "fork_after_read": scenario_fork_after_read,
    "preexec_fn": scenario_preexec_fn,
}

if __name__ == "__main__":
    check_backend()
    SCENARIOS[sys.argv[1]]()
    print("OK", sys.argv[1])
'''.replace("SKIP_RC", str(SKIP_RC))

SCENARIOS = ("os_fork", "fork_pool", "spawn_pool", "dataloader_getitem",
             "dataloader_batchify", "fork_after_read", "preexec_fn")


def run_script(tmp_path, args, env_extra, timeout=TIMEOUT_S):
    """Runs the script; (returncode, output). A hang fails the test."""
    path = tmp_path / "fork_script.py"
    path.write_text(SCRIPT)
    env = dict(os.environ, MX_INSTNORM_NUM_THREADS="2", **env_extra)
    proc = subprocess.Popen([sys.executable, str(path)] + list(args), cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The group: forked children hold the pipe too.
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("%s hung: no exit within %d s; output:\n%s"
                    % (" ".join(args), timeout, out.decode(errors="replace")[-3000:]))
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fork_after_use(scenario, mx_backend, tmp_path):
    # mx_backend (conftest) has set MX_INSTNORM_BACKEND, or skipped a
    # backend this installation does not have; the script checks again.
    rc, out = run_script(tmp_path, [scenario], {})
    if rc == SKIP_RC:
        pytest.skip(out.strip().splitlines()[-1])
    assert rc == 0 and ("OK " + scenario) in out, (
        "%s (backend %s) exited with %d:\n%s" % (scenario, mx_backend, rc, out[-3000:]))
    if scenario == "fork_after_read":
        assert "forks 30" in out


# ------------------------------------------- the kernel's threads, in-process --

def _kernel_case():
    import numpy as np
    from mx_instnorm.kernel import instance_norm as kern
    rng = np.random.RandomState(3)
    x = rng.standard_normal((4, 16, 64, 64)).astype(np.float32)  # 1 MiB: threaded
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    beta = rng.uniform(-1, 1, 16).astype(np.float32)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(2, 3), keepdims=True)
    ref = ((xd - mean) / np.sqrt(xd.var(axis=(2, 3), keepdims=True) + 1e-3)
           * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1))
    return kern, x, gamma, beta, ref


def test_kernel_runs_chunks_itself_once_its_pool_refuses_work():
    # At interpreter exit concurrent.futures refuses new work before the
    # exit-time wait runs MXNet's queued callbacks; a pool shut down refuses
    # it the same way.
    import numpy as np
    kern, x, gamma, beta, ref = _kernel_case()
    kern.instance_norm_forward(x, gamma, beta, num_threads=2)
    kern._pool(1).shutdown()
    try:
        y, _, _ = kern.instance_norm_forward(x, gamma, beta, num_threads=2)
    finally:
        kern._pools.clear()
    np.testing.assert_allclose(y, ref, **tol(np.float32))


def test_kernel_forgets_its_pools_after_fork():
    import numpy as np
    kern, x, gamma, beta, ref = _kernel_case()
    kern.instance_norm_forward(x, gamma, beta, num_threads=2)
    old = kern._pool(1)
    kern._scratch(0, (8,), np.float32)
    kern._reset_after_fork()  # what a forked child runs
    assert not kern._thread_bufs
    assert kern._pool(1) is not old
    y, _, _ = kern.instance_norm_forward(x, gamma, beta, num_threads=2)
    np.testing.assert_allclose(y, ref, **tol(np.float32))
    old.shutdown()
