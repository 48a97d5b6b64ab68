"""Adopting exported models: MXNet's built-in ``InstanceNorm`` into ours.

A model exported years ago (a ``-symbol.json`` and a ``.params`` file) uses
MXNet's built-in ``InstanceNorm``. :func:`from_native` rewrites its graph,
one pattern table for :func:`.rewrite.rewrite`, the inverse of
:func:`mx_instnorm.to_native`:

* ``InstanceNorm(data, gamma, beta)`` becomes our op with ``axis=1``;
* ``SwapAxis(1, k) -> InstanceNorm -> SwapAxis(1, k)`` (what
  ``nn.InstanceNorm(axis=k)`` and :func:`~mx_instnorm.to_native` write for
  a channel axis other than 1) becomes one node of ours with ``axis=k``, no
  transposes: swapping two axes is its own inverse, and the built-in
  normalizes over every axis after 1, whose order does not matter.

Our node is the fragment the backend in use builds (see
:mod:`mx_instnorm.graphs.backends`), named after the node whose output it
replaces, so argument, auxiliary and output names are unchanged and the
original ``.params`` file loads as it is.

The built-in computes ``(x - mean) / sqrt(var + eps) * gamma + beta`` with
the biased variance, as ours does; ``eps`` is read as MXNet wrote it (its
default 1e-3 where the attribute is absent).
"""
import mxnet as mx

from ..operator import backend, parse_eps
from .backends import COMPILED_NAME, _data_view, build_compiled, build_custom, match_compiled
from .rewrite import Match, declare_vectors, graph_dict, load_graph, rewrite

__all__ = ["from_native", "convert_native"]

_BUILTIN_DEFAULT_EPS = "0.001"


def _swap_dims(view, i):
    """``SwapAxis`` node ``i``'s (dim1, dim2) as ints (MXNet's default 0)."""
    attrs = view.attrs(i)
    try:
        return int(attrs.get("dim1", "0")), int(attrs.get("dim2", "0"))
    except ValueError:
        return None


def _channel(dims):
    """The axis a ``SwapAxis(dims)`` exchanges with axis 1, else None
    (a negative dim is resolved at run time; 1 must be written as 1)."""
    if dims is None:
        return None
    a, b = dims
    if a == 1:
        return b
    if b == 1:
        return a
    return None


def _refuse(name, why):
    raise ValueError("from_native cannot convert node %r: %s; the graph is left "
                     "as it was" % (name, why))


def match_builtin(view, k):
    """A built-in ``InstanceNorm`` node, with the ``SwapAxis`` pair around
    it where there is one."""
    if view.op(k) != "InstanceNorm":
        return None
    node = view.nodes[k]
    name = node["name"]
    inputs = node.get("inputs", [])
    if len(inputs) != 3:
        _refuse(name, "it has %d inputs, expected 3 (data, gamma, beta)" % len(inputs))
    attrs = view.attrs(k)
    unknown = sorted(a for a in attrs if a != "eps" and not a.startswith("__"))
    if unknown:
        _refuse(name, "unknown attribute(s) %s" % ", ".join(unknown))
    eps = attrs.get("eps", _BUILTIN_DEFAULT_EPS)
    try:
        eps = repr(parse_eps(eps))
    except ValueError as err:
        _refuse(name, str(err))
    users = view.users.get(k, [])
    hidden = [u for u in users if u[1] != 0]
    if hidden:
        # Ours has no mean/var outputs.
        _refuse(name, "its output %d (mean or var) is used" % hidden[0][1])
    info = {"eps": eps, "axis": "1", "anchor": name, "op": "InstanceNorm",
            "extra": {a: v for a, v in attrs.items() if a.startswith("__")}}
    data = inputs[0]
    before = data[0] if view.op(data[0]) == "SwapAxis" and data[1] == 0 else None
    after = users[0][0] if (len(users) == 1 and users[0][0] is not None
                            and view.op(users[0][0]) == "SwapAxis") else None
    if before is None or after is None:
        # No pair of transposes: the node alone, channel axis 1.
        return Match(k, list(inputs), [], k, info)
    axis_in = _channel(_swap_dims(view, before))
    axis_out = _channel(_swap_dims(view, after))
    if axis_in is None or axis_out is None or axis_in != axis_out:
        _refuse(name, "it sits between SwapAxis %r %s and SwapAxis %r %s, which do "
                "not swap axis 1 with the same axis k"
                % (view.nodes[before]["name"], _swap_dims(view, before),
                   view.nodes[after]["name"], _swap_dims(view, after)))
    if view.sole_user(before) != k:
        _refuse(name, "the output of SwapAxis %r before it is used elsewhere too"
                % view.nodes[before]["name"])
    if axis_in == 0:
        _refuse(name, "its SwapAxis pair puts the channels on the batch axis 0")
    if axis_in == 1:
        info["axis"] = "1"
    else:
        info["axis"] = str(axis_in)
    swapped = [list(view.nodes[before]["inputs"][0])] + [list(e) for e in inputs[1:]]
    return Match(k, swapped, [before], after, info)


def convert_native(graph, for_training=True):
    """``(graph dict, matches)``: ``graph`` (a dict) with every built-in
    InstanceNorm rewritten to ours on the backend in use; with
    ``for_training`` false, compiled nodes (also those already there) get
    no views (see :func:`from_native`)."""
    compiled = backend.use_compiled()

    def match(view, k):
        found = match_builtin(view, k)
        if found is not None and compiled:
            found.info["data_view"] = _data_view(view, found)
            found.info["views"] = for_training
        return found

    def match_viewed(view, k):
        # A compiled node with at least one view, to be rebuilt without.
        found = match_compiled(view, k)
        if found is None or not found.drop:
            return None
        found.info["views"] = False
        return found
    patterns = [(match, build_compiled if compiled else build_custom)]
    if compiled and not for_training:
        patterns.append((match_viewed, build_compiled))
    result, done = rewrite(graph, patterns)
    if compiled:
        declare_vectors(result, COMPILED_NAME)
    return result, done


def from_native(graph, for_training=True):
    """``graph`` with every built-in ``InstanceNorm`` computed by mx_instnorm.

    Parameters
    ----------
    graph : Symbol, str
        A Symbol, a graph's JSON text, or the path of a ``-symbol.json``
        file (as ``HybridBlock.export`` or ``Module.save_checkpoint`` wrote
        it).
    for_training : bool, default True
        False for a graph that will only run inference: on the compiled
        backend our nodes then get none of the ``_copy`` views that keep
        ``grad_req='add'`` correct (see
        :func:`mx_instnorm.operator.functions.instance_norm`), and the
        views of compiled nodes already in the graph (a swapped Gluon net's
        export has two per layer) are removed. They cost about 10 us each
        per call, which matters only for small tensors. Do not train such a
        graph with ``grad_req='add'``: gamma and beta would get the last
        pass's gradient instead of the sum.

    Returns
    -------
    Symbol
        The same arguments, auxiliary states and outputs (names and order),
        computing the same function on the backend in use
        (:func:`mx_instnorm.backend`). Every other node is kept as it is; a
        graph without ``InstanceNorm`` comes back equal.

    Raises
    ------
    ValueError
        If a node cannot be converted faithfully (named in the message):
        its mean/var outputs are used, it has unknown attributes, or it sits
        between two ``SwapAxis`` that do not form the pair
        ``nn.InstanceNorm(axis=k)`` writes (different axes, or the first
        one's output used elsewhere), or ``graph`` is not a graph.
    TypeError
        If ``graph`` is neither a Symbol nor a string.

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> x = mx.sym.var('x')
    >>> s = mx.sym.SwapAxis(mx.sym.InstanceNorm(mx.sym.SwapAxis(x, 1, 3),
    ...                                         name='in1'), 1, 3)
    >>> ours = mx_instnorm.from_native(s)
    >>> ops = [n['op'] for n in __import__('json').loads(ours.tojson())['nodes']]
    >>> 'InstanceNorm' in ops, 'SwapAxis' in ops
    (False, False)
    >>> ours.list_arguments() == s.list_arguments()
    True
    >>> args = {'x': mx.nd.random.normal(shape=(2, 3, 4, 5)),
    ...         'in1_gamma': mx.nd.ones(5), 'in1_beta': mx.nd.zeros(5)}
    >>> bool(abs(ours.eval(**args)[0] - s.eval(**args)[0]).max() < 1e-4)
    True
    """
    graph = graph_dict(graph, "from_native")
    result, _ = convert_native(graph, for_training=bool(for_training))
    return load_graph(result)
