"""Install mx_instnorm (Python 3.10, 3.11 or 3.12).

MXNet 1.9.1 (the newest on PyPI) requires ``numpy<2`` and reads
``numpy.bool`` at import time, an alias NumPy 1.24 removed. NumPy < 1.24
ships wheels up to Python 3.11, so Python 3.10 and 3.11 get NumPy 1.23;
Python 3.12 gets NumPy 1.26 (its first release with cp312 wheels) and the
shim ``mx_instnorm_numpy_compat`` (a top-level module, started by a ``.pth``
file this script puts at the top of the wheel) restores the alias for MXNet
when MXNet is first imported. MXNet imports ``distutils``, which Python 3.12
no longer has: ``setuptools`` provides it. No NumPy < 2 has cp313 wheels:
Python 3.13 is refused here; docs/install.md has a manual recipe for it.
"""
import os
import sys

# Refuse an unsupported Python in one line, before anything else: pip < 25.1
# collects (and tries to build) the dependencies before it compares
# python_requires, and dies in a NumPy source build instead.
SUPPORTED_PYTHONS = ((3, 10), (3, 11), (3, 12))
# docs/install.md's Python 3.13 recipe sets this (and installs --no-deps).
ALLOW_ANY_PYTHON = os.environ.get("MX_INSTNORM_ALLOW_UNSUPPORTED_PYTHON") == "1"
if sys.version_info[:2] not in SUPPORTED_PYTHONS and not ALLOW_ANY_PYTHON:
    sys.exit("ERROR: mx_instnorm supports Python 3.10, 3.11 and 3.12 (MXNet 1.9.1 "
             "needs numpy<2), not Python %d.%d: see docs/install.md"
             % sys.version_info[:2])

from setuptools import find_packages, setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402

here = os.path.abspath(os.path.dirname(__file__))
version = {}
with open(os.path.join(here, "mx_instnorm", "_version.py")) as f:
    exec(f.read(), version)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

# The shim's start-up hook: one line that site.py runs at start-up in every
# interpreter of the environment (it only puts a finder on sys.meta_path).
NUMPY_COMPAT_PTH = ("mx_instnorm_numpy_compat.pth",
                    "import mx_instnorm_numpy_compat; mx_instnorm_numpy_compat.install()\n")


class BuildPyWithNumpyCompatPth(build_py):
    """``build_py`` that also writes the shim's ``.pth`` at the top of the
    build tree, so at the top of the wheel, so at the top of site-packages
    (a ``.pth`` anywhere else is never read)."""

    def run(self):
        super().run()
        self._write_pth(self.build_lib)
        if getattr(self, "editable_mode", False):
            # setuptools' editable wheel drops build_lib and packs what was
            # written to install_lib (its unpacked wheel) instead.
            install_lib = self.distribution.get_command_obj("install").install_lib
            if install_lib:
                self._write_pth(install_lib)

    def _write_pth(self, folder):
        name, text = NUMPY_COMPAT_PTH
        self.mkpath(folder)
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, NUMPY_COMPAT_PTH[0])]


setup(
    name="mx_instnorm",
    version=version["__version__"],
    description="A fast, precise, any-dtype InstanceNorm for Apache MXNet 1.x "
                "(CustomOp, nd/sym functions and a Gluon block)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mx_instnorm", "mx_instnorm.*"]),
    py_modules=["mx_instnorm_numpy_compat"],
    license="Apache-2.0",
    python_requires=">=3.10" if ALLOW_ANY_PYTHON else ">=3.10,<3.13",
    install_requires=[
        "mxnet>=1.6,<2",
        "numpy>=1.17,<1.24; python_version<'3.12'",
        "numpy>=1.26,<2; python_version=='3.12'",
        # Python 3.13 (docs/install.md's recipe, installed --no-deps): NumPy 2.
        "numpy>=2; python_version>='3.13'",
        # MXNet imports distutils, which Python 3.12 removed.
        "setuptools; python_version>='3.12'",
    ],
    extras_require={
        # The test suite also exercises the optional Numba loops and the ONNX
        # export (onnxruntime 1.31.1, the release verified here, ships
        # wheels for Python >= 3.11 only; on Python 3.10 those tests skip).
        "test": [
            "pytest>=7",
            "numba>=0.56,<0.61; python_version<'3.12'",
            "numba>=0.59,<0.61; python_version=='3.12'",
            "onnx==1.14.1; python_version=='3.11'",
            "onnx==1.18.0; python_version=='3.12'",
            "onnxruntime==1.31.1; python_version=='3.11' or python_version=='3.12'",
        ],
        # Optional fused loops for the CPU kernel (MX_INSTNORM_KERNEL); the
        # NumPy path is the default fallback. numba < 0.61 accepts numpy 1.23;
        # 0.59 is the first with Python 3.12 wheels, 0.61 with 3.13.
        "numba": [
            "numba>=0.56,<0.61; python_version<'3.12'",
            "numba>=0.59,<0.61; python_version=='3.12'",
            "numba>=0.61; python_version>='3.13'",
        ],
        # `python -m mx_instnorm.bench --plot FILE`
        "bench": ["matplotlib"],
        # ONNX export: MXNet 1.9.1's exporter needs onnx.mapping, which onnx
        # has up to 1.18.0; onnx 1.14.1 has no cp312 wheel, 1.18.0 is the only
        # release with onnx.mapping and cp313 wheels. Verified with
        # onnxruntime 1.31.1 (cp311 and newer).
        "onnx": [
            "onnx==1.14.1; python_version<'3.12'",
            "onnx==1.18.0; python_version>='3.12'",
            "onnxruntime==1.31.1; python_version>='3.11'",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    cmdclass={"build_py": BuildPyWithNumpyCompatPth},
)
