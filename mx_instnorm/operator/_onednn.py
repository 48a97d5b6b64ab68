"""Guards against MXNet 1.9.1 freeing a CustomOp's oneDNN-converted input
while the op still reads it. docs/onednn.md has the cause and the evidence.

In short: when an input (``x``, or ``dy`` in backward) arrives in one of
oneDNN's blocked layouts, typically straight from a convolution, MXNet
hands the CustomOp a temporary plain-layout copy that it frees as soon as it
has *queued* the Python callback, so the op reads recycled memory. The cure
is to make sure no blocked array ever reaches our Custom node:

* imperatively, the data is converted to the plain layout in place before
  the op is invoked (free when it already is plain), and under autograd the
  output passes through a recorded reshape view whose backward hands ``dy``
  over in the plain layout;
* in a graph, a same-shape ``reshape`` sits before the data input (executed
  in place: free for plain data, a reorder for blocked data; for rank > 4,
  which oneDNN's reshape does not handle, or an unknown rank, a copying
  ``expand_dims``/``squeeze`` pair), and a full-range ``slice_axis`` after
  the output, the one op found whose backward writes a fresh plain-layout
  ``dy`` (it costs a copy each way; a CachedOp needs it, and a symbol cannot
  know whether a CachedOp or an executor will run it).

These guards belong to the Python backend: the compiled operator needs none
(see docs/onednn.md).
"""
import mxnet as mx

from ._ndview import plain_layout

__all__ = ["guard_input", "guard_output"]


def _named(name, suffix):
    return {} if name is None else {"name": name + suffix}


def guard_input(F, x, copy=False, name=None):
    """``x`` as the Custom node's data input, never in a blocked layout.

    In a graph, a same-shape ``reshape`` runs in place and reorders blocked
    data (free for plain data), but oneDNN's reshape handles ranks up to 4
    only; ``copy=True`` (rank above 4, or unknown) uses an ``expand_dims``/
    ``squeeze`` pair instead, which copies.
    """
    if F is mx.nd:
        plain_layout(x)
        return x
    if copy:
        return F.squeeze(F.expand_dims(x, axis=0, **_named(name, "_expand")), axis=0,
                         **_named(name, "_in"))
    return F.reshape(x, shape=(-2,), **_named(name, "_in"))


def guard_output(F, y, name=None):
    """``y`` as returned to the caller, so that ``dy`` reaches backward in
    the plain layout. In a graph the copy is always there: a graph run by a
    CachedOp needs it, and a symbol cannot know whether a CachedOp or an
    executor (which keeps MXNet's temporaries alive) will run it. The copy
    takes ``name`` so that the graph's output keeps the op's name."""
    if F is mx.nd:
        if mx.autograd.is_recording():
            return y.reshape(y.shape)
        return y
    return F.slice_axis(y, axis=0, begin=0, end=None, **_named(name, ""))
