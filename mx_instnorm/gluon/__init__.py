"""The Gluon layer: :class:`InstanceNorm`, built on :mod:`mx_instnorm.operator`."""
from .instance_norm import InstanceNorm
from .swap import Swapped, swap_instance_norm

__all__ = ["InstanceNorm", "swap_instance_norm", "Swapped"]
