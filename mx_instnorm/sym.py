"""``mx_instnorm.sym``: the Symbol function, like ``mx.sym.InstanceNorm``."""
from .operator.functions import sym_instance_norm as InstanceNorm

__all__ = ["InstanceNorm"]
