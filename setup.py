"""Install mx_instnorm.

MXNet 1.9.1 (the newest on PyPI) reads ``numpy.bool`` at import time, an
alias NumPy 1.24 removed, so NumPy is pinned below 1.24. NumPy 1.23 ships
wheels for Python 3.8-3.11 only, which bounds ``python_requires``.
"""
import os

from setuptools import find_packages, setup

here = os.path.abspath(os.path.dirname(__file__))
version = {}
with open(os.path.join(here, "mx_instnorm", "_version.py")) as f:
    exec(f.read(), version)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="mx_instnorm",
    version=version["__version__"],
    description="A fast, precise, any-dtype InstanceNorm for Apache MXNet 1.x "
                "(CustomOp, nd/sym functions and a Gluon block)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mx_instnorm", "mx_instnorm.*"]),
    license="Apache-2.0",
    python_requires=">=3.8,<3.12",
    install_requires=[
        "mxnet>=1.6,<2",
        "numpy>=1.17,<1.24",
    ],
    extras_require={
        # The test suite also exercises the optional Numba loops and the ONNX
        # export (onnxruntime 1.31.1, the release verified here, ships
        # wheels for Python >= 3.11 only; on older Pythons those tests skip).
        "test": [
            "pytest>=7",
            "numba>=0.56,<0.61",
            "onnx==1.14.1; python_version=='3.11'",
            "onnxruntime==1.31.1; python_version=='3.11'",
        ],
        # Optional fused loops for the CPU kernel (MX_INSTNORM_KERNEL); the
        # NumPy path is the default fallback. numba < 0.61 keeps numpy < 1.24.
        "numba": ["numba>=0.56,<0.61"],
        # `python -m mx_instnorm.bench --plot FILE`
        "bench": ["matplotlib"],
        # ONNX export: MXNet 1.9.1's exporter needs onnx.mapping (onnx < 1.15);
        # verified with onnxruntime 1.31.1 on Python 3.11.
        "onnx": ["onnx==1.14.1", "onnxruntime==1.31.1; python_version=='3.11'"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.8",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
