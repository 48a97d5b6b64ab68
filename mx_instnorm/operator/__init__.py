"""The MXNet glue: the Python CustomOp and its registration, its generic
``mx.nd`` path, the compiled operator's lib_api registration
(``lib_instance_norm.cc``) and loader, the one choice between them
(:func:`implementation`), and the nd/sym functions built on it. Depends on
:mod:`mx_instnorm.kernel` only, never on Gluon, the graph layer or the
integration layer.

The names below are this layer's public surface for the layers above it
(the Gluon block, the graph conversions) and for users: argument parsing
and validation with the messages every entry point raises, and
:func:`explain_errors`.
"""
from ._errors import explain_errors
from ._params import (SUPPORTED_DATA_DTYPES, check_data_shape, check_dtypes,
                      check_param_shape, normalize_axis, parse_axis, parse_eps)
from .backend import implementation
from .custom_op import OP_TYPE, InstanceNormOp, InstanceNormProp, register
from .functions import exec_addto, instance_norm, nd_instance_norm, sym_instance_norm

__all__ = ["OP_TYPE", "explain_errors", "InstanceNormOp", "InstanceNormProp", "register",
           "implementation",
           "exec_addto", "instance_norm", "nd_instance_norm", "sym_instance_norm",
           "SUPPORTED_DATA_DTYPES", "check_data_shape", "check_dtypes", "check_param_shape",
           "normalize_axis", "parse_axis", "parse_eps"]
