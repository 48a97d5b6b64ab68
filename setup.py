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
import shlex
import subprocess
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
from setuptools import Extension  # noqa: E402
from setuptools.command.build_ext import build_ext  # noqa: E402
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



# ------------------------------------------------ the compiled operator --
# libmx_instnorm.so: the C++ InstanceNorm operator for mx.library.load,
# compiled with the lib_api.cc/lib_api.h of the MXNet found at build time
# (a build requirement in pyproject.toml; never copied into this repository).
# Any failure only prints a warning: the package then runs on the Python
# CustomOp, and mx_instnorm says why.
COMPILED_LIBRARY = "mx_instnorm.operator.libmx_instnorm"
COMPILED_SOURCES = ["mx_instnorm/kernel/instance_norm.cc",
                    "mx_instnorm/operator/lib_instance_norm.cc"]


# Every compiler and linker flag, in one place. CXX picks the compiler
# (default c++); CXXFLAGS and LDFLAGS from the environment come after these
# (so they can add -fsanitize=address,undefined or change -O3: see
# docs/design.md, "Sanitizers"); CXXFLAGS is passed to the link as well.
# Generic code for the target architecture (never -march=native: a library
# built on an AVX-512 machine must run on others); the hot loops carry their
# own AVX2/AVX-512 clones on x86-64.
COMPILED_CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-pthread"]
# Our own sources only. lib_api.cc is compiled with default visibility (its
# C entry points are what MXNet dlsym()s) and the export list below hides
# its C++ symbols.
COMPILED_OWN_CXXFLAGS = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
COMPILED_LDFLAGS = ["-shared", "-pthread"]
# Exported: only the C entry points lib_api.cc defines for mx.library.load
# (_opVersion, _opRegSize, _opCall*, _msgSize, _msgGet, ...) and our
# initialize(). `nm -D --defined-only libmx_instnorm.so` lists them.
COMPILED_EXPORTS = "{\n  global: initialize; _op*; _part*; _pass*; _msg*;\n  local: *;\n};\n"
COMPILED_EXPORTS_DARWIN = "_initialize\n__op*\n__part*\n__pass*\n__msg*\n"
COMPILED_EXPORT_FLAG = ("-Wl,-exported_symbols_list," if sys.platform == "darwin"
                        else "-Wl,--version-script=")


class _NotBuilt(Exception):
    """The compiled operator is not built; the message says why."""


def _mxnet_root():
    """The installed mxnet package folder holding lib_api.h and lib_api.cc,
    found without importing mxnet (whose import fails with numpy >= 1.24)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("mxnet")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (os.path.isfile(os.path.join(root, "src", "lib_api.cc"))
                and os.path.isfile(os.path.join(root, "include", "mxnet", "lib_api.h"))):
            return root
    return None


class BuildCompiledOperator(build_ext):
    """``build_ext`` that compiles ``libmx_instnorm.so`` itself (a plain
    shared library, not a Python extension module) into the package, or
    warns and goes on. ``CXX`` picks the compiler (default ``c++``),
    ``CXXFLAGS``/``LDFLAGS`` add flags (see ``COMPILED_CXXFLAGS``);
    ``MX_INSTNORM_BUILD=0`` skips the build. ``build_ext --inplace`` puts
    the library into the source tree."""

    def get_ext_filename(self, fullname):
        # Called with the full dotted name or its last part only.
        if COMPILED_LIBRARY.endswith(fullname) and fullname.endswith("libmx_instnorm"):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != COMPILED_LIBRARY:
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        if os.path.exists(target):
            # A library left by an earlier build must not ship when this
            # build fails or is skipped.
            os.remove(target)
        try:
            self._compile(ext, target)
        except _NotBuilt as why:
            print("WARNING: mx_instnorm: compiled operator not built (%s); "
                  "the Python CustomOp will be used" % why, file=sys.stderr)

    def _compile(self, ext, target):
        if os.environ.get("MX_INSTNORM_BUILD", "").strip() == "0":
            raise _NotBuilt("MX_INSTNORM_BUILD=0")
        root = _mxnet_root()
        if root is None:
            raise _NotBuilt("no installed mxnet with include/mxnet/lib_api.h and src/lib_api.cc")
        cxx = shlex.split(os.environ.get("CXX", "").strip() or "c++")
        env_cxxflags = shlex.split(os.environ.get("CXXFLAGS", ""))
        env_ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
        includes = ["-I", os.path.join(root, "include", "mxnet"),
                    "-I", os.path.join(root, "include")]
        temp = os.path.join(self.build_temp, "libmx_instnorm")
        self.mkpath(temp)
        self.mkpath(os.path.dirname(target))
        exports = os.path.join(temp, "exports.map")
        with open(exports, "w", encoding="utf-8") as f:
            f.write(COMPILED_EXPORTS_DARWIN if sys.platform == "darwin" else COMPILED_EXPORTS)
        sources = [(os.path.join(here, src), True) for src in ext.sources]
        sources.append((os.path.join(root, "src", "lib_api.cc"), False))
        objects = []
        for source, own in sources:
            obj = os.path.join(temp, os.path.basename(source) + ".o")
            self._run(cxx + COMPILED_CXXFLAGS + (COMPILED_OWN_CXXFLAGS if own else [])
                      + includes + env_cxxflags + ["-c", source, "-o", obj])
            objects.append(obj)
        # CXXFLAGS at the link too: -fsanitize=... must link its runtime.
        self._run(cxx + objects + COMPILED_LDFLAGS + [COMPILED_EXPORT_FLAG + exports]
                  + env_cxxflags + env_ldflags + ["-o", target + ".tmp"])
        if not os.path.isfile(target + ".tmp"):
            raise _NotBuilt("%s wrote no %s" % (cxx[0], target + ".tmp"))
        os.replace(target + ".tmp", target)

    @staticmethod
    def _run(cmd):
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  universal_newlines=True)
        except OSError as err:
            raise _NotBuilt("cannot run %s: %s" % (cmd[0], err)) from None
        if done.returncode != 0:
            errors = [line for line in done.stdout.splitlines() if "error" in line.lower()]
            raise _NotBuilt("%s exited with status %d%s" % (
                cmd[0], done.returncode, (": " + errors[0].strip()) if errors else ""))

    def _built(self):
        return [ext for ext in self.extensions
                if ext.name != COMPILED_LIBRARY
                or os.path.isfile(os.path.join(
                    self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name))))]

    def copy_extensions_to_source(self):
        # Nothing to copy for a library that was not built.
        extensions, self.extensions = self.extensions, self._built()
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = extensions

    def get_outputs(self):
        return [path for path in super().get_outputs() if os.path.isfile(path)]


def _compiled_extensions():
    # A platform-specific wheel only where a build can be attempted.
    if os.environ.get("MX_INSTNORM_BUILD", "").strip() == "0" or _mxnet_root() is None:
        return []
    return [Extension(COMPILED_LIBRARY, sources=COMPILED_SOURCES,
                      depends=["mx_instnorm/kernel/instance_norm.h"])]


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
        # The test suite also exercises the ONNX export (onnxruntime 1.31.1,
        # the release verified here, ships wheels for Python >= 3.11 only; on
        # Python 3.10 those tests skip).
        "test": [
            "pytest>=7",
            "onnx==1.14.1; python_version=='3.11'",
            "onnx==1.18.0; python_version=='3.12'",
            "onnxruntime==1.31.1; python_version=='3.11' or python_version=='3.12'",
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
    ext_modules=_compiled_extensions(),
    cmdclass={
        "build_py": BuildPyWithNumpyCompatPth,
        "build_ext": BuildCompiledOperator,
    },
)
