"""MXNet 1.9.1's shape-inference shim for library operators must never write
past its buffer, whatever the data's rank, through any route to the compiled
operator.

The shim (``src/c_api/c_api.cc``) sizes a buffer by adding up the inputs'
ranks, an unknown rank counting as -1, then writes every known size into
it. Heap corruption does not always crash where it happens, so each route
runs in a fresh process with glibc's malloc checks on (``MALLOC_CHECK_=3``:
abort at the first inconsistency), over ranks 3 to 16, 20 inferences each
and a forward pass, and must exit cleanly with the expected results. The
control test shows that this harness does catch the corruption (the
function ``mx.library.load`` generated, without mx_instnorm's safeguards).
Under the sanitizer pass (docs/design.md, "Sanitizers") ASan checks the same
runs byte by byte.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from mx_instnorm.operator import compiled

try:
    compiled.load()
except compiled.CompiledUnavailable as err:
    pytest.skip("compiled operator unavailable: %s" % err, allow_module_level=True)

RANKS = list(range(3, 17))

PRELUDE = """
import sys
import numpy as np
import mxnet as mx
import mx_instnorm
from mx_instnorm.operator import compiled
compiled.load()
OP = compiled.OP_NAME

def data_shape(rank):
    # Small sizes: rank 16 stays at 2 * 3 * 2**14 elements.
    return (2, 3) + (2,) * (rank - 2)

def check(symbol, rank, data="data"):
    shape = data_shape(rank)
    for _ in range(20):
        args, outs, _ = symbol.infer_shape(**{data: shape})
        assert args[0] == shape and outs == [shape], (rank, args, outs)
        assert sorted(args[1:]) == [(3,), (3,)], (rank, args)
    x = np.random.RandomState(rank).standard_normal(shape).astype(np.float32)
    ex = symbol.simple_bind(mx.cpu(), grad_req="null", **{data: shape})
    for name, arr in ex.arg_dict.items():
        arr[:] = x if name == data else 1.0 if arr.shape == (3,) else arr
    y = ex.forward()[0].asnumpy()
    # gamma = beta = 1 (every parameter array above is 1); a float64
    # reference from the formula, eps 1e-3.
    inst = x.astype(np.float64).reshape(2, 3, -1)
    want = (inst - inst.mean(axis=2, keepdims=True)) / np.sqrt(
        inst.var(axis=2, keepdims=True) + 1e-3) + 1
    assert np.abs(y.reshape(2, 3, -1) - want).max() < 1e-4, rank
"""

ROUTES = {
    # The public function of mx.library.load's namespace, variables without
    # shapes for gamma and beta.
    "raw": "getattr(mx.sym, OP)(mx.sym.var('data'), mx.sym.var('gamma'), "
           "mx.sym.var('beta'))",
    # The same with gamma computed by a node whose rank nothing declares.
    "raw_computed_gamma": "getattr(mx.sym, OP)(mx.sym.var('data'), mx.sym.var('g') * 1.0, "
                          "mx.sym.var('beta'))",
    # mx_instnorm's own Symbol function.
    "package": "mx_instnorm.sym.InstanceNorm(mx.sym.var('data'), name='in0')",
}


def _run(script, timeout=600):
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=timeout)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_rank_in_a_fresh_process(route):
    script = PRELUDE + """
for rank in %r:
    check(%s, rank)
    print("rank", rank, "ok", flush=True)
""" % (RANKS, ROUTES[route])
    proc = _run(script)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.stdout.split() == " ".join("rank %d ok" % r for r in RANKS).split()


def test_unknown_data_rank_is_refused_before_the_shim():
    # Partial inference with the data's rank unknown (each route, 20 times):
    # an MXNetError, never a write past the shim's buffer.
    script = PRELUDE + """
for build, known in ((%s, dict(gamma=(3,), beta=(3,))), (%s, dict(g=(3,), beta=(3,)))):
    for _ in range(20):
        try:
            build.infer_shape_partial(**known)
        except mx.MXNetError as err:
            assert "data_rank_check" in str(err), str(err)
        else:
            raise AssertionError("no error")
print("refused")
""" % (ROUTES["raw"], ROUTES["raw_computed_gamma"])
    proc = _run(script)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.stdout.split() == ["refused"]


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="the control corrupts the heap on purpose: ASan would report it")
def test_control_generated_function_corrupts_the_heap():
    # Without the safeguards, the same harness fails: the generated function
    # with only the data's shape known writes two sizes past the shim's
    # buffer, which glibc notices at some ranks (7, 8, 12 and 16 measured).
    failed = []
    for rank in (7, 8, 12, 16):
        script = PRELUDE + """
s = compiled.generated_function(mx.sym)(mx.sym.var('data'), mx.sym.var('gamma'),
                                        mx.sym.var('beta'))
for _ in range(20):
    s.infer_shape(data=data_shape(%d))
mx.nd.waitall()
""" % rank
        if _run(script, timeout=300).returncode != 0:
            failed.append(rank)
    assert failed, "the harness saw no corruption at ranks 7, 8, 12 and 16"
