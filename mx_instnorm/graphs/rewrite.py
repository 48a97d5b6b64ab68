"""The one walk over a graph's JSON that every conversion shares.

A conversion is a table of *patterns*: pairs ``(match, build)``.
``match(view, k)`` looks at node ``k`` of a :class:`GraphView` and returns a
:class:`Match` (or None; it raises ``ValueError`` naming the node to refuse
a graph it cannot convert faithfully). A match names the *anchor* node, the
entries the replacement consumes, the nodes around the anchor that the
replacement absorbs (guards, transposes) and the node whose output it takes
over. ``build(match, name)`` returns the replacement as node specs: dicts
with ``op``, ``name``, optional ``attrs`` and ``inputs`` given as
``("in", k)`` (the match's k-th input entry) or ``("new", j)`` (output 0 of
the j-th spec); the last spec replaces the match's output node and is named
``name``, that node's name, so output, argument and auxiliary names never
change. :func:`rewrite` applies a table to a whole graph in one pass.

Absorbed nodes must be used by their own pattern only (the matchers check
it); the rewrite checks it again and fails loudly rather than leave a
dangling edge.
"""
import json
import os
from collections import namedtuple

import mxnet as mx

__all__ = ["GraphView", "Match", "rewrite", "graph_dict", "load_graph",
           "declare_vectors"]

#: One occurrence of a pattern. ``anchor``: the node matched; ``inputs``:
#: the graph entries (``[node, output, version]``) the replacement reads;
#: ``drop``: absorbed node indices besides the anchor; ``output``: the node
#: whose output (entry 0) the replacement provides; ``info``: what the
#: builder needs (attributes parsed by the matcher).
Match = namedtuple("Match", ["anchor", "inputs", "drop", "output", "info"])


class GraphView:
    """A graph dict with each node's users: ``users[i]`` lists
    ``(consumer, output index)`` for every input edge reading node ``i``,
    the graph's heads counting as consumer ``None``."""

    def __init__(self, graph):
        self.graph = graph
        self.nodes = graph["nodes"]
        self.users = {}
        for j, node in enumerate(self.nodes):
            for entry in node.get("inputs", []):
                self.users.setdefault(entry[0], []).append((j, entry[1]))
        for entry in graph.get("heads", []):
            self.users.setdefault(entry[0], []).append((None, entry[1]))

    def op(self, i):
        return self.nodes[i].get("op")

    def attrs(self, i):
        return self.nodes[i].get("attrs", {})

    def sole_user(self, i):
        """The one node reading node ``i`` (through output 0), else None."""
        users = self.users.get(i, [])
        if len(users) == 1 and users[0][0] is not None and users[0][1] == 0:
            return users[0][0]
        return None

    def strip(self, entry, anchor, ops, prefix):
        """Follows ``entry`` back through guard nodes (op in ``ops``, named
        ``prefix...``, read only by the next node on the way to ``anchor``):
        ``(the entry before the guards, the guard indices)``."""
        guards, consumer = [], anchor
        while True:
            i = entry[0]
            node = self.nodes[i]
            if (node.get("op") in ops and node["name"].startswith(prefix)
                    and self.sole_user(i) == consumer and entry[1] == 0
                    and len(node.get("inputs", [])) == 1):
                guards.append(i)
                consumer = i
                entry = node["inputs"][0]
                continue
            return list(entry), guards


def rewrite(graph, patterns):
    """``graph`` (a dict) with every match of ``patterns`` replaced.

    Returns ``(new graph dict, matches)``; ``matches`` lists ``(Match,
    name)`` in graph order. A node is tried against the patterns in order;
    the first that matches wins.

    Examples
    --------
    A table of one pattern: every ``relu`` becomes a ``sigmoid`` of the same
    name.

    >>> import json, mxnet as mx
    >>> from mx_instnorm.graphs.rewrite import Match, load_graph, rewrite
    >>> def match(view, k):
    ...     if view.op(k) != 'relu':
    ...         return None
    ...     return Match(k, view.nodes[k]['inputs'], [], k, {})
    >>> def build(found, name):
    ...     return [{'op': 'sigmoid', 'name': name, 'inputs': [('in', 0)]}]
    >>> s = mx.sym.relu(mx.sym.var('x'), name='act')
    >>> graph, done = rewrite(json.loads(s.tojson()), [(match, build)])
    >>> [n['op'] for n in graph['nodes']], [name for _, name in done]
    (['null', 'sigmoid'], ['act'])
    >>> load_graph(graph).list_outputs()
    ['act_output']
    """
    view = GraphView(graph)
    nodes = view.nodes
    matches, taken = {}, set()
    for k in range(len(nodes)):
        if k in taken:
            continue
        for match_fn, build in patterns:
            found = match_fn(view, k)
            if found is not None:
                region = set(found.drop) | {found.anchor, found.output}
                if region & taken:
                    raise ValueError("node %r overlaps another converted node"
                                     % nodes[k]["name"])
                taken |= region
                matches[k] = (found, build)
                break
    dropped = set()
    for found, _ in matches.values():
        dropped |= set(found.drop) | {found.output}
    outputs = {found.output: k for k, (found, _) in matches.items()}

    new_nodes, index_of, done = [], {}, []

    def remap(entry):
        i = entry[0]
        if i not in index_of:
            raise RuntimeError("graph rewrite left node %r without a replacement "
                               "(a bug in mx_instnorm)" % nodes[i]["name"])
        if i in outputs:
            return [index_of[i], 0, 0]
        return [index_of[i]] + list(entry[1:])

    for i, node in enumerate(nodes):
        if i in matches:
            found, build = matches[i]
            name = nodes[found.output]["name"]
            inputs = [remap(e) for e in found.inputs]
            first = len(new_nodes)
            for spec in build(found, name):
                spec = dict(spec)
                spec["inputs"] = [list(inputs[k]) if kind == "in" else [first + k, 0, 0]
                                  for kind, k in spec["inputs"]]
                if not spec.get("attrs"):
                    spec.pop("attrs", None)
                new_nodes.append(spec)
            if new_nodes[-1]["name"] != name:
                raise RuntimeError("replacement of %r must end in a node named %r"
                                   % (node["name"], name))
            index_of[found.output] = len(new_nodes) - 1
            done.append((found, name))
            continue
        if i in dropped:
            continue
        new_nodes.append(dict(node, inputs=[remap(e) for e in node.get("inputs", [])]))
        index_of[i] = len(new_nodes) - 1
    result = {
        "nodes": new_nodes,
        "arg_nodes": [i for i, n in enumerate(new_nodes) if n["op"] == "null"],
        "heads": [remap(e) for e in graph["heads"]],
        "attrs": graph.get("attrs", {"mxnet_version": ["int", 10901]}),
    }
    return result, done


def declare_vectors(graph, op_name):
    """Declares the gamma/beta variables (inputs 1 and 2, through ``_copy``
    views) of every ``op_name`` node as vectors when they have no shape.

    MXNet 1.9.1's shape inference for library operators sizes a buffer from
    the inputs' ranks, an unknown rank counting as -1, and writes past it
    when gamma/beta have unknown rank (see ``_declare_rank_one`` in
    :mod:`mx_instnorm.operator.functions`, which does this for Symbols).
    A vector of unknown length is what Gluon's deferred parameters are; the
    library fills in the length from the data. Edits ``graph`` in place.
    """
    nodes = graph["nodes"]
    unknown = "(-1,)" if mx.util.is_np_shape() else "(0,)"
    for node in nodes:
        if node.get("op") != op_name:
            continue
        for entry in node.get("inputs", [])[1:3]:
            source = nodes[entry[0]]
            while source.get("op") == "_copy":
                source = nodes[source["inputs"][0][0]]
            if source.get("op") == "null":
                attrs = source.setdefault("attrs", {})
                attrs.setdefault("__shape__", unknown)
    return graph


def graph_dict(graph, caller):
    """``graph`` (Symbol, JSON text or the path of a ``-symbol.json``) as a
    dict; the text is read as JSON, so it may name ops not registered here."""
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
        try:
            result = json.loads(text)
        except ValueError as err:
            raise ValueError("%s: %s is not graph JSON (%s)"
                             % (caller, "the text" if text is graph else repr(graph),
                                err)) from None
        if not isinstance(result, dict) or not isinstance(result.get("nodes"), list) \
                or "heads" not in result:
            raise ValueError("%s: %s is JSON but not an MXNet graph (no nodes/heads)"
                             % (caller, "the text" if text is graph else repr(graph)))
        return result
    raise TypeError("%s expects a Symbol, graph JSON or the path of a graph file, got %s"
                    % (caller, type(graph).__name__))


def load_graph(graph):
    """A Symbol from a graph dict, with MXNet's own loader (a parser, not
    the hooked one: see :mod:`mx_instnorm.integration.load_hook`)."""
    load_json = mx.sym.load_json
    return getattr(load_json, "__wrapped__", load_json)(json.dumps(graph))
