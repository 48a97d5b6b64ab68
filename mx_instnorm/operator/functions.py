"""``InstanceNorm`` as nd and sym functions over the registered CustomOp.

Both validate what they can see before anything runs (eps, axis, and for
NDArrays shapes and dtypes), so bad input raises a clear ``ValueError`` or
``TypeError`` here rather than an opaque failure inside the CustomOp's
callbacks, and put the layout guards of :mod:`._onednn` around the op
(see docs/onednn.md).
"""
import mxnet as mx

from . import _params
from ._onednn import guard_input, guard_output
from .custom_op import OP_TYPE

__all__ = ["instance_norm", "nd_instance_norm", "sym_instance_norm"]


def instance_norm(F, data, gamma, beta, eps, axis, name=None, out=None,
                  copy_in_graph=False, copy_input=False):
    """The graph fragment, for ``F`` = ``mx.nd`` or ``mx.sym`` (no checks).

    ``copy_in_graph`` adds the output guard that a graph run by a CachedOp
    needs for correct gradients after a oneDNN convolution; ``copy_input``
    picks the copying input guard, needed in graphs over data of rank > 4
    or of unknown rank (see :mod:`mx_instnorm.operator._onednn`).
    """
    guarded = copy_in_graph and F is not mx.nd
    kwargs = {"op_type": OP_TYPE, "eps": repr(float(eps)), "axis": str(int(axis))}
    if name is not None:
        # The last node of the fragment carries ``name``, as the built-in's
        # single node does, so ``<name>_output`` names the result.
        kwargs["name"] = name + "_op" if guarded else name
    if out is not None:
        kwargs["out"] = out
    y = F.Custom(guard_input(F, data, copy_input, name), gamma, beta, **kwargs)
    return guard_output(F, y, copy_in_graph, name)


def _expect(kind, name, value):
    if not isinstance(value, kind):
        article = "an" if kind.__name__[0] in "AEIOUN" else "a"
        raise TypeError("%s must be %s %s, got %s"
                        % (name, article, kind.__name__, type(value).__name__))


def nd_instance_norm(data, gamma, beta, eps=1e-3, axis=1, out=None, name=None):
    r"""Instance normalization of an NDArray.

    .. math::

        y = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{Var}(x) + \epsilon}}
            \, \gamma + \beta

    with the mean and the biased variance taken, for each batch item and
    channel, over every axis except 0 and ``axis``.

    Parameters
    ----------
    data : NDArray
        float16, float32 or float64, rank >= 3, batch on axis 0.
    gamma, beta : NDArray, shape (C,)
        Same dtype as ``data`` (or float32 with float16 data).
    eps : float, default 1e-3
        Added to the variance, inside the square root; >= 0.
    axis : int, default 1
        The channel axis; negative counts from the end; not 0.
    out : NDArray, optional
        Where to write the result.
    name : str, optional

    Returns
    -------
    NDArray
        Same shape and dtype as ``data``.

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> x = mx.nd.array([[[1.1, 2.2]], [[3.3, 4.4]]])
    >>> y = mx_instnorm.nd.InstanceNorm(x, mx.nd.array([1.5]), mx.nd.array([0.5]))
    >>> print(y.asnumpy().round(5))
    [[[-0.99753  1.99753]]
    <BLANKLINE>
     [[-0.99753  1.99753]]]
    """
    eps = _params.parse_eps(eps)
    axis = _params.parse_axis(axis)
    for arg_name, value in (("data", data), ("gamma", gamma), ("beta", beta)):
        _expect(mx.nd.NDArray, arg_name, value)
    channels = _params.check_data_shape(data.shape, axis)
    _params.check_param_shape("gamma", gamma.shape, channels)
    _params.check_param_shape("beta", beta.shape, channels)
    _params.check_dtypes(data.dtype, gamma.dtype, beta.dtype)
    if out is not None:
        _expect(mx.nd.NDArray, "out", out)
        if out.shape != data.shape or out.dtype != data.dtype:
            raise ValueError("out must have the data's shape %s and dtype %s, got "
                             "%s %s" % (data.shape, data.dtype.__name__, out.shape,
                                        out.dtype.__name__))
    if 0 in data.shape and not mx.util.is_np_shape():
        # MXNet's legacy shape rules read a 0 as "unknown" and no operator
        # can run on such an array; the result of an empty batch is empty.
        return out if out is not None else mx.nd.empty(data.shape, dtype=data.dtype)
    return instance_norm(mx.nd, data, gamma, beta, eps, axis, name, out)


def sym_instance_norm(data=None, gamma=None, beta=None, eps=1e-3, axis=1, name=None):
    r"""Instance normalization as a Symbol; see :func:`nd_instance_norm`.

    As with ``mx.sym.InstanceNorm``, arguments left out become variables
    named ``<name>_data``, ``<name>_gamma`` and ``<name>_beta``.

    Examples
    --------
    >>> import mxnet as mx, mx_instnorm
    >>> s = mx_instnorm.sym.InstanceNorm(mx.sym.var('x'), name='in1')
    >>> s.list_arguments()
    ['x', 'in1_gamma', 'in1_beta']
    >>> s.infer_shape(x=(2, 3, 4))[0]
    [(2, 3, 4), (3,), (3,)]
    """
    eps = _params.parse_eps(eps)
    axis = _params.parse_axis(axis)
    name = mx.name.NameManager._current.value.get(name, "instancenorm")
    data = mx.sym.var(name + "_data") if data is None else data
    gamma = mx.sym.var(name + "_gamma") if gamma is None else gamma
    beta = mx.sym.var(name + "_beta") if beta is None else beta
    for arg_name, value in (("data", data), ("gamma", gamma), ("beta", beta)):
        _expect(mx.sym.Symbol, arg_name, value)
    # ``name`` already carries any Prefix in scope: build under a plain
    # NameManager so that it is not applied twice.
    with mx.name.NameManager():
        return instance_norm(mx.sym, data, gamma, beta, eps, axis, name)
