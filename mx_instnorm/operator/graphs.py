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

Where the compiled operator is not available, ``import mx_instnorm`` wraps
``mx.sym.load`` and ``mx.sym.load_json`` (and so ``SymbolBlock.imports``,
``Module.load`` and ``mx.model.load_checkpoint``) so that a graph with
compiled nodes fails with an ``MXNetError`` that says why and names the fix
instead of MXNet's "operator not registered".
"""
import functools
import json
import os

import mxnet as mx

from . import backend
from .custom_op import OP_TYPE

__all__ = ["COMPILED_NAME", "to_custom", "to_compiled", "install_load_hook"]

#: The compiled operator's name in graph files, known also where it is not
#: loaded (the library registers it under this name).
COMPILED_NAME = "mx_instnorm_InstanceNorm"


def _is_custom(node):
    return node.get("op") == "Custom" and node.get("attrs", {}).get("op_type") == OP_TYPE


def _is_compiled(node):
    return node.get("op") == COMPILED_NAME


def _attrs(node):
    attrs = node.get("attrs", {})
    return {"eps": attrs.get("eps", "0.001"), "axis": attrs.get("axis", "1")}


def _as_custom(node):
    name = node["name"]
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


def _as_compiled(node):
    name = node["name"]
    views = [{"op": "_copy", "name": "%s_%s" % (name, role), "inputs": [("in", k)]}
             for k, role in enumerate(("data", "gamma", "beta"))]
    return views + [{"op": COMPILED_NAME, "name": name, "attrs": _attrs(node),
                     "inputs": [("new", 0), ("new", 1), ("new", 2)]}]


def _rewrite(graph, match, replace):
    """The graph dict with each node for which ``match`` holds replaced by
    the nodes ``replace(node)`` returns: their inputs are ``("in", k)`` for
    the node's k-th input or ``("new", j)`` for output 0 of the j-th new
    node; the last new node takes the old node's place (its output 0)."""
    new_nodes, index_of = [], {}

    def remap(entry):
        return [index_of[entry[0]]] + list(entry[1:])

    for i, node in enumerate(graph["nodes"]):
        inputs = [remap(e) for e in node.get("inputs", [])]
        if not match(node):
            new_nodes.append(dict(node, inputs=inputs))
        else:
            first = len(new_nodes)
            for spec in replace(node):
                spec = dict(spec)
                spec["inputs"] = [inputs[k] if kind == "in" else [first + k, 0, 0]
                                  for kind, k in spec["inputs"]]
                if not spec.get("attrs"):
                    spec.pop("attrs", None)
                new_nodes.append(spec)
        index_of[i] = len(new_nodes) - 1
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
    return _original_load_json(json.dumps(graph_dict))


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
    return _load(_rewrite(_graph_dict(graph, "to_custom"), _is_compiled, _as_custom))


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
    return _load(_rewrite(_graph_dict(graph, "to_compiled"), _is_custom, _as_compiled))


# ------------------------------------------------------------ load hook --

_original_load_json = mx.sym.load_json
_original_load = mx.sym.load


def _explain(err):
    if COMPILED_NAME not in str(err):
        return err
    return mx.MXNetError(
        "this graph uses mx_instnorm's compiled operator %s, which is not available "
        "in this process (%s). Convert the graph to the Python backend with "
        "mx_instnorm.to_custom(path_or_json), which returns a Symbol, or reinstall "
        "mx_instnorm where a C++ compiler is available (pip install mx_instnorm "
        "builds it). MXNet said: %s"
        % (COMPILED_NAME, backend.backend_reason(), str(err).strip().splitlines()[0]))


def _hooked(original):
    @functools.wraps(original)
    def load(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except mx.MXNetError as err:
            explained = _explain(err)
            if explained is err:
                raise
            raise explained from err
    load.__wrapped_by_mx_instnorm__ = True
    return load


def install_load_hook():
    """Wraps ``mx.sym.load``/``load_json`` so that a graph naming the
    compiled operator, where it is not available, fails with an explanation
    (a no-op where the compiled operator is loaded)."""
    if backend.compiled_op() is not None:
        return
    for module in (mx.symbol, mx.symbol.symbol):
        for attr in ("load", "load_json"):
            fn = getattr(module, attr)
            if not getattr(fn, "__wrapped_by_mx_instnorm__", False):
                setattr(module, attr, _hooked(fn))
