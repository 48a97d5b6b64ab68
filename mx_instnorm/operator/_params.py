"""Parsing and validation shared by the CustomOp, the nd/sym functions and
the Gluon block. No MXNet import: messages and rules live in one place.

CustomOpProp receives every keyword as a string (``"0.001"``, ``"-1"``), so
each one is parsed strictly here; ``bool("False")`` style mistakes are what
this module exists to prevent.
"""
import math
import numbers

import numpy as np

__all__ = ["parse_eps", "parse_axis", "normalize_axis", "check_data_shape",
           "check_param_shape", "check_dtypes", "dtype_name", "BFLOAT16",
           "SUPPORTED_DATA_DTYPES"]

# MXNet 1.9's bfloat16 (mxnet.ndarray.bfloat16, dtype code 12): a NumPy
# structured dtype over uint16, since NumPy has no bfloat16 of its own.
BFLOAT16 = np.dtype([("bfloat16", np.uint16)])

SUPPORTED_DATA_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                         BFLOAT16)
_HALF_DTYPES = (np.dtype(np.float16), BFLOAT16)


def dtype_name(dtype):
    """``'bfloat16'`` for MXNet's bfloat16, else NumPy's name.

    >>> dtype_name(BFLOAT16), dtype_name(np.float16)
    ('bfloat16', 'float16')
    """
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == BFLOAT16 else str(dtype)


def parse_eps(value, name="eps"):
    """``eps`` as a float: a finite number >= 0, given as a number or a
    string holding one. ``name`` is the argument's name in messages (the
    Gluon block calls it ``epsilon``).

    >>> parse_eps("0.001"), parse_eps(1e-5)
    (0.001, 1e-05)
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("%s must be a number, got %r" % (name, value))
    if isinstance(value, str):
        try:
            eps = float(value.strip())
        except ValueError:
            raise TypeError("%s must be a number, got %r" % (name, value)) from None
    elif isinstance(value, numbers.Real):
        eps = float(value)
    else:
        raise TypeError("%s must be a number, got %r" % (name, value))
    if math.isnan(eps) or math.isinf(eps) or eps < 0:
        raise ValueError("%s must be a finite number >= 0, got %r" % (name, value))
    return eps


def parse_axis(value):
    """``axis`` as an int, given as an int or a string holding one.

    >>> parse_axis("-1"), parse_axis(3)
    (-1, 3)
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("axis must be an integer, got %r" % (value,))
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise TypeError("axis must be an integer, got %r" % (value,)) from None
    if isinstance(value, numbers.Integral):
        return int(value)
    raise TypeError("axis must be an integer, got %r" % (value,))


def normalize_axis(axis, ndim):
    """The channel axis as a non-negative index; it may not be the batch axis.

    >>> normalize_axis(-1, 4)
    3
    """
    ax = axis + ndim if axis < 0 else axis
    if not 0 <= ax < ndim:
        raise ValueError("axis %d is out of range for data of rank %d "
                         "(valid: %d..%d, not 0)" % (axis, ndim, -ndim + 1, ndim - 1))
    if ax == 0:
        raise ValueError("axis %d is the batch axis; InstanceNorm normalizes "
                         "each batch item separately, pick a channel axis "
                         "in 1..%d" % (axis, ndim - 1))
    return ax


def check_data_shape(shape, axis):
    """Validates ``shape`` against ``axis``; returns the channel count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise ValueError("InstanceNorm needs data of rank >= 3 "
                         "(batch, channel, spatial...), got rank %d, shape %s"
                         % (len(shape), shape))
    return shape[normalize_axis(axis, len(shape))]


def check_param_shape(name, shape, channels):
    """gamma/beta must be vectors of length C."""
    shape = tuple(int(s) for s in shape)
    if shape != (channels,):
        raise ValueError("%s must have shape (%d,) to match the %d channels of "
                         "data, got shape %s" % (name, channels, channels, shape))


def check_dtypes(data, gamma, beta):
    """Data float16/bfloat16/float32/float64; gamma and beta the data's
    dtype, or both float32 with float16 or bfloat16 data (mixed precision,
    as BatchNorm allows; what AMP keeps its parameters in).

    Arguments are anything ``np.dtype`` accepts; returns the parameter dtype.
    """
    data = np.dtype(data)
    if data not in SUPPORTED_DATA_DTYPES:
        raise TypeError("InstanceNorm data must be float16, bfloat16, float32 or float64, "
                        "got %s" % dtype_name(data))
    gamma, beta = np.dtype(gamma), np.dtype(beta)
    if gamma != beta:
        raise TypeError("gamma and beta must have the same dtype, got gamma %s "
                        "and beta %s" % (dtype_name(gamma), dtype_name(beta)))
    allowed = (data, np.dtype(np.float32)) if data in _HALF_DTYPES else (data,)
    if gamma not in allowed:
        raise TypeError("gamma/beta dtype %s does not match data dtype %s "
                        "(allowed: %s)" % (dtype_name(gamma), dtype_name(data),
                                           ", ".join(dtype_name(a) for a in allowed)))
    return gamma
