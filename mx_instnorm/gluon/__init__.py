"""The Gluon layer: :class:`InstanceNorm`, built on :mod:`mx_instnorm.operator`."""
from .instance_norm import InstanceNorm

__all__ = ["InstanceNorm"]
