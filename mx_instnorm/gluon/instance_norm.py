"""``InstanceNorm`` as a Gluon HybridBlock over mx_instnorm's operator."""
import mxnet as mx
from mxnet.gluon import HybridBlock
from mxnet.gluon.parameter import DeferredInitializationError

from ..operator import (check_data_shape, check_dtypes, explain_errors, implementation,
                        instance_norm, normalize_axis, parse_axis, parse_eps)

__all__ = ["InstanceNorm"]


class InstanceNorm(HybridBlock):
    r"""Applies instance normalization to the n-dimensional input array.

    A drop-in for :class:`mxnet.gluon.nn.InstanceNorm`: same constructor,
    same parameter names and ``grad_req`` rules, same ``repr`` and prefix,
    so parameter files move between the two. It computes with
    mx_instnorm's operator (float16/32/64 and bfloat16 data with float32
    parameters, shifted two-pass statistics, any channel axis without
    transposes).

    .. math::

        \bar{C} = \{i \mid i \neq 0, i \neq axis\}

        out = \frac{x - mean[data, \bar{C}]}
                   {\sqrt{Var[data, \bar{C}] + \epsilon}} * gamma + beta

    The variance is biased (divides by the element count) and
    :math:`\epsilon` is inside the square root, as MXNet computes it.

    Parameters
    ----------
    axis : int, default 1
        The channel axis (``1`` for NCHW, ``3`` or ``-1`` for NHWC); it is
        excluded from the normalization along with the batch axis 0.
    epsilon : float, default 1e-5
        Added to the variance to avoid dividing by zero.
    center : bool, default True
        If True, ``beta`` is learned (``grad_req='write'``); if False it is
        kept at its initial value (``grad_req='null'``) but still added.
    scale : bool, default False
        If True, ``gamma`` is learned; if False it is kept at its initial
        value but still applied. (MXNet's own docstring says True; its code,
        and this block, default to False.)
    beta_initializer : str or Initializer, default 'zeros'
    gamma_initializer : str or Initializer, default 'ones'
    in_channels : int, default 0
        Number of channels; 0 defers the parameters' shape to the first
        forward pass.

    Inputs:
        - **data**: input tensor of rank >= 3.

    Outputs:
        - **out**: output tensor with the same shape and dtype as ``data``.

    Examples
    --------
    >>> import mxnet as mx
    >>> from mx_instnorm.gluon import InstanceNorm
    >>> x = mx.nd.array([[[1.1, 2.2]], [[3.3, 4.4]]])
    >>> layer = InstanceNorm()
    >>> layer.initialize(ctx=mx.cpu(0))
    >>> print(layer(x).asnumpy().round(5))
    [[[-0.99998  0.99998]]
    <BLANKLINE>
     [[-0.99998  0.99998]]]
    """

    def __init__(self, axis=1, epsilon=1e-5, center=True, scale=False,
                 beta_initializer='zeros', gamma_initializer='ones',
                 in_channels=0, **kwargs):
        super().__init__(**kwargs)
        axis = parse_axis(axis)
        if axis == 0:
            normalize_axis(axis, 3)  # raises: the batch axis
        parse_eps(epsilon, 'epsilon')
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) \
                or in_channels < 0:
            raise ValueError("in_channels must be an integer >= 0, got %r"
                             % (in_channels,))
        self._kwargs = {'eps': epsilon, 'axis': axis, 'center': center, 'scale': scale}
        self._axis = axis
        self._epsilon = epsilon
        self._layout = None  # (rank, empty, implementation) of the last data
        self._checked_dtypes = None  # (data, gamma, beta) dtypes last found good
        self.gamma = self.params.get('gamma', grad_req='write' if scale else 'null',
                                     shape=(in_channels,), init=gamma_initializer,
                                     allow_deferred_init=True)
        self.beta = self.params.get('beta', grad_req='write' if center else 'null',
                                    shape=(in_channels,), init=beta_initializer,
                                    allow_deferred_init=True)

    def forward(self, x, *args):
        if (self._active and not args and self._cached_op is not None
                and type(x) is mx.nd.NDArray and implementation() == "compiled"
                and self._layout is not None and self._layout[2] == "compiled"):
            # Repeated hybridized calls, compiled backend: the library
            # validates shapes and dtypes itself (tiny calls notice every
            # check in Python); refused, the input is checked below, for
            # the message the block gives.
            try:
                return self._call_compiled(x)
            except mx.MXNetError:
                pass
        # Checked here, before a graph is built, so that bad input gets a
        # clear message in hybridized mode too.
        if not isinstance(x, mx.nd.NDArray):
            # A hybridized parent builds its graph: nothing is known of the
            # data (an earlier imperative call's layout would be stale).
            self._layout = None
            return super().forward(x, *args)
        shape = x.shape
        channels = check_data_shape(shape, self._axis)
        # The graph depends on the implementation (compiled or the CustomOp;
        # a graph is built as for CPU), and on the CustomOp the layout guard
        # depends on the rank and on emptiness (oneDNN's in-place reshape
        # fails on empty arrays in backward).
        layout = (len(shape), 0 in shape, implementation())
        if self._layout != layout:
            self._layout = layout
            self._clear_cached_op()
        # Unknown channels read 0 under MXNet's legacy shape rules and -1
        # under mx.util.np_shape(True).
        known = self.gamma.shape[0] if self.gamma.shape else 0
        if known > 0 and known != channels:
            raise ValueError(
                "%s was built for %d channels but data of shape %s has %d "
                "on axis %d" % (self.name, known, shape, channels, self._axis))
        dtypes = (x.dtype, self.gamma.dtype, self.beta.dtype)
        if dtypes != self._checked_dtypes:
            try:
                check_dtypes(*dtypes)
            except TypeError as err:
                raise TypeError("%s: %s; cast the block (block.cast(dtype)) or the "
                                "data" % (self.name, err)) from None
            self._checked_dtypes = dtypes
        if layout[2] == "compiled":
            if self._active:
                return self._call_compiled(x)
            # The library's messages need no explaining (explain_errors is
            # for the CustomOp's).
            return super().forward(x, *args)
        with explain_errors():
            return super().forward(x, *args)

    def _call_compiled(self, x):
        """The hybridized block called on an NDArray, compiled backend.

        Its graph would be one operator, so a CachedOp would add nothing but
        its own costs: the views that keep ``grad_req='add'`` right in a
        graph, which must stay right under whatever requests it is later
        bound with, and a dispatch per node. So the call runs imperatively,
        where each input's request is known (see
        ``operator.functions._compiled``): same results and gradients, the
        memory and engine operations of one operator. The graph is still
        built, once per layout, for ``export()`` and the graph tools, with
        every view in it.
        """
        if self._cached_op is None:
            # The graph and the parameter list export() reads; the CachedOp
            # made with them is never run.
            self._build_cache(x)
        ctx = x.context
        try:
            gamma, beta = self.gamma.data(ctx), self.beta.data(ctx)
        except DeferredInitializationError:
            self._deferred_infer_shape(x)
            for v in self.params.values():
                v._finish_deferred_init()  # pylint: disable=protected-access
            gamma, beta = self.gamma.data(ctx), self.beta.data(ctx)
        return self.hybrid_forward(mx.nd, x, gamma, beta)

    def hybrid_forward(self, F, x, gamma, beta):
        # The data's rank is unknown when a hybridized parent builds the graph.
        rank, empty, _ = (None, False, None) if self._layout is None else self._layout
        return instance_norm(F, x, gamma, beta, self._epsilon, self._axis, name='fwd',
                             rank=rank, empty=empty)

    def __repr__(self):
        # "mx_instnorm." tells it from nn.InstanceNorm in print(net).
        s = 'mx_instnorm.{name}({content}'
        in_channels = self.gamma.shape[0]
        s += ', in_channels={0}'.format(in_channels)
        s += ')'
        return s.format(name=self.__class__.__name__,
                        content=', '.join(['='.join([k, v.__repr__()])
                                           for k, v in self._kwargs.items()]))
