"""The MXNet glue: the Python CustomOp and its registration, the compiled
operator's lib_api registration (``lib_instance_norm.cc``) and loader,
the one choice between them (:mod:`.backend`), and the nd/sym functions
built on it. Depends on :mod:`mx_instnorm.kernel`, never on Gluon.
"""
from ._errors import explain_errors
from .custom_op import OP_TYPE, InstanceNormOp, InstanceNormProp, register, selected_path
from .functions import instance_norm, nd_instance_norm, sym_instance_norm

__all__ = ["OP_TYPE", "explain_errors", "InstanceNormOp", "InstanceNormProp", "register", "selected_path",
           "instance_norm", "nd_instance_norm", "sym_instance_norm"]
