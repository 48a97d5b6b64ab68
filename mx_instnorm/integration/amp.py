"""mx_instnorm in MXNet's automatic mixed precision (AMP) lists.

``mxnet.contrib.amp`` decides casts from per-dtype lists of operator names
(``mxnet.contrib.amp.lists.symbol_fp16`` and ``symbol_bf16``):

- ``FP16_FUNCS`` / ``BF16_FUNCS``: inputs cast to the low-precision dtype;
- ``FP32_FUNCS``: inputs cast to float32 (MXNet's own ``InstanceNorm`` is
  there: it computes float32 only);
- ``FP16_FP32_FUNCS`` / ``BF16_FP32_FUNCS``: dtype-neutral, run in whatever
  dtype arrives, no cast;
- ``WIDEST_TYPE_CASTS``, ``CONDITIONAL_FP32_FUNCS``.

``amp.init`` wraps the nd/sym functions of the first three kinds;
``convert_symbol`` (hence ``convert_model`` and ``convert_hybrid_block``)
passes them to MXNet's graph pass, which inserts ``amp_cast`` nodes and
leaves every other operator as it is; both refuse an operator named in
their arguments (``fp32_ops=...``) unless it is in one of the lists.

The compiled operator ``mx_instnorm_InstanceNorm`` takes float16 and
bfloat16 data with float32 ``gamma``/``beta`` and accumulates in float32,
so it belongs with the dtype-neutral operators: no cast before or after it,
and its parameters stay float32 (its type inference gives half-precision
data float32 parameters unless they are given otherwise). :func:`register`
adds it there, once, at ``import mx_instnorm``; a user who put it in
another list first keeps that choice.

The Python backend's node is ``Custom``, which MXNet lists in
``FP32_FUNCS`` for every CustomOp: AMP casts its inputs to float32 and the
CustomOp computes in float32. That entry is shared with every other
CustomOp, so it is left alone.
"""
from ..operator.compiled import OP_NAME

__all__ = ["register", "NEUTRAL_LISTS"]

# (list module, name of its dtype-neutral list, the other lists an operator
# may already be in), for float16 and bfloat16.
NEUTRAL_LISTS = (
    ("symbol_fp16", "FP16_FP32_FUNCS", ("FP16_FUNCS", "FP32_FUNCS", "WIDEST_TYPE_CASTS")),
    ("symbol_bf16", "BF16_FP32_FUNCS", ("BF16_FUNCS", "FP32_FUNCS", "WIDEST_TYPE_CASTS")),
)


def register():
    """Lists ``mx_instnorm_InstanceNorm`` among the dtype-neutral operators
    of MXNet's float16 and bfloat16 AMP lists; returns the lists changed.

    Idempotent. An MXNet without AMP lists (or without bfloat16 ones) is
    skipped.

    >>> import mx_instnorm
    >>> from mxnet.contrib import amp
    >>> "mx_instnorm_InstanceNorm" in amp.list_lp16_fp32_ops("float16")
    True
    >>> register()
    []
    """
    try:
        from mxnet.contrib.amp import lists
    except ImportError:
        return []
    changed = []
    for module_name, neutral, others in NEUTRAL_LISTS:
        module = getattr(lists, module_name, None)
        names = getattr(module, neutral, None)
        if not isinstance(names, list) or OP_NAME in names:
            continue
        if any(OP_NAME in getattr(module, other, ()) for other in others):
            continue
        names.append(OP_NAME)
        changed.append("%s.%s" % (module_name, neutral))
    return changed
