"""Swapping ``mxnet.gluon.nn.InstanceNorm`` and mx_instnorm's block in place.

A pretrained network (GluonCV's style transfer, CycleGAN generators...)
builds its layers with ``nn.InstanceNorm``; :func:`swap_instance_norm`
replaces them all in one call, keeping each layer's ``Parameter`` objects,
so weights, names, trainers holding those parameters and checkpoints are
unaffected. A ``SymbolBlock`` (a model loaded with
``SymbolBlock.imports``) has no layers, only a graph: its graph is rewritten
in place by :func:`mx_instnorm.from_native` (or
:func:`mx_instnorm.to_native` to go back), keeping its Parameters.
"""
import json
import warnings
from collections import namedtuple

import numpy as np
from mxnet.gluon import Block, HybridBlock, SymbolBlock, nn

from ..graphs.adopt import convert_native
from ..graphs.native import to_native
from ..graphs.rewrite import GraphView, load_graph
from ..graphs.backends import match_compiled, match_custom
from .instance_norm import InstanceNorm

__all__ = ["swap_instance_norm", "Swapped"]

#: One replacement: the dotted path of ``_children`` keys from the block
#: given (``"features.1"``), the block taken out and the block put in; for a
#: SymbolBlock converted in place, its graph (Symbol) before and after.
Swapped = namedtuple("Swapped", ["path", "old", "new"])

_TARGETS = {"ours": (nn.InstanceNorm, InstanceNorm),
            "builtin": (InstanceNorm, nn.InstanceNorm)}

# HybridBlock state that says whether and how a block is hybridized.
_HYBRID_STATE = ("_active", "_flags", "_backend", "_backend_opts")


def _replacement(old, target):
    """A ``target`` block with ``old``'s settings, prefix and Parameters."""
    settings = old._kwargs
    if target is _TARGETS["builtin"][1]:
        for param in (old.gamma, old.beta):
            if param.dtype is not None and np.dtype(param.dtype) != np.float32:
                raise TypeError("cannot swap %s to the builtin InstanceNorm: its "
                                "parameter %s is %s, and the builtin computes "
                                "float32 only" % (old.name, param.name,
                                                  np.dtype(param.dtype)))
    new = target(axis=settings["axis"], epsilon=settings["eps"],
                 center=settings["center"], scale=settings["scale"],
                 beta_initializer=old.beta.init, gamma_initializer=old.gamma.init,
                 in_channels=old.gamma.shape[0] if old.gamma.shape else 0,
                 prefix=old.prefix)
    # Adopt old's ParameterDict and Parameter objects themselves (not copies
    # and not `params=` sharing, whose consistency check rejects a grad_req
    # the user changed after construction); Block.__setattr__ refuses to
    # re-register a Parameter, hence object.__setattr__.
    new._params = old._params
    new._prefix, new._name = old._prefix, old._name
    for attr in ("gamma", "beta"):
        param = getattr(old, attr)
        new._reg_params[attr] = param
        object.__setattr__(new, attr, param)
    for attr in _HYBRID_STATE:
        if hasattr(old, attr):  # MXNet 1.6's HybridBlock has no _backend*
            setattr(new, attr, getattr(old, attr))
    # The same hook dicts, so existing HookHandles still detach them.
    new._forward_hooks = old._forward_hooks
    new._forward_pre_hooks = old._forward_pre_hooks
    return new


def _replace_references(parent, old, new):
    """Points ``parent``'s attributes (and lists held in them) at ``new``."""
    for name, value in list(vars(parent).items()):
        if value is old:
            # Block.__setattr__ refuses a change of type for a Block attribute.
            object.__setattr__(parent, name, new)
        elif isinstance(value, list):
            value[:] = [new if item is old else item for item in value]


def _has_ours(symbol):
    view = GraphView(json.loads(symbol.tojson()))
    return any(match_compiled(view, k) or match_custom(view, k)
               for k in range(len(view.nodes)))


def _convert_symbol_block(block, to):
    """Rewrites a SymbolBlock's graph in place; returns ``(old, new)``
    Symbols, or None when it holds nothing to convert."""
    inputs, old = block._cached_graph
    if to == "ours":
        graph, done = convert_native(json.loads(old.tojson()))
        if not done:
            return None
        new = load_graph(graph)
    else:
        if not _has_ours(old):
            return None
        new = to_native(old)
    block._cached_graph = inputs, new
    block._clear_cached_op()
    return old, new


def swap_instance_norm(block, to="ours"):
    """Replaces, inside ``block``, every InstanceNorm of one implementation by
    the other, keeping settings and Parameter objects.

    With ``to='ours'`` each :class:`mxnet.gluon.nn.InstanceNorm` becomes a
    :class:`mx_instnorm.gluon.InstanceNorm`; ``to='builtin'`` goes back. The
    new block gets the old one's ``axis``, ``epsilon``, ``center``,
    ``scale``, initializers and channel count, its prefix (so parameter
    names, hence checkpoints, are unchanged), its very ``gamma``/``beta``
    Parameters (initialized values and gradients kept; a Trainer built on
    ``collect_params()`` keeps working), its hybridization state and hooks.
    It takes the old one's place in its parent's children, keeping their
    order, and in every attribute of the parent that referred to it. A
    block reused in several places is replaced by one new block everywhere.
    Each ancestor's cached graph is cleared, so a hybridized network rebuilds
    its graph with the new layer on its next call.

    Only exact instances are swapped: subclasses may change behaviour that a
    swap would lose, so they are left alone.

    A ``SymbolBlock`` (``block`` itself or any block inside it) has its
    graph rewritten in place: ``to='ours'`` with
    :func:`mx_instnorm.from_native`, ``to='builtin'`` with
    :func:`mx_instnorm.to_native`. Argument names are kept, so its
    Parameters (loaded values, ``grad_req``) stay as they are.

    When nothing is replaced a ``UserWarning`` says what was searched.

    Parameters
    ----------
    block : Block
        The network to edit in place (searched recursively). It cannot
        itself be an InstanceNorm to replace: construct the other class
        directly instead.
    to : {'ours', 'builtin'}, default 'ours'

    Returns
    -------
    list of Swapped
        ``(path, old, new)`` for each replaced block, in traversal order;
        ``path`` joins the ``_children`` keys from ``block`` with dots
        (``''`` for ``block`` itself). For a SymbolBlock ``old`` and ``new``
        are its graph (Symbol) before and after.

    Raises
    ------
    ValueError
        If ``to`` is not 'ours' or 'builtin', or ``block`` itself is one of
        the blocks to replace, or a SymbolBlock's graph cannot be converted
        faithfully (see :func:`mx_instnorm.from_native`).
    TypeError
        If ``block`` is not a Gluon Block, or (``to='builtin'``) a layer's
        parameters are not float32, which the builtin cannot compute.

    Examples
    --------
    >>> import mxnet as mx
    >>> from mxnet.gluon import nn
    >>> from mx_instnorm.gluon import swap_instance_norm
    >>> net = nn.HybridSequential(prefix='net_')
    >>> with net.name_scope():
    ...     net.add(nn.Conv2D(4, 3, in_channels=2), nn.InstanceNorm(in_channels=4))
    >>> net.initialize()
    >>> x = mx.nd.random.uniform(shape=(1, 2, 5, 5))
    >>> before = net(x)
    >>> [(s.path, type(s.new).__module__) for s in swap_instance_norm(net)]
    [('1', 'mx_instnorm.gluon.instance_norm')]
    >>> bool(abs(net(x) - before).max() < 1e-5)
    True
    >>> sorted(net.collect_params())
    ['net_conv0_bias', 'net_conv0_weight', 'net_instancenorm0_beta', 'net_instancenorm0_gamma']
    """
    if not isinstance(to, str) or to not in _TARGETS:
        raise ValueError("to must be 'ours' or 'builtin', got %r" % (to,))
    if not isinstance(block, Block):
        raise TypeError("swap_instance_norm expects a gluon Block, got %s"
                        % type(block).__name__)
    source, target = _TARGETS[to]
    if type(block) is source:
        raise ValueError("%s is itself the InstanceNorm to replace; swap_instance_norm "
                         "edits its children: construct %s.%s directly instead"
                         % (block.name, target.__module__, target.__name__))

    replaced = {}   # id(old) -> Swapped, so a shared block maps to one new block
    visited = {}    # id(block) -> block, every block of the tree once

    symbols = []    # Swapped entries of SymbolBlocks converted in place

    def walk(parent, path):
        visited[id(parent)] = parent
        if isinstance(parent, SymbolBlock):
            converted = _convert_symbol_block(parent, to)
            if converted is not None:
                symbols.append(Swapped(path, *converted))
        for key, child in list(parent._children.items()):
            child_path = path + "." + key if path else key
            if type(child) is source:
                if id(child) not in replaced:
                    replaced[id(child)] = Swapped(child_path, child,
                                                  _replacement(child, target))
                new = replaced[id(child)].new
                # Assigning to an existing key keeps the OrderedDict's order.
                parent._children[key] = new
                _replace_references(parent, child, new)
            elif id(child) not in visited:
                walk(child, child_path)

    walk(block, "")
    if not replaced and not symbols:
        warnings.warn(
            "swap_instance_norm(%s, to=%r) found nothing to replace: no block of class "
            "%s.%s (exact class; subclasses are left alone) among its %d blocks, and "
            "no SymbolBlock whose graph has %s"
            % (block.name, to, source.__module__, source.__name__, len(visited),
               "a built-in InstanceNorm node" if to == "ours" else "a node of ours"),
            UserWarning, stacklevel=2)
    if replaced or symbols:
        # Any cached graph above a swapped layer still holds the old one
        # (a block may hang under several parents): drop them all; each
        # hybridized block rebuilds its graph on its next call.
        for blk in visited.values():
            if isinstance(blk, HybridBlock):
                blk._clear_cached_op()
    return list(replaced.values()) + symbols
