"""``python -m mx_instnorm``: run the documented examples, side by side with
MXNet's built-in InstanceNorm, and report.

Checks, each for mx_instnorm and for the built-in:

1. the example of ``mx.nd.InstanceNorm``'s documentation (eps 1e-3, gamma
   1.5, beta 0.5) through nd and through a bound sym executor;
2. the example of ``mx.gluon.nn.InstanceNorm``'s documentation (eps 1e-5,
   default initialization) through Gluon: imperative, hybridized, and
   exported with ``.export`` then re-imported with ``SymbolBlock.imports``;
   both beside the float64 "exact" result of the same float32 input, so
   that the documented numbers (float32 results printed to 8 digits) are
   seen to be an approximation too;
3. float16, float32 and float64 data (the built-in takes float32 only),
   against a float64 NumPy reference;
4. data with a large common offset (1e4 + N(0, 1), float32), against a
   float64 NumPy reference.

The exit status is 1 if any mx_instnorm result is off by more than its
tolerance, else 0.

``python -m mx_instnorm convert IN-symbol.json OUT-symbol.json [--to
ours|native|custom|compiled] [--inference]`` rewrites a graph file instead (see
:func:`convert_main`). The built-in's errors and imprecision are reported, not
counted as failures. Only the public API (``mx_instnorm.nd``, ``.sym``,
``.gluon``) is used.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np

__all__ = ["main", "convert_main"]

# The documented outputs are float32 results printed to 8 digits: they carry
# float32 rounding noise of a few 1e-7 (the exact answers differ from them
# by up to 1.9e-7), hence 5e-7 rather than an ulp.
DOC_TOLERANCE = 5e-7

# Seed 000: mxnet.ndarray.InstanceNorm's example (eps default 1e-3).
ND_DOC_X = [[[1.1, 2.2]], [[3.3, 4.4]]]
ND_DOC_GAMMA, ND_DOC_BETA, ND_DOC_EPS = [1.5], [0.5], 1e-3
ND_DOC_OUT = [[[-0.997527, 1.99752665]], [[-0.99752653, 1.99752724]]]

# Seed 001: mxnet.gluon.nn.InstanceNorm's example (epsilon default 1e-5,
# gamma ones, beta zeros).
GLUON_DOC_OUT = [[[-0.99998355, 0.99998331]], [[-0.99998319, 0.99998361]]]
GLUON_DOC_EPS = 1e-5

# Max abs error against a float64 reference, per data dtype, for outputs of
# magnitude < 8. float16: half an ulp of float16 in [4, 8) is 2e-3, plus
# float32 accumulation; float32: a few ulps; float64: a few ulps.
DTYPE_TOLERANCE = {"float16": 4e-3, "float32": 5e-6, "float64": 1e-12}

# Large offset: float32 output in [-5, 5] computed from float32 input; the
# shifted two-pass statistics keep it within a few float32 ulps.
OFFSET_TOLERANCE = 1e-5
OFFSET = 1e4
OFFSET_SHAPE = (4, 16, 32, 32)
OFFSET_EPS = 1e-5


class _Report:
    def __init__(self, quiet):
        self.quiet = quiet
        self.failures = []
        self._raised = set()

    def say(self, text=""):
        if not self.quiet:
            print(text)

    def check(self, label, error, tolerance):
        """Records one of OUR results; returns 'ok' or 'FAIL'."""
        ok = bool(np.isfinite(error)) and error <= tolerance
        if label in self._raised:
            return "FAIL (raised)"
        if not ok:
            self.failures.append("%s: error %.2e > tolerance %.0e"
                                 % (label, error, tolerance))
        return "ok" if ok else "FAIL"

    def run_ours(self, label, fn):
        """``fn()``, or NaN (a failure) if it raises: one broken route
        should not hide the others."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - reported as a failure
            self.failures.append("%s raised %s" % (label, _error_line(err)))
            self._raised.add(label)
            return np.full(1, np.nan)


def _fmt_values(arr):
    return "[" + " ".join("%+.8f" % v for v in np.asarray(arr, np.float64).ravel()) + "]"


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _error_line(err):
    """The gist of an (MXNet) error: its last line, after the last ': '
    (MXNet's type check ends with "...: Unsupported data type 2")."""
    # MXNet < 1.7 appends a "Stack trace:" of "[bt]" lines: not the gist.
    lines = [ln.strip() for ln in str(err).split("Stack trace:")[0].splitlines()
             if ln.strip()]
    text = lines[-1].rsplit(": ", 1)[-1] if lines else ""
    return "%s (%s)" % (text[:100], type(err).__name__)


def _reference(x, gamma, beta, eps, axis=1):
    """Float64 NumPy instance norm: two-pass statistics over axes != 0, axis."""
    x = np.asarray(x, np.float64)
    red = tuple(i for i in range(1, x.ndim) if i != axis)
    pshape = [1] * x.ndim
    pshape[axis] = x.shape[axis]
    d = x - x.mean(axis=red, keepdims=True)
    var = (d * d).mean(axis=red, keepdims=True)
    return (d / np.sqrt(var + eps) * np.asarray(gamma, np.float64).reshape(pshape)
            + np.asarray(beta, np.float64).reshape(pshape))


# ----------------------------------------------------------------- routes --

def _nd(mx, mx_instnorm, ours, x, gamma, beta, eps):
    fn = mx_instnorm.nd.InstanceNorm if ours else mx.nd.InstanceNorm
    return fn(x, gamma, beta, eps=eps).asnumpy()


def _sym(mx, mx_instnorm, ours, x, gamma, beta, eps):
    fn = mx_instnorm.sym.InstanceNorm if ours else mx.sym.InstanceNorm
    net = fn(data=mx.sym.var("data"), gamma=mx.sym.var("gamma"),
             beta=mx.sym.var("beta"), eps=eps)
    exe = net.bind(mx.cpu(), args={"data": x, "gamma": gamma, "beta": beta},
                   grad_req="null")
    exe.forward(is_train=False)
    return exe.outputs[0].asnumpy()


def _gluon_block(mx, mx_instnorm, ours):
    cls = mx_instnorm.gluon.InstanceNorm if ours else mx.gluon.nn.InstanceNorm
    block = cls()
    block.initialize(ctx=mx.cpu(0))
    return block


def _gluon(mx, mx_instnorm, ours, x):
    return _gluon_block(mx, mx_instnorm, ours)(x).asnumpy()


def _gluon_hybrid(mx, mx_instnorm, ours, x):
    block = _gluon_block(mx, mx_instnorm, ours)
    block.hybridize()
    return block(x).asnumpy()


def _gluon_exported(mx, mx_instnorm, ours, x):
    block = _gluon_block(mx, mx_instnorm, ours)
    block.hybridize()
    block(x)  # export needs a cached graph
    with tempfile.TemporaryDirectory(prefix="mx_instnorm_") as tmp:
        prefix = os.path.join(tmp, "model")
        block.export(prefix)
        with warnings.catch_warnings():
            # SymbolBlock.imports warns that it cannot infer the input dtype.
            warnings.simplefilter("ignore", UserWarning)
            imported = mx.gluon.SymbolBlock.imports(
                prefix + "-symbol.json", ["data"], prefix + "-0000.params",
                ctx=mx.cpu(0))
        return imported(x).asnumpy()


# --------------------------------------------------------------- sections --

def _documented(report, mx, mx_instnorm):
    x = mx.nd.array(ND_DOC_X)
    gamma, beta = mx.nd.array(ND_DOC_GAMMA), mx.nd.array(ND_DOC_BETA)
    # The float64 result of the float32 input both implementations receive.
    x32 = np.asarray(ND_DOC_X, np.float32)
    cases = [
        ("mx.nd.InstanceNorm doc: gamma=[1.5], beta=[0.5], eps=1e-3", ND_DOC_OUT,
         _reference(x32, ND_DOC_GAMMA, ND_DOC_BETA, ND_DOC_EPS), [
            ("nd", lambda ours: _nd(mx, mx_instnorm, ours, x, gamma, beta, ND_DOC_EPS)),
            ("sym (bound executor)",
             lambda ours: _sym(mx, mx_instnorm, ours, x, gamma, beta, ND_DOC_EPS)),
        ]),
        ("gluon.nn.InstanceNorm doc: default init, epsilon=1e-5", GLUON_DOC_OUT,
         _reference(x32, [1.0], [0.0], GLUON_DOC_EPS), [
            ("gluon", lambda ours: _gluon(mx, mx_instnorm, ours, x)),
            ("gluon hybridized", lambda ours: _gluon_hybrid(mx, mx_instnorm, ours, x)),
            ("gluon export + SymbolBlock.imports",
             lambda ours: _gluon_exported(mx, mx_instnorm, ours, x)),
        ]),
    ]
    report.say("1. Documented examples: x = %s (float32)" % ND_DOC_X)
    report.say("   exact: the float64 NumPy result of the same float32 input")
    report.say("   tolerance vs documented numbers: %.0e (they carry float32 noise)"
               % DOC_TOLERANCE)
    row = "   %-36s %-10s %-46s %-9s %-9s %s"
    for title, documented, exact, routes in cases:
        report.say()
        report.say("   %s" % title)
        report.say(row % ("route", "impl", "output (flattened)", "|d exact|", "|d doc|",
                          "|d built-in|"))
        report.say((row % ("", "exact", _fmt_values(exact), "", "", "")).rstrip())
        report.say((row % ("", "documented", _fmt_values(documented),
                          "%.1e" % _maxdiff(documented, exact), "", "")).rstrip())
        for route, run in routes:
            builtin = run(False)
            ours = report.run_ours("documented example, %s" % route, lambda: run(True))
            status = report.check("documented example, %s" % route,
                                  _maxdiff(ours, documented), DOC_TOLERANCE)
            report.say((row % (route, "built-in", _fmt_values(builtin),
                              "%.1e" % _maxdiff(builtin, exact),
                              "%.1e" % _maxdiff(builtin, documented), "")).rstrip())
            report.say(row % ("", "ours", _fmt_values(ours),
                              "%.1e" % _maxdiff(ours, exact),
                              "%.1e" % _maxdiff(ours, documented),
                              "%.1e  %s" % (_maxdiff(ours, builtin), status)))


def _dtypes(report, mx, mx_instnorm):
    rng = np.random.default_rng(0)
    shape = (2, 3, 8, 8)
    x64 = rng.standard_normal(shape)
    gamma64 = rng.uniform(0.5, 1.5, shape[1])
    beta64 = rng.uniform(-0.5, 0.5, shape[1])
    eps = 1e-3
    report.say()
    report.say("2. Data dtypes: x ~ N(0, 1), shape %s, random gamma/beta, eps=%g;"
               % (shape, eps))
    report.say("   max abs error vs a float64 NumPy reference of the same (cast) input")
    report.say("   %-20s %-48s %s" % ("data / params", "built-in mx.nd.InstanceNorm",
                                      "ours (tolerance)"))
    cases = [("float16", "float16"), ("float16", "float32"),
             ("float32", "float32"), ("float64", "float64")]
    for data_dtype, param_dtype in cases:
        x_np = x64.astype(data_dtype)
        g_np, b_np = gamma64.astype(param_dtype), beta64.astype(param_dtype)
        ref = _reference(x_np, g_np, b_np, eps)
        x = mx.nd.array(x_np, dtype=data_dtype)
        gamma = mx.nd.array(g_np, dtype=param_dtype)
        beta = mx.nd.array(b_np, dtype=param_dtype)
        try:
            builtin = "max error %.1e" % _maxdiff(
                mx.nd.InstanceNorm(x, gamma, beta, eps=eps).asnumpy(), ref)
        except Exception as err:  # noqa: BLE001 - reported, not a failure
            builtin = "rejected: " + _error_line(err)
        label = "%s data / %s params" % (data_dtype, param_dtype)
        out_np = report.run_ours(label, lambda: mx_instnorm.nd.InstanceNorm(
            x, gamma, beta, eps=eps).asnumpy())
        error = _maxdiff(out_np, ref) if out_np.shape == ref.shape else float("nan")
        tolerance = DTYPE_TOLERANCE[data_dtype]
        if out_np.shape == ref.shape and out_np.dtype != np.dtype(data_dtype):
            report.failures.append("%s: output dtype %s" % (label, out_np.dtype))
            status = "FAIL (output dtype %s)" % out_np.dtype
        else:
            status = report.check(label, error, tolerance)
        report.say("   %-20s %-48s %.1e (%.0e) %s"
                   % (data_dtype + " / " + param_dtype, builtin[:48], error, tolerance,
                      status))


def _offset(report, mx, mx_instnorm):
    rng = np.random.default_rng(0)
    x_np = (OFFSET + rng.standard_normal(OFFSET_SHAPE)).astype(np.float32)
    channels = OFFSET_SHAPE[1]
    gamma, beta = mx.nd.ones(channels), mx.nd.zeros(channels)
    ref = _reference(x_np, np.ones(channels), np.zeros(channels), OFFSET_EPS)
    x = mx.nd.array(x_np)
    builtin = _maxdiff(mx.nd.InstanceNorm(x, gamma, beta, eps=OFFSET_EPS).asnumpy(), ref)
    ours = _maxdiff(report.run_ours("large offset", lambda: mx_instnorm.nd.InstanceNorm(
        x, gamma, beta, eps=OFFSET_EPS).asnumpy()), ref)
    status = report.check("large offset", ours, OFFSET_TOLERANCE)
    report.say()
    report.say("3. Large offset: x = %.0e + N(0, 1), float32, shape %s, seed 0, eps=%g;"
               % (OFFSET, OFFSET_SHAPE, OFFSET_EPS))
    report.say("   max abs error vs a float64 NumPy reference of the same input")
    report.say("   built-in  %.1e" % builtin)
    report.say("   ours      %.1e (tolerance %.0e) %s" % (ours, OFFSET_TOLERANCE, status))


def _backend_line(mx_instnorm):
    """Which backend computes, and why."""
    return "%s (%s)" % (mx_instnorm.backend(), mx_instnorm.backend_reason())


_CONVERSIONS = {
    "ours": "MXNet's built-in InstanceNorm -> mx_instnorm on the backend in use "
            "(from_native)",
    "native": "mx_instnorm -> MXNet's built-in InstanceNorm (to_native)",
    "custom": "mx_instnorm's compiled op -> its Python CustomOp (to_custom)",
    "compiled": "mx_instnorm's Python CustomOp -> its compiled op (to_compiled)",
}


def _describe(graph, match, name):
    info = match.info
    node = graph["nodes"][match.anchor]
    source = node["op"] if node["op"] != "Custom" else "Custom(%s)" % node["attrs"]["op_type"]
    absorbed = len(match.drop) + (match.output != match.anchor)
    return "%s: %s (axis %s, eps %s)%s" % (
        name, source, info["axis"], info["eps"],
        " with %d node(s) around it" % absorbed if absorbed else "")


def convert_main(argv):
    """``python -m mx_instnorm convert IN OUT [--to KIND]``: one entry point
    for every graph conversion of :mod:`mx_instnorm.graphs`. Prints one line
    per converted node; bad input gets a one-line error and exit status 2.
    Nothing is written unless the conversion succeeds.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mx_instnorm convert",
        description="Rewrite an exported graph (-symbol.json) and write the result; "
                    "argument, auxiliary and output names are kept, so the "
                    "model's .params file loads with it unchanged.")
    parser.add_argument("source", metavar="IN-symbol.json")
    parser.add_argument("target", metavar="OUT-symbol.json")
    parser.add_argument("--to", choices=sorted(_CONVERSIONS), default="ours",
                        help="; ".join("%s: %s" % kv for kv in sorted(_CONVERSIONS.items()))
                        + " (default: ours)")
    parser.add_argument("--inference", action="store_true",
                        help="with --to ours: a graph for inference only, without "
                             "the views that keep grad_req='add' correct in training "
                             "(also removed from compiled nodes already there)")
    args = parser.parse_args(argv)
    if args.inference and args.to != "ours":
        parser.error("--inference goes with --to ours")
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    import mxnet as mx

    import mx_instnorm
    from mx_instnorm.graphs import adopt, backends, native, rewrite

    try:
        if not os.path.isfile(args.source):
            raise ValueError("%s: no such file" % args.source)
        graph = rewrite.graph_dict(args.source, "convert")
        if args.to == "ours":
            result, done = adopt.convert_native(graph, for_training=not args.inference)
            symbol = rewrite.load_graph(result)
        elif args.to == "native":
            # to_native infers dtypes on a Symbol: load the graph first.
            symbol = native.to_native(rewrite.load_graph(graph))
            view = rewrite.GraphView(graph)
            done = []
            for k in range(len(view.nodes)):
                found = backends.match_compiled(view, k) or backends.match_custom(view, k)
                if found is not None:
                    done.append((found, view.nodes[found.output]["name"]))
        else:
            if args.to == "compiled" and mx_instnorm.operator.backend.compiled_op() is None:
                raise RuntimeError("--to compiled needs the compiled operator, which is "
                                   "not available: "
                                   + mx_instnorm.operator.backend.backend_reason())
            result, done = backends.convert_ours(graph, args.to)
            symbol = rewrite.load_graph(result)
        text = symbol.tojson()
        target_dir = os.path.dirname(os.path.abspath(args.target))
        if not os.path.isdir(target_dir):
            raise ValueError("%s: no such directory" % target_dir)
    except (ValueError, TypeError, RuntimeError, OSError, mx.MXNetError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print("error: %s" % message, file=sys.stderr)
        return 2
    with open(args.target, "w") as f:
        f.write(text)
    for found, name in done:
        print("converted " + _describe(graph, found, name))
    print("%d node(s) converted (%s); wrote %s"
          % (len(done), _CONVERSIONS[args.to], args.target))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "convert":
        return convert_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m mx_instnorm",
        description="Run mx_instnorm's documented examples side by side with "
                    "MXNet's built-in InstanceNorm and report; exit status 1 if "
                    "any mx_instnorm result is off by more than its tolerance.")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the final verdict (and failures)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    # Binding an executor otherwise logs "Subgraph backend MKLDNN is activated".
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    import mxnet as mx

    import mx_instnorm

    report = _Report(args.quiet)
    report.say("mx_instnorm %s | mxnet %s | numpy %s | python %s"
               % (mx_instnorm.__version__, mx.__version__, np.__version__,
                  platform.python_version()))
    report.say("backend: %s" % _backend_line(mx_instnorm))
    report.say("MX_INSTNORM_BACKEND=%s MX_INSTNORM_PATH=%s MX_INSTNORM_NUM_THREADS=%s"
               % (os.environ.get("MX_INSTNORM_BACKEND", "(unset: auto)"),
                  os.environ.get("MX_INSTNORM_PATH", "(unset: auto)"),
                  os.environ.get("MX_INSTNORM_NUM_THREADS", "(unset: all CPUs)")))
    report.say()
    _documented(report, mx, mx_instnorm)
    _dtypes(report, mx, mx_instnorm)
    _offset(report, mx, mx_instnorm)
    report.say()
    elapsed = time.perf_counter() - start
    if report.failures:
        print("FAILED: %d mx_instnorm check(s) (%.2f s)"
              % (len(report.failures), elapsed))
        for failure in report.failures:
            print("  - " + failure)
        return 1
    print("OK: every mx_instnorm result within tolerance (%.2f s)" % elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
