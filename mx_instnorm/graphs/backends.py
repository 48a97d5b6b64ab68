"""Graphs between the two backends, and graph files that name a missing op.

A graph exported on the compiled backend holds nodes of the compiled
operator (``op`` :data:`COMPILED_NAME`); one exported on the Python backend,
or by mx_instnorm 0.1, holds ``Custom`` nodes (``op_type`` ``OP_TYPE``).
Both compute the same function with the same attributes (``eps``,
``axis``) and inputs (data, gamma, beta), so :func:`to_custom` and
:func:`to_compiled` rewrite one kind into the other on the graph's JSON,
which works where the other kind's operator is not registered.

Each rewrite (one pattern table for :func:`.rewrite.rewrite`) drops the
guards the source backend put around its node and puts in what the target
backend needs (see :mod:`mx_instnorm.operator.functions`): a compiled node
gets a ``_copy`` view before gamma and beta, and before the data where it
is a graph input, so that ``grad_req='add'`` stays correct, and its
gamma/beta variables are declared as vectors (a shape-inference bug of
MXNet 1.9.1, see :func:`.rewrite.declare_vectors`); a Custom node gets the
copying layout guards of :mod:`mx_instnorm.operator._onednn` (the data's
rank is not known from the JSON). The replacement's last node keeps the
fragment's output name, so output, argument and auxiliary names are
unchanged.
"""
from ..operator import backend, exec_addto
from ..operator.compiled import OP_NAME as COMPILED_NAME
from ..operator.custom_op import OP_TYPE
from .rewrite import Match, declare_vectors, graph_dict, load_graph, rewrite

__all__ = ["COMPILED_NAME", "to_custom", "to_compiled", "match_compiled",
           "match_custom", "build_compiled", "build_custom", "convert_ours"]

# The guard ops mx_instnorm puts before each kind of op's inputs (see
# .functions): views for the compiled op, layout guards for the Custom one.
_COMPILED_GUARDS = {"_copy"}
_CUSTOM_GUARDS = {"_copy", "Reshape", "reshape", "squeeze", "expand_dims"}


def _info(view, k):
    attrs = view.attrs(k)
    return {"eps": attrs.get("eps", "0.001"), "axis": attrs.get("axis", "1"),
            "extra": {a: v for a, v in attrs.items() if a.startswith("__")},
            "anchor": view.nodes[k]["name"], "op": view.op(k)}


def _strip_inputs(view, k, ops, prefix):
    inputs, drop = [], []
    for entry in view.nodes[k].get("inputs", []):
        entry, guards = view.strip(entry, k, ops, prefix)
        inputs.append(entry)
        drop.extend(guards)
    return inputs, drop


def match_compiled(view, k):
    """A compiled node with the views :mod:`.functions` puts before it."""
    if view.op(k) != COMPILED_NAME:
        return None
    name = view.nodes[k]["name"]
    inputs, drop = _strip_inputs(view, k, _COMPILED_GUARDS, name)
    return Match(k, inputs, drop, k, _info(view, k))


def match_custom(view, k):
    """A ``Custom`` node of ours (``<name>_op``) with its layout guards and
    its output copy (a ``slice_axis`` named ``<name>``)."""
    if view.op(k) != "Custom" or view.attrs(k).get("op_type") != OP_TYPE:
        return None
    name = view.nodes[k]["name"]
    base = name[:-len("_op")] if name.endswith("_op") else name
    inputs, drop = _strip_inputs(view, k, _CUSTOM_GUARDS, base)
    output = k
    user = view.sole_user(k)
    if (name.endswith("_op") and user is not None and view.op(user) == "slice_axis"
            and view.nodes[user]["name"] == base):
        output = user
    return Match(k, inputs, drop, output, _info(view, k))


def _ours_attrs(info):
    return dict(info["extra"], eps=info["eps"], axis=info["axis"])


def build_custom(match, name):
    """The Python backend's fragment (:func:`.functions._custom` with an
    unknown rank): a copying input guard, the Custom node, the output copy."""
    return [
        {"op": "expand_dims", "name": name + "_expand", "attrs": {"axis": "0"},
         "inputs": [("in", 0)]},
        {"op": "squeeze", "name": name + "_in", "attrs": {"axis": "0"},
         "inputs": [("new", 0)]},
        {"op": "Custom", "name": name + "_op",
         "attrs": dict(_ours_attrs(match.info), op_type=OP_TYPE),
         "inputs": [("new", 1), ("in", 1), ("in", 2)]},
        {"op": "slice_axis", "name": name,
         "attrs": {"axis": "0", "begin": "0", "end": "None"}, "inputs": [("new", 2)]},
    ]


def build_compiled(match, name):
    """The compiled backend's fragment (:func:`.functions._compiled`): a
    view before gamma and beta, and before the data where its gradient may
    be accumulated (``info['data_view']``; true unless the matcher knows the
    data is computed inside the graph); none at all for an inference graph
    (``info['views']`` false)."""
    if not match.info.get("views", True):
        # An inference graph: no gradient flows, so no view is needed.
        return [{"op": COMPILED_NAME, "name": name, "attrs": _ours_attrs(match.info),
                 "inputs": [("in", 0), ("in", 1), ("in", 2)]}]
    roles = ("data", "gamma", "beta") if match.info.get("data_view", True) \
        else ("gamma", "beta")
    views = [{"op": "_copy", "name": "%s_%s" % (name, role),
              "inputs": [("in", ("data", "gamma", "beta").index(role))]}
             for role in roles]
    refs = {role: ("new", j) for j, role in enumerate(roles)}
    refs.setdefault("data", ("in", 0))
    return views + [{"op": COMPILED_NAME, "name": name, "attrs": _ours_attrs(match.info),
                     "inputs": [refs["data"], refs["gamma"], refs["beta"]]}]


def _data_view(view, match):
    """Whether the compiled fragment needs a view before the data (as
    :func:`.functions._compiled` decides: a graph input, or in-place
    gradient summing enabled now)."""
    return exec_addto() or view.op(match.inputs[0][0]) == "null"


def convert_ours(graph, kind):
    """``(graph dict, matches)``: ``graph`` (a dict) with our nodes of the
    other backend rewritten to ``kind`` ('custom' or 'compiled')."""
    if kind == "custom":
        return rewrite(graph, [(match_compiled, build_custom)])

    def match(view, k):
        found = match_custom(view, k)
        if found is not None:
            found.info["data_view"] = _data_view(view, found)
        return found
    result, done = rewrite(graph, [(match, build_compiled)])
    return declare_vectors(result, COMPILED_NAME), done


def to_custom(graph):
    """``graph`` with every compiled-operator node replaced by the Python
    CustomOp, for machines where the compiled operator is not available.

    Parameters
    ----------
    graph : Symbol, str
        A Symbol, a graph's JSON text, or the path of a ``-symbol.json``
        file (read as JSON, so it works where the compiled operator is not
        registered).

    Returns
    -------
    Symbol
        The same function, argument, auxiliary and output names.

    Examples
    --------
    >>> import json, mx_instnorm
    >>> text = ('{"nodes": [{"op": "null", "name": "x", "inputs": []},'
    ...         ' {"op": "null", "name": "g", "inputs": []},'
    ...         ' {"op": "null", "name": "b", "inputs": []},'
    ...         ' {"op": "mx_instnorm_InstanceNorm", "name": "in1",'
    ...         '  "attrs": {"eps": "1e-05", "axis": "1"},'
    ...         '  "inputs": [[0, 0, 0], [1, 0, 0], [2, 0, 0]]}],'
    ...         ' "arg_nodes": [0, 1, 2], "heads": [[3, 0, 0]]}')
    >>> s = mx_instnorm.to_custom(text)
    >>> [n['op'] for n in json.loads(s.tojson())['nodes']].count('Custom')
    1
    >>> s.list_arguments()
    ['x', 'g', 'b']
    """
    return load_graph(convert_ours(graph_dict(graph, "to_custom"), "custom")[0])


def to_compiled(graph):
    """``graph`` with every mx_instnorm ``Custom`` node (graphs of the Python
    backend and of mx_instnorm 0.1) replaced by the compiled operator.

    Parameters
    ----------
    graph : Symbol, str
        As for :func:`to_custom`.

    Raises
    ------
    RuntimeError
        If the compiled operator is not available here.
    """
    if backend.compiled_op() is None:
        raise RuntimeError("to_compiled needs mx_instnorm's compiled operator, which "
                           "is not available: " + backend.backend_reason())
    return load_graph(convert_ours(graph_dict(graph, "to_compiled"), "compiled")[0])
