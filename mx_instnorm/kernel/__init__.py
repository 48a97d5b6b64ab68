"""The numerical kernel: instance normalization in pure NumPy (no MXNet).

See :mod:`mx_instnorm.kernel.instance_norm` for the maths, the backward
derivation and the layouts.
"""
from .instance_norm import (
    DEFAULT_BLOCK_BYTES,
    SUPPORTED_DTYPES,
    accumulation_dtype,
    canonical_shape,
    default_num_threads,
    instance_norm_backward,
    instance_norm_forward,
    instance_norm_stats,
)

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "SUPPORTED_DTYPES",
    "accumulation_dtype",
    "canonical_shape",
    "default_num_threads",
    "instance_norm_backward",
    "instance_norm_forward",
    "instance_norm_stats",
]
