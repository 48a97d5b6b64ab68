"""Graphs between the two backends, and graph files that name a missing op.

A graph exported on the compiled backend holds nodes of the compiled
operator (``op`` :data:`COMPILED_NAME`); one exported on the Python backend,
or by mx_instnorm 0.1, holds ``Custom`` nodes (``op_type`` ``OP_TYPE``).
Both compute the same function with the same attributes (``eps``,
``axis``) and inputs (data, gamma, beta), so :func:`to_custom` and
:func:`to_compiled` rewrite one kind into the other on the graph's JSON,
which works where the other kind's operator is not registered.

Each rewrite puts in what the target backend needs around its node (see
:mod:`.functions`): a compiled node gets an ``identity`` before each input,
so that ``grad_req='add'`` stays correct; a Custom node gets the copying
layout guards of :mod:`._onednn` (the data's rank is not known from the
JSON). The replacement's last node keeps the original node's name, so
output, argument and auxiliary names are unchanged.

"""
import json
import os

import mxnet as mx

from ..operator import backend
from ..operator.compiled import OP_NAME as COMPILED_NAME
from ..operator.custom_op import OP_TYPE

__all__ = ["COMPILED_NAME", "to_custom", "to_compiled"]



def _is_custom(node):
    return node.get("op") == "Custom" and node.get("attrs", {}).get("op_type") == OP_TYPE


def _is_compiled(node):
    return node.get("op") == COMPILED_NAME


def _attrs(node):
    attrs = node.get("attrs", {})
    return {"eps": attrs.get("eps", "0.001"), "axis": attrs.get("axis", "1")}


def _as_custom(node, name):
    return [
        {"op": "expand_dims", "name": name + "_expand", "attrs": {"axis": "0"},
         "inputs": [("in", 0)]},
        {"op": "squeeze", "name": name + "_in", "attrs": {"axis": "0"},
         "inputs": [("new", 0)]},
        {"op": "Custom", "name": name + "_op", "attrs": dict(_attrs(node), op_type=OP_TYPE),
         "inputs": [("new", 1), ("in", 1), ("in", 2)]},
        {"op": "slice_axis", "name": name,
         "attrs": {"axis": "0", "begin": "0", "end": "None"}, "inputs": [("new", 2)]},
    ]


def _as_compiled(node, name):
    # Every input through a view: whether the data is a graph input or an
    # executor sums gradients in place is not known from the JSON.
    views = [{"op": "_copy", "name": "%s_%s" % (name, role), "inputs": [("in", k)]}
             for k, role in enumerate(("data", "gamma", "beta"))]
    return views + [{"op": COMPILED_NAME, "name": name, "attrs": _attrs(node),
                     "inputs": [("new", 0), ("new", 1), ("new", 2)]}]


# The nodes mx_instnorm puts around each kind of op (see .functions): the
# ops of its input guards and of its output node.
_FRAGMENT = {
    "compiled": ({"_copy"}, None),
    "custom": ({"_copy", "Reshape", "reshape", "squeeze", "expand_dims"}, "slice_axis"),
}


def _fragment_nodes(nodes, heads, k, kind):
    """The nodes of our fragment around node ``k`` (of ``kind``) that a
    rewrite drops: ``(skipped input-side node indices, output node index or
    None)``. A node is ours when only our op (or our own guard) consumes it
    and, for the output node, its name is the op's minus ``_op``."""
    inputs_ops, output_op = _FRAGMENT[kind]
    consumers = {}
    for j, n in enumerate(nodes):
        for e in n.get("inputs", []):
            consumers.setdefault(e[0], []).append(j)
    head_nodes = {e[0] for e in heads}
    skipped = set()
    frontier = [nodes[k]["inputs"][i][0] for i in range(len(nodes[k]["inputs"]))]
    while frontier:
        i = frontier.pop()
        node = nodes[i]
        users = consumers.get(i, [])
        if (node["op"] in inputs_ops and i not in head_nodes and len(users) == 1
                and (users[0] == k or users[0] in skipped)
                and node["name"].startswith(nodes[k]["name"].rsplit("_op", 1)[0])):
            skipped.add(i)
            frontier.extend(e[0] for e in node["inputs"])
    out = None
    users = consumers.get(k, [])
    if (nodes[k]["name"].endswith("_op") and len(users) == 1
            and nodes[users[0]]["op"] == output_op
            and nodes[users[0]]["name"] + "_op" == nodes[k]["name"]):
        out = users[0]
    return skipped, out


def _rewrite(graph, kind, replace):
    """The graph dict with each of our ops of ``kind`` (with the fragment
    mx_instnorm builds around it) replaced by the nodes ``replace(node,
    name)`` returns: their inputs are ``("in", k)`` for the op's k-th input
    (before its fragment's guards) or ``("new", j)`` for output 0 of the
    j-th new node; the last new node, named ``name`` (the fragment's output
    name), takes the fragment's place."""
    nodes = graph["nodes"]
    match = _is_compiled if kind == "compiled" else _is_custom
    skipped, outputs = set(), {}
    for k, node in enumerate(nodes):
        if match(node):
            guards, out = _fragment_nodes(nodes, graph["heads"], k, kind)
            skipped |= guards
            if out is not None:
                skipped.add(out)
                outputs[k] = out
    new_nodes, entry_of = [], {}

    def remap(entry):
        head = entry_of[entry[0]]
        return list(head) if entry[0] in skipped else [head[0]] + list(entry[1:])

    for i, node in enumerate(nodes):
        inputs = [remap(e) for e in node.get("inputs", [])]
        if i in skipped:
            # A guard stands for its own input; an output node for our op's
            # replacement (set when that is built).
            if i not in entry_of:
                entry_of[i] = inputs[0] if inputs else None
            continue
        if not match(node):
            new_nodes.append(dict(node, inputs=inputs))
        else:
            first = len(new_nodes)
            name = nodes[outputs[i]]["name"] if i in outputs else node["name"]
            for spec in replace(node, name):
                spec = dict(spec)
                spec["inputs"] = [inputs[k] if kind_ == "in" else [first + k, 0, 0]
                                  for kind_, k in spec["inputs"]]
                if not spec.get("attrs"):
                    spec.pop("attrs", None)
                new_nodes.append(spec)
            if i in outputs:
                entry_of[outputs[i]] = [len(new_nodes) - 1, 0, 0]
        entry_of[i] = [len(new_nodes) - 1, 0, 0]
    return {
        "nodes": new_nodes,
        "arg_nodes": [i for i, n in enumerate(new_nodes) if n["op"] == "null"],
        "heads": [remap(e) for e in graph["heads"]],
        "attrs": graph.get("attrs", {}),
    }


def _graph_dict(graph, caller):
    """``graph`` (Symbol, JSON text or the path of a ``-symbol.json``) as a dict."""
    if isinstance(graph, mx.sym.Symbol):
        return json.loads(graph.tojson())
    if isinstance(graph, str):
        text = graph
        if not graph.lstrip().startswith("{"):
            if not os.path.isfile(graph):
                raise ValueError("%s expects a Symbol, graph JSON or the path of a "
                                 "graph file; %r is none of these" % (caller, graph))
            with open(graph) as f:
                text = f.read()
        return json.loads(text)
    raise TypeError("%s expects a Symbol, graph JSON or the path of a graph file, got %s"
                    % (caller, type(graph).__name__))


def _load(graph_dict):
    # MXNet's own loader (a parser, not the hooked one: see
    # mx_instnorm.integration.load_hook), unwrapped where it was wrapped.
    load_json = mx.sym.load_json
    return getattr(load_json, "__wrapped__", load_json)(json.dumps(graph_dict))


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
    return _load(_rewrite(_graph_dict(graph, "to_custom"), "compiled", _as_custom))


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
    return _load(_rewrite(_graph_dict(graph, "to_compiled"), "custom", _as_compiled))
