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
        # Where no build is attempted, the installed package says why; where
        # one is, build_ext writes or removes the note.
        why = _why_not_buildable()
        operator_dir = os.path.join(self.build_lib, "mx_instnorm", "operator")
        _write_note(operator_dir, why)
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
        note = os.path.join(self.build_lib, "mx_instnorm", "operator", NOT_BUILT_NOTE)
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, NUMPY_COMPAT_PTH[0])] + (
            [note] if os.path.isfile(note) else [])



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
# -ffp-contract=off: no fused multiply-adds, so results are the same bits
# on every CPU and on both float16 paths (see kernel/instance_norm.cc).
COMPILED_OWN_CXXFLAGS = ["-fvisibility=hidden", "-fvisibility-inlines-hidden",
                         "-ffp-contract=off"]
COMPILED_LDFLAGS = ["-shared", "-pthread"]
# Exported: only the C entry points lib_api.cc defines for mx.library.load
# (_opVersion, _opRegSize, _opCall*, _msgSize, _msgGet, ...), our
# initialize() and mx_instnorm_num_threads() (the kernel's thread count). `nm -D --defined-only libmx_instnorm.so` lists them.
COMPILED_EXPORTS = "{\n  global: initialize; mx_instnorm_num_threads; _op*; _part*; _pass*; _msg*;\n  local: *;\n};\n"
COMPILED_EXPORTS_DARWIN = "_initialize\n_mx_instnorm_num_threads\n__op*\n__part*\n__pass*\n__msg*\n"
COMPILED_EXPORT_FLAG = ("-Wl,-exported_symbols_list," if sys.platform == "darwin"
                        else "-Wl,--version-script=")


class _NotBuilt(Exception):
    """The compiled operator is not built; the message says why."""


# The library API (lib_api.h's MX_LIBRARY_VERSION) lib_instance_norm.cc is
# written for: MXNet 1.9.x's. MXNet 1.7 (7) and 1.8 (10) differ in the calls
# the glue makes, and mx.library.load refuses any other version, so against
# them nothing is built and the Python CustomOp runs.
LIBRARY_API = 11
# Beside the library: why it was not built, for backend_reason() (the
# loader reads it; see mx_instnorm/operator/compiled.py).
NOT_BUILT_NOTE = "libmx_instnorm.not-built.txt"


def _has_lib_api(root):
    return (os.path.isfile(os.path.join(root, "src", "lib_api.cc"))
            and os.path.isfile(os.path.join(root, "include", "mxnet", "lib_api.h")))


def _target_site_packages():
    """The site-packages folders of the environment being installed into.

    pip's isolated build environment runs this script with the target's own
    interpreter (so ``sys.prefix`` is the target's) but takes the target's
    site-packages off ``sys.path``; ``sysconfig`` still names them."""
    import sysconfig
    paths = sysconfig.get_paths()
    return [paths[key] for key in ("purelib", "platlib") if paths.get(key)]


def _mxnet_root():
    """The mxnet package folder holding lib_api.h and lib_api.cc to build
    against, found without importing mxnet (whose import fails with numpy
    >= 1.24): the target environment's mxnet when it has one (the MXNet the
    library will be loaded into), else the importable one (under pip's
    build isolation the build requirement of pyproject.toml, the newest
    mxnet < 2, which is also what pip then installs)."""
    import importlib.util
    for site in _target_site_packages():
        root = os.path.join(site, "mxnet")
        if os.path.isfile(os.path.join(root, "__init__.py")):
            return root  # the target's mxnet decides, lib_api or not
    try:
        spec = importlib.util.find_spec("mxnet")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if _has_lib_api(root):
            return root
    return None


def _link_flags():
    """Linker flags for libmx_instnorm.so, all in this one place.

    ``-Wl,-Bsymbolic`` (ELF platforms): the library's own references to
    the ``mxnet::ext`` classes of ``lib_api.cc`` bind to its own copies.
    libmxnet.so defines the same symbols; Python loads it ``RTLD_LOCAL``,
    but a C or C++ program linked against it has them in the global scope,
    where they would interpose on ours: ``MXLoadLib`` then dies with
    SIGFPE in the library's static initialisation
    (``CustomOp::setBackward``). lib_api's C entry points stay exported
    (the export list, ``COMPILED_EXPORTS``), so ``mx.library.load`` and
    ``MXLoadLib`` still find them. macOS resolves symbols
    per library (two-level namespaces) and its linker has no ``-Bsymbolic``.
    """
    if sys.platform.startswith(("linux", "freebsd")):
        return ["-Wl,-Bsymbolic"]
    return []


# MXNet 1.9.1's lib_api.cc refuses dtype code 12 (bfloat16) when it wraps
# an operator's arrays (MXTensor::setDLTensor: "Invalid dtype flag: 12"),
# although MXNet hands library operators bfloat16 arrays. The library is
# built from a copy of the installed lib_api.cc, in the build directory,
# with that one case added (DLPack's kDLBfloat, 16 bits).
_BF16_CASE = """  case 12:  // bfloat16 (mshadow::kBfloat16), added by mx_instnorm's build
    dltensor.dtype.code = 4U;
    dltensor.dtype.bits = 16;
    break;
"""


def _lib_api_source(root, build_temp):
    path = os.path.join(root, "src", "lib_api.cc")
    with open(path) as f:
        text = f.read()
    anchor = "  default:\n    dltensor.dtype.code = 0;"
    if "case 12:" in text or text.count(anchor) != 1:
        return path
    os.makedirs(build_temp, exist_ok=True)
    patched = os.path.join(build_temp, "lib_api_bf16.cc")
    with open(patched, "w") as f:
        f.write(text.replace(anchor, _BF16_CASE + anchor))
    return patched


def _mxnet_version(root):
    """The version of the mxnet at ``root`` ('1.8.0.post0'), from the
    package's metadata read as text, or None."""
    import glob
    site = os.path.dirname(root)
    for info in glob.glob(os.path.join(site, "mxnet*-*.dist-info", "METADATA")):
        with open(info, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    return None


def _mxnet_description(root):
    """'mxnet 1.8.0 at ROOT'."""
    found = _mxnet_version(root)
    return ("mxnet %s at %s" % (found, root)) if found else "the mxnet at %s" % root


# The oldest MXNet the package supports: 1.8 passes the suite on the Python
# CustomOp (CI checks it). 1.6 and 1.7 lack bfloat16 (amp_cast refuses it),
# AMP's bfloat16 lists and API (list_lp16_ops, target_dtype='bfloat16'), and
# infer no dtype past a Convolution whose data has none, which to_native and
# the convert command rely on: refused at install, in one line, where the
# target environment already has one (pip would otherwise keep it).
MIN_MXNET = (1, 8)


def _refuse_old_mxnet():
    import re
    root = next((os.path.join(site, "mxnet") for site in _target_site_packages()
                 if os.path.isfile(os.path.join(site, "mxnet", "__init__.py"))), None)
    found = _mxnet_version(root) if root else None
    numbers = re.match(r"(\d+)\.(\d+)", found or "")
    if numbers and tuple(map(int, numbers.groups())) < MIN_MXNET:
        sys.exit("ERROR: mx_instnorm needs mxnet>=%d.%d,<2, this environment has mxnet "
                 "%s: pip install \"mxnet>=1.8,<2\" first (see docs/install.md)"
                 % (MIN_MXNET + (found,)))


def _library_api(root):
    """MX_LIBRARY_VERSION of the lib_api.h under ``root`` (None if absent)."""
    import re
    try:
        with open(os.path.join(root, "include", "mxnet", "lib_api.h"),
                  encoding="utf-8", errors="replace") as f:
            match = re.search(r"#define\s+MX_LIBRARY_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _why_not_buildable():
    """Why no build can be attempted (a one-line reason), or None."""
    if os.environ.get("MX_INSTNORM_BUILD", "").strip() == "0":
        return "MX_INSTNORM_BUILD=0 was set at install"
    root = _mxnet_root()
    if root is None:
        return ("no mxnet with include/mxnet/lib_api.h and src/lib_api.cc was found "
                "at install (target: %s)" % ", ".join(_target_site_packages()))
    if not _has_lib_api(root):
        return "%s has no include/mxnet/lib_api.h and src/lib_api.cc" % _mxnet_description(root)
    api = _library_api(root)
    if api != LIBRARY_API:
        return ("%s has library API %s (MX_LIBRARY_VERSION); the compiled operator "
                "is written for %d, mxnet 1.9.x's" % (_mxnet_description(root), api, LIBRARY_API))
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
            _write_note(os.path.dirname(target), str(why))
        else:
            _write_note(os.path.dirname(target), None)

    def _compile(self, ext, target):
        why = _why_not_buildable()
        if why is not None:
            raise _NotBuilt(why)
        root = _mxnet_root()
        print("mx_instnorm: building the compiled operator against %s"
              % _mxnet_description(root), file=sys.stderr)
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
        sources.append((_lib_api_source(root, self.build_temp), False))
        objects = []
        for source, own in sources:
            obj = os.path.join(temp, os.path.basename(source) + ".o")
            self._run(cxx + COMPILED_CXXFLAGS + (COMPILED_OWN_CXXFLAGS if own else [])
                      + includes + env_cxxflags + ["-c", source, "-o", obj])
            objects.append(obj)
        # CXXFLAGS at the link too: -fsanitize=... must link its runtime.
        self._run(cxx + objects + COMPILED_LDFLAGS + _link_flags()
                  + [COMPILED_EXPORT_FLAG + exports]
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
            raise _NotBuilt("the C++ compiler %s cannot be run: %s" % (cmd[0], err)) from None
        if done.returncode != 0:
            errors = [line for line in done.stdout.splitlines() if "error" in line.lower()]
            raise _NotBuilt("the C++ compiler %s exited with status %d%s" % (
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


def _write_note(folder, why):
    """Writes (``why``) or removes (None) the not-built note in ``folder``."""
    note = os.path.join(folder, NOT_BUILT_NOTE)
    if why is None:
        if os.path.exists(note):
            os.remove(note)
        return
    os.makedirs(folder, exist_ok=True)
    with open(note, "w", encoding="utf-8") as f:
        f.write(why + "\n")


def _compiled_extensions():
    # A platform-specific wheel only where a build can be attempted
    # (otherwise build_py leaves the note saying why not).
    if _why_not_buildable() is not None:
        return []
    return [Extension(COMPILED_LIBRARY, sources=COMPILED_SOURCES,
                      depends=["mx_instnorm/kernel/instance_norm.h"])]


_refuse_old_mxnet()

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
        "mxnet>=1.8,<2",
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
            # tests/test_serving.py serves a model with MMS (skips without Java).
            "multi-model-server==1.1.11",
            "model-archiver==1.0.3",
        ],
        # Multi Model Server (docs/serving.md), verified on Python 3.11 and
        # 3.12 with OpenJDK 17; they add Pillow, psutil, future, enum-compat.
        "serve": ["multi-model-server==1.1.11", "model-archiver==1.0.3"],
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
