"""ONNX export of mx_instnorm's op through MXNet's own exporter (mx2onnx).

``mx.onnx.export_model`` converts a graph node by node, looking each node's
``op`` up in ``MXNetGraph.registry_`` (per opset version, falling back to
lower versions). Every CustomOp has ``op == "Custom"``, so :func:`register`
installs one converter for ``Custom`` that handles nodes whose ``op_type``
is :data:`OP_TYPE` and hands any other ``op_type`` to the converter that was
registered before it (or fails as MXNet does for an op it cannot convert).

The compiled operator's node (:data:`COMPILED_NAME`, its own ``op``) gets
the same converter. Our node becomes ONNX ``InstanceNormalization`` (opset 6+, channels on axis
1), with a ``Transpose`` swapping the channel axis with axis 1 on each side
for any other axis. ``Transpose`` needs the rank; mx2onnx gives a converter
no shapes, so the rank is inferred from the part of the MXNet graph that
feeds our node, with the graph inputs' shapes the exporter was given.

The package guards our op's data input with ``reshape(shape=(-2,))``, an
identity that MXNet's own ``Reshape`` converter rejects (it knows no -2), so
:func:`register` also wraps that converter: such a reshape becomes ONNX
``Identity``, any other goes to MXNet's converter unchanged.

This module imports neither ``onnx`` nor ``mxnet.onnx`` at import time;
:func:`register` does, and is a no-op when mx2onnx cannot convert anything
(MXNet's registry stays empty without ``onnx``).
"""
import json

import mxnet as mx
import numpy as np

from ..operator import normalize_axis, parse_axis, parse_eps
from ..operator.custom_op import OP_TYPE
from .backends import COMPILED_NAME

__all__ = ["register", "convert_instance_norm"]

_OPSET = 12  # the lowest opset MXNet 1.9.1's exporter registers converters for


def _input_names(node, kwargs):
    lookup = kwargs["outputs_lookup"]
    return [lookup[src][out].name for src, out, *_ in node["inputs"]]


def _input_dtypes(node, kwargs):
    lookup = kwargs["outputs_lookup"]
    return [np.dtype(lookup[src][out].dtype) for src, out, *_ in node["inputs"]]


def _data_rank(node, kwargs):
    """Rank of the node's data input, by shape inference on the MXNet graph
    that produces it (fed with the export's input and weight shapes)."""
    from onnx import ValueInfoProto

    src, out = node["inputs"][0][:2]
    nodes = kwargs["mx_graph"][:src + 1]   # topological order: all it needs
    graph = {"nodes": nodes,
             "arg_nodes": [i for i, n in enumerate(nodes) if n["op"] == "null"],
             "heads": [[src, out, 0]],
             "attrs": {"mxnet_version": ["int", 10901]}}
    shapes = {name: tuple(weight.shape) for name, weight in kwargs["weights"].items()}
    for proto in kwargs.get("proc_nodes", []):
        if isinstance(proto, ValueInfoProto):
            # An unknown (dynamic) dim is 0, "unknown" in MXNet's legacy
            # shape semantics; the rank is what matters here.
            shapes[proto.name] = tuple(d.dim_value if d.HasField("dim_value") else 0
                                       for d in proto.type.tensor_type.shape.dim)
    try:
        feeder = mx.sym.load_json(json.dumps(graph))
        known = {k: v for k, v in shapes.items() if k in feeder.list_arguments()}
        _, out_shapes, _ = feeder.infer_shape_partial(**known)
    except mx.MXNetError as err:
        raise ValueError("ONNX export of node %r (axis %s) needs the rank of its "
                         "data, and shape inference failed: %s"
                         % (node["name"], node["attrs"].get("axis"),
                            str(err).splitlines()[0])) from None
    if not out_shapes or not out_shapes[0]:
        raise ValueError("ONNX export of node %r (axis %s) needs the rank of its "
                         "data, which the input shapes given to export_model do "
                         "not determine" % (node["name"], node["attrs"].get("axis")))
    return len(out_shapes[0])


def convert_instance_norm(node, **kwargs):
    """mx2onnx converter for one of our ``Custom`` nodes.

    Parameters
    ----------
    node : dict
        The node's JSON: ``name``, ``attrs`` (``op_type``, ``eps``, ``axis``,
        all strings) and ``inputs`` (data, gamma, beta).
    **kwargs
        What mx2onnx passes every converter (``outputs_lookup``,
        ``mx_graph``, ``weights``, ``proc_nodes``, ``opset_version``...).

    Returns
    -------
    list of onnx.NodeProto
        The last one outputs the tensor named after the node, which is how
        mx2onnx finds a node's output.
    """
    from onnx.helper import make_node

    name = node["name"]
    attrs = node.get("attrs", {})
    eps = parse_eps(attrs.get("eps", "0.001"))
    axis = parse_axis(attrs.get("axis", "1"))
    data, gamma, beta = _input_names(node, kwargs)
    data_dtype, gamma_dtype, _ = _input_dtypes(node, kwargs)
    if gamma_dtype != data_dtype:
        # ONNX InstanceNormalization has one type T for input, scale and B.
        raise TypeError("ONNX export of node %r: data is %s but gamma/beta are %s; "
                        "ONNX InstanceNormalization needs one dtype for all three"
                        % (name, data_dtype, gamma_dtype))
    if axis == 1:
        return [make_node("InstanceNormalization", [data, gamma, beta], [name],
                          name=name, epsilon=eps)]
    rank = _data_rank(node, kwargs)
    try:
        channel = normalize_axis(axis, rank)
    except ValueError as err:
        raise ValueError("ONNX export of node %r: %s" % (name, err)) from None
    if channel == 1:
        return [make_node("InstanceNormalization", [data, gamma, beta], [name],
                          name=name, epsilon=eps)]
    # Swapping axes 1 and `channel` is its own inverse: one perm both ways.
    perm = list(range(rank))
    perm[1], perm[channel] = channel, 1
    return [
        make_node("Transpose", [data], [name + "_to_nc"], name=name + "_to_nc", perm=perm),
        make_node("InstanceNormalization", [name + "_to_nc", gamma, beta],
                  [name + "_norm"], name=name + "_norm", epsilon=eps),
        make_node("Transpose", [name + "_norm"], [name], name=name, perm=perm),
    ]


def _custom_converter(previous):
    """A ``Custom`` converter: ours for OP_TYPE, ``previous`` for the rest."""
    def convert_custom(node, **kwargs):
        op_type = node.get("attrs", {}).get("op_type")
        if op_type == OP_TYPE:
            return convert_instance_norm(node, **kwargs)
        if previous is not None:
            return previous(node, **kwargs)
        # What mx2onnx itself raises for an op it has no converter for.
        raise AttributeError("No conversion function registered for op type "
                             "Custom with op_type %r yet (mx_instnorm converts "
                             "only op_type %r)" % (op_type, OP_TYPE))
    convert_custom.mx_instnorm_previous = previous
    return convert_custom


def _compiled_converter(previous):
    """The compiled operator's node converts as the Custom one does (same
    inputs and attributes, one output)."""
    def convert_compiled(node, **kwargs):
        return convert_instance_norm(node, **kwargs)
    convert_compiled.mx_instnorm_previous = previous
    return convert_compiled


def _is_identity_reshape(attrs):
    """True for ``reshape(shape=(-2,))``: -2 copies all remaining dims."""
    text = str(attrs.get("shape", "")).strip("()[] ")
    try:
        dims = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        return False
    return bool(dims) and all(d == -2 for d in dims)


def _reshape_converter(previous):
    """A ``Reshape`` converter: ONNX ``Identity`` for ``shape=(-2,)``, which
    the package's input guard uses and MXNet's converter rejects (it knows
    no -2); ``previous`` (MXNet's own) for every other reshape."""
    def convert_reshape(node, **kwargs):
        if _is_identity_reshape(node.get("attrs", {})):
            from onnx.helper import make_node
            return [make_node("Identity", _input_names(node, kwargs)[:1], [node["name"]],
                              name=node["name"])]
        if previous is not None:
            return previous(node, **kwargs)
        raise AttributeError("No conversion function registered for op type Reshape yet.")
    convert_reshape.mx_instnorm_previous = previous
    return convert_reshape


def _install(graph_class, registry, op, make_converter):
    # Wrap every opset's existing converter for `op`, so ours wins whatever
    # opset the export picks; register at the lowest opset if there is none.
    versions = sorted(v for v, ops in registry.items() if op in ops) or [_OPSET]
    for version in versions:
        previous = registry.get(version, {}).get(op)
        if previous is not None and hasattr(previous, "mx_instnorm_previous"):
            continue  # ours already
        graph_class.register(op, opset_version=version)(make_converter(previous))


def register():
    """Registers the converters with mx2onnx (idempotent): ``Custom`` and
    the compiled operator (our two kinds of node), and ``Reshape`` (the identity reshape guarding our op's input).

    Returns True if mx2onnx now holds them: False when ``mxnet.onnx`` cannot
    be imported or its registry is inactive (``onnx`` not installed).
    """
    try:
        from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
    except ImportError:
        return False
    registry = getattr(MXNetGraph, "registry_", None)
    if not isinstance(registry, dict):
        return False
    _install(MXNetGraph, registry, "Custom", _custom_converter)
    _install(MXNetGraph, registry, "Reshape", _reshape_converter)
    _install(MXNetGraph, registry, COMPILED_NAME, _compiled_converter)
    return any("Custom" in ops for ops in registry.values())
