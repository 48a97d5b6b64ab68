"""The numerical kernels: instance normalization in pure NumPy (this
package's Python API, no MXNet) and in C++ (``instance_norm.cc``, built
into the compiled operator's library).

The maths, the backward derivation, the overflow strategy, the layouts and
the symbols every implementation uses (``K``, ``d``, ``mu``, ``mean``,
``var``, ``rstd``, ``xhat``, ``c1``, ``c2``, ``k``, ``b0``, ``b1``, the
``(N, A, C, B)`` view, the accumulation dtype ``acc``) are written once, in
the docstring of :mod:`mx_instnorm.kernel.instance_norm`.
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
