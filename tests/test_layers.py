"""Every import inside the package points one way, down the layers.

kernel -> operator -> graphs, nd, sym -> gluon (the block, and swap_instance_norm,
which converts a SymbolBlock's graph) -> integration -> the
package's top level and command line. Read from the source with ``ast``
(imports inside functions included), so a late import cannot hide.
"""
import ast
import os

import pytest

import mx_instnorm

ROOT = os.path.dirname(os.path.abspath(mx_instnorm.__file__))

# Lower numbers are lower layers; a module may import its own subpackage
# and strictly lower layers only.
LAYERS = {
    "_version": 0,
    "kernel": 0,
    "operator": 1,
    "graphs": 2,
    "nd": 2,
    "sym": 2,
    "gluon": 3,
    "integration": 4,
    "__init__": 5,
    "__main__": 5,
    "bench": 5,
}


def _modules():
    for folder, _, files in os.walk(ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                yield rel, path


def _imports(rel, path):
    """``(parts, lineno)`` for each name ``path`` imports from the package,
    resolved to absolute dotted parts (``['mx_instnorm', 'operator',
    '_params']``), inside functions too."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = ["mx_instnorm"] + rel[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split("."), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = base + (node.module.split(".") if node.module else [])
            else:
                mod = node.module.split(".")
            for alias in node.names:
                yield mod + [alias.name], node.lineno


def _imported(rel, path):
    """The package's top-level units ``path`` imports (``operator``, ...)."""
    return {(parts[1], line) for parts, line in _imports(rel, path)
            if parts[0] == "mx_instnorm" and len(parts) > 1}


def _unit(rel):
    """``operator`` for operator/backend.py, ``bench`` for bench.py."""
    return rel[0]


def test_every_module_has_a_layer():
    missing = sorted({_unit(rel) for rel, _ in _modules()} - set(LAYERS))
    assert not missing, "modules without a layer in LAYERS: %s" % missing


def test_imports_point_down():
    wrong = []
    for rel, path in _modules():
        unit = _unit(rel)
        for target, line in _imported(rel, path):
            if target == unit or target not in LAYERS:
                continue
            if LAYERS[target] >= LAYERS[unit]:
                wrong.append("%s:%d imports mx_instnorm.%s"
                             % (os.path.relpath(path, ROOT), line, target))
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)




def test_no_private_module_of_another_unit():
    """Modules use another unit's public surface, never its private modules
    or names (``mx_instnorm.operator._params`` and the like)."""
    wrong = []
    for rel, path in _modules():
        unit = _unit(rel)
        for parts, line in _imports(rel, path):
            if parts[0] != "mx_instnorm" or len(parts) < 3 or parts[1] == unit:
                continue
            private = [p for p in parts[2:] if p.startswith("_") and not p.startswith("__")]
            if private:
                wrong.append("%s:%d %s" % (os.path.relpath(path, ROOT), line, ".".join(parts)))
    assert not wrong, "private names of other units imported:\n" + "\n".join(wrong)


def test_kernel_does_not_import_mxnet():
    for rel, path in _modules():
        if rel[0] != "kernel":
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("mxnet") for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("mxnet"), path


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The parser finds an upward import, relative and late (in a function)."""
    bad = tmp_path / "functions.py"
    bad.write_text("def f():\n    from ..gluon import InstanceNorm\n"
                   "from .. import integration\n")
    found = {t for t, _ in _imported(["operator", "functions"], str(bad))}
    assert found == {"gluon", "integration"}
    private = [p for p, _ in _imports(["gluon", "x"], str(bad))]
    assert ["mx_instnorm", "gluon", "InstanceNorm"] in private
