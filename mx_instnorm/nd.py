"""``mx_instnorm.nd``: the NDArray function, like ``mx.nd.InstanceNorm``."""
from .operator.functions import nd_instance_norm as InstanceNorm

__all__ = ["InstanceNorm"]
