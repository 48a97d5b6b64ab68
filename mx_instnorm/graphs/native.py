"""Rewriting mx_instnorm's operator into MXNet's built-in ``InstanceNorm``.

A graph that uses our op needs ``import mx_instnorm`` wherever it runs,
because a ``Custom`` node (Python backend) is resolved by name in the
running process and a compiled node (``mx_instnorm_InstanceNorm``) needs
our library loaded. MXNet's
own ``InstanceNorm`` computes the same function (biased variance, ``eps``
inside the square root) for float32 data with the channel axis at 1, so
:func:`to_native` replaces each of our nodes by it, and :func:`export_native`
writes the files ``HybridBlock.export`` writes with the rewritten graph.

The rewrite edits the graph's JSON: each of our nodes (``Custom`` or
compiled) becomes

* ``InstanceNorm(data, gamma, beta)`` when the channel axis is 1;
* ``SwapAxis(1, axis) -> InstanceNorm -> SwapAxis(1, axis)`` otherwise
  (the built-in normalizes every axis after 1; swapping two axes is its own
  inverse and leaves the normalized axes' order irrelevant).

The last node keeps our node's name, so the output names
(``<name>_output``) and every argument and auxiliary name are unchanged. The
guard node the package puts before our op's data input is left as it is.
"""
import json

import mxnet as mx
import numpy as np

from ..operator import _params
from ..operator._errors import explain_errors
from ..operator.custom_op import OP_TYPE
from .backends import COMPILED_NAME

__all__ = ["to_native", "export_native"]


def _is_ours(node):
    """A node of the Python backend (``Custom``) or of the compiled one."""
    if node.get("op") == COMPILED_NAME:
        return True
    return node.get("op") == "Custom" and node.get("attrs", {}).get("op_type") == OP_TYPE


def _summary(err):
    """The first line of an MXNetError, and for the compiled operator the
    message it reported (the last line of MXNet's "Extension Traceback")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    summary = lines[0] if lines else ""
    if "Extension Traceback:" in lines[:-1]:
        summary += " -- " + lines[-1].split("]: ", 1)[-1]
    return summary


def _infer(symbol, ours, nodes, shapes, dtypes):
    """Per node of ours: (rank or None, dtype or None), from partial inference.

    Variables' ``__dtype__``/``__shape__`` attributes take part, so a graph
    from a block cast to float64 is recognized without ``dtypes``.
    """
    internals = symbol.get_internals()
    names = internals.list_outputs()
    try:
        with explain_errors():
            _, out_types, _ = internals.infer_type_partial(**(dtypes or {}))
    except mx.MXNetError as err:
        # Some operators (take's index, one_hot...) need their input's dtype
        # to be known; say which inputs had none.
        missing = [n for n in symbol.list_inputs() if n not in (dtypes or {})]
        raise ValueError("could not infer the graph's dtypes from %r: %s; inputs "
                         "without a dtype: %s (pass them in dtypes=)"
                         % (dtypes, _summary(err),
                            ", ".join(missing) or "none")) from None
    out_shapes = [None] * len(names)
    if shapes:
        try:
            # Our Prop's own message (rank, channels...) comes first.
            with explain_errors():
                _, out_shapes, _ = internals.infer_shape_partial(**shapes)
        except mx.MXNetError as err:
            raise ValueError("could not infer the graph's shapes from %r: %s"
                             % (shapes, _summary(err))) from None
    by_name = dict(zip(names, zip(out_shapes, out_types)))
    found = {}
    for i in ours:
        # A Custom node's single output is listed as "<name>_output"; the
        # compiled node's y (with mean and rstd beside it) as "<name>_output0".
        name = nodes[i]["name"]
        shape, dtype = by_name.get(name + "_output",
                                   by_name.get(name + "_output0", (None, None)))
        # Legacy (non-numpy) shape semantics: rank 0 means "unknown".
        rank = len(shape) if shape else None
        found[i] = (rank, None if dtype is None else np.dtype(dtype))
    return found


def _native_nodes(node, rank, dtype):
    """The built-in replacement for one of our nodes: a list of nodes whose
    inputs are ``("in", k)`` for the k-th input of ``node`` or ``("new", j)``
    for output 0 of the j-th node of the list; the last one replaces it.
    """
    name = node["name"]
    attrs = node.get("attrs", {})
    eps = _params.parse_eps(attrs.get("eps", "0.001"))
    axis = _params.parse_axis(attrs.get("axis", "1"))
    if dtype is not None and dtype != np.float32:
        raise TypeError("node %r computes in %s, but MXNet's built-in InstanceNorm "
                        "computes float32 only; cast the model to float32 before "
                        "export_native/to_native" % (name, dtype))
    if len(node.get("inputs", [])) != 3:
        raise ValueError("node %r has %d inputs, expected 3 (data, gamma, beta)"
                         % (name, len(node.get("inputs", []))))
    if rank is not None:
        if rank < 3:
            raise ValueError("node %r: InstanceNorm needs data of rank >= 3, the "
                             "graph gives it rank %d" % (name, rank))
        # A known rank lets us write a non-negative axis, which other tools
        # (MXNet's ONNX exporter for SwapAxis) require.
        try:
            axis = _params.normalize_axis(axis, rank)
        except ValueError as err:
            raise ValueError("node %r: %s" % (name, err)) from None
    elif axis == 0:
        raise ValueError("node %r: axis 0 is the batch axis" % (name,))
    # Dunder attributes (profiler scope, ctx group...) stay with the node.
    extra = {k: v for k, v in attrs.items() if k.startswith("__")}
    norm_attrs = dict(extra, eps=repr(eps))
    if axis == 1:
        return [{"op": "InstanceNorm", "name": name, "attrs": norm_attrs,
                 "inputs": [("in", 0), ("in", 1), ("in", 2)]}]
    # SwapAxis accepts negative dims (it normalizes them by the input's rank
    # at run time), so no rank is needed here.
    swap = dict(extra, dim1="1", dim2=str(axis))
    return [
        {"op": "SwapAxis", "name": name + "_to_channel1", "attrs": dict(swap),
         "inputs": [("in", 0)]},
        {"op": "InstanceNorm", "name": name + "_native", "attrs": norm_attrs,
         "inputs": [("new", 0), ("in", 1), ("in", 2)]},
        {"op": "SwapAxis", "name": name, "attrs": dict(swap), "inputs": [("new", 1)]},
    ]


def to_native(symbol, shapes=None, dtypes=None):
    """A copy of ``symbol`` with every mx_instnorm node replaced by MXNet's
    built-in ``InstanceNorm`` (with ``SwapAxis`` around it for a channel axis
    other than 1), so that it runs where ``mx_instnorm`` is not installed.

    Parameters
    ----------
    symbol : Symbol
        A graph containing ``Custom`` nodes with ``op_type`` :data:`OP_TYPE`
        or nodes of the compiled operator;
        other nodes, argument and auxiliary names are kept as they are.
    shapes : dict of str to tuple, optional
        Input shapes for ``infer_shape_partial``. When given, each node's
        rank is checked and a negative axis is written as a non-negative one.
        Without it a negative axis is kept (``SwapAxis`` resolves it at run
        time).
    dtypes : dict of str to dtype, optional
        Input dtypes for ``infer_type_partial``; variables' own ``__dtype__``
        attributes are used as well.

    Returns
    -------
    Symbol
        With the same arguments, auxiliary states and output names.

    Raises
    ------
    TypeError
        If a node of ours computes in float16 or float64 (the built-in
        computes float32 only); the message names the node.
    ValueError
        If the shapes given make a node's axis or rank invalid, or
        inference fails.

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> s = mx_instnorm.sym.InstanceNorm(mx.sym.var('x'), axis=-1, name='in1')
    >>> native = mx_instnorm.to_native(s)
    >>> ops = [n['op'] for n in __import__('json').loads(native.tojson())['nodes']]
    >>> 'Custom' in ops, ops.count('InstanceNorm'), ops.count('SwapAxis')
    (False, 1, 2)
    >>> native.list_arguments() == s.list_arguments()
    True
    """
    if not isinstance(symbol, mx.sym.Symbol):
        raise TypeError("to_native expects an mxnet Symbol, got %s"
                        % type(symbol).__name__)
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    ours = [i for i, node in enumerate(nodes) if _is_ours(node)]
    if not ours:
        return mx.sym.load_json(symbol.tojson())
    inferred = _infer(symbol, ours, nodes, shapes, dtypes)

    new_nodes, index_of = [], {}

    def remap(entry):
        return [index_of[entry[0]]] + list(entry[1:])

    for i, node in enumerate(nodes):
        if i not in inferred:
            node = dict(node, inputs=[remap(e) for e in node.get("inputs", [])])
            index_of[i] = len(new_nodes)
            new_nodes.append(node)
            continue
        rank, dtype = inferred[i]
        inputs = [remap(e) for e in node["inputs"]]
        first = len(new_nodes)
        for spec in _native_nodes(node, rank, dtype):
            spec["inputs"] = [inputs[k] if kind == "in" else [first + k, 0, 0]
                              for kind, k in spec["inputs"]]
            new_nodes.append(spec)
        # Only output 0 of our node is visible, and the replacement's last
        # node provides it.
        index_of[i] = len(new_nodes) - 1

    native_graph = {
        "nodes": new_nodes,
        "arg_nodes": [i for i, n in enumerate(new_nodes) if n["op"] == "null"],
        "heads": [remap(e) for e in graph["heads"]],
        "attrs": graph.get("attrs", {}),
    }
    native = mx.sym.load_json(json.dumps(native_graph))
    # The rewrite must not change the interface: a broken promise here would
    # surface much later as a parameter that silently fails to load.
    for what in ("list_arguments", "list_auxiliary_states", "list_outputs"):
        if getattr(native, what)() != getattr(symbol, what)():
            raise RuntimeError("to_native changed %s: %s -> %s (a bug in mx_instnorm)"
                               % (what, getattr(symbol, what)(), getattr(native, what)()))
    return native


def _input_dtypes(block, dtypes):
    """``dtypes`` as {input name: np.dtype} for the block's graph inputs.

    A dict is keyed by input name (``data`` for a single input, ``data0``,
    ``data1``, ... otherwise, as ``HybridBlock.export`` names them); a list
    or tuple gives them in the order of the block's inputs, None entries
    left unknown.
    """
    names = [s.name for s in block._cached_graph[0]]
    if dtypes is None:
        return {}
    if isinstance(dtypes, dict):
        unknown = sorted(set(dtypes) - set(names))
        if unknown:
            raise ValueError("dtypes names %s, which %s not among the block's inputs "
                             "%s" % (", ".join(map(repr, unknown)),
                                     "is" if len(unknown) == 1 else "are", names))
        items = dtypes.items()
    elif isinstance(dtypes, (list, tuple)):
        if len(dtypes) != len(names):
            raise ValueError("dtypes has %d entries, but the block has %d inputs %s"
                             % (len(dtypes), len(names), names))
        items = [(n, d) for n, d in zip(names, dtypes) if d is not None]
    else:
        raise TypeError("dtypes must be a dict of input name to dtype or a list in "
                        "input order, got %s" % type(dtypes).__name__)
    result = {}
    for name, dtype in items:
        # An array (the input itself, as passed to the block) stands for its dtype.
        # (Not a scalar type: np.float32.dtype is a descriptor, not a dtype.)
        if not isinstance(dtype, type):
            dtype = getattr(dtype, "dtype", dtype)
        try:
            result[name] = np.dtype(dtype)
        except TypeError:
            raise TypeError("dtypes[%r] is not a dtype: %r" % (name, dtype)) from None
    return result


def export_native(block, path, epoch=0, remove_amp_cast=True, dtypes=None):
    """``block.export(path, epoch)`` with the graph rewritten by
    :func:`to_native`: the files load and run without ``mx_instnorm``.

    Writes ``path-symbol.json`` and ``path-%04d.params`` (parameters saved
    as ``arg:<name>``/``aux:<name>``, exactly as ``HybridBlock.export``
    saves them), loadable with ``gluon.SymbolBlock.imports`` or
    ``mx.mod.Module``.

    Parameters
    ----------
    block : HybridBlock
        Hybridized and run forward at least once (as ``export`` requires).
    path : str
        Prefix of the two files.
    epoch : int, default 0
    remove_amp_cast : bool, default True
        Passed to ``Symbol.save``, as ``export`` does.
    dtypes : dict or list, optional
        The dtypes of the block's inputs, for graphs whose type inference
        needs them (a ``take`` or ``one_hot`` whose index is an input): a
        dict keyed by input name (``data`` for one input, ``data0``,
        ``data1``, ... otherwise, the names ``export`` writes), or a list in
        input order (None for unknown). An NDArray or NumPy array stands for
        its dtype, so the inputs of a call can be passed as they are
        (``dtypes=[x, index]``). Parameters' dtypes are always taken
        from the block. MXNet's CachedOp keeps no record of the dtypes of
        the last call, so they cannot be read back from the block.

    Returns
    -------
    (str, str)
        The symbol file and the parameter file written.

    Raises
    ------
    TypeError
        If ``block`` is not a HybridBlock, or a node of ours computes in a
        dtype other than float32 (named in the message). Nothing is written.
    RuntimeError
        If the block was not hybridized and run. Nothing is written.
    ValueError
        If ``dtypes`` names inputs the block does not have, or the graph's
        dtypes cannot be inferred (the message lists the inputs without a
        dtype). Nothing is written.

    Examples
    --------
    >>> import os, tempfile, mxnet as mx, mx_instnorm
    >>> net = mx_instnorm.gluon.InstanceNorm(axis=-1, in_channels=4)
    >>> net.initialize(); net.hybridize()
    >>> y = net(mx.nd.random.uniform(shape=(2, 3, 4)))
    >>> prefix = os.path.join(tempfile.mkdtemp(), 'model')
    >>> sym_file, params_file = mx_instnorm.export_native(net, prefix)
    >>> loaded = mx.gluon.SymbolBlock.imports(sym_file, ['data'], params_file)
    >>> x = mx.nd.random.uniform(shape=(2, 3, 4))
    >>> bool(abs(loaded(x) - net(x)).max() < 1e-5)
    True
    """
    if not isinstance(block, mx.gluon.HybridBlock):
        raise TypeError("export_native expects a HybridBlock, got %s"
                        % type(block).__name__)
    if not block._cached_graph:
        raise RuntimeError("export_native needs the graph of %s: call "
                           "block.hybridize() and run it forward once first "
                           "(as HybridBlock.export does)" % block.name)
    symbol = block._cached_graph[1]
    arguments = set(symbol.list_arguments()) | set(symbol.list_auxiliary_states())
    known = {p.name: np.dtype(p.dtype) for p in block.collect_params().values()
             if p.name in arguments}
    known.update(_input_dtypes(block, dtypes))
    # Rewrite first, so that a refusal leaves no half-written files behind.
    native = to_native(symbol, dtypes=known)
    # MXNet's own export writes the parameters (names, arg:/aux: split); the
    # rewritten graph then replaces the symbol file it wrote.
    block.export(path, epoch, remove_amp_cast=remove_amp_cast)
    sym_file = "%s-symbol.json" % path
    native.save(sym_file, remove_amp_cast=remove_amp_cast)
    return sym_file, "%s-%04d.params" % (path, epoch)
