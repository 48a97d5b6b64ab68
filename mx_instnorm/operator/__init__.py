"""The MXNet glue: the CustomOp and its registration, and the nd/sym
functions built on it. Depends on :mod:`mx_instnorm.kernel`, never on Gluon.
"""
from .custom_op import OP_TYPE, InstanceNormOp, InstanceNormProp, register, selected_path
from .functions import instance_norm, nd_instance_norm, sym_instance_norm

__all__ = ["OP_TYPE", "InstanceNormOp", "InstanceNormProp", "register", "selected_path",
           "instance_norm", "nd_instance_norm", "sym_instance_norm"]
