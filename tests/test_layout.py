"""The layering the package layout promises (ARCHITECTURE.md), checked on the source itself.

* ``rbeformat`` imports neither ``rbe_converters`` nor ``rbe_loaders``; ``rbe_loaders``
  imports nothing of ``rbe_converters``;
* no module imports another module's private (``_name``) names or reads them as
  ``module._name``;
* converters and loaders never compare a codec's name: what a codec does is read from
  what it declares (its decode formula, its methods), so a new codec touches no code there;
* the benchmarks call library functions, not the command line's ``main``;
* every package folder is listed in pyproject.toml, so that a wheel carries it.
"""

from __future__ import annotations

import ast
import os
import tomllib

import pytest

from rbeformat.codecs.registry import CODECS, TENSOR_CODECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folder -> the name it is installed under (pyproject.toml's package-dir).
PACKAGES = {"rbeformat": "rbeformat", "converters": "rbe_converters", "loaders": "rbe_loaders"}
OWN = set(PACKAGES.values())
# The C extension is the one private module imported across files, by its loader alone.
PRIVATE_ALLOWED = {("rbeformat.native", "rbeformat._planes")}
CODEC_NAMES = set(CODECS) | set(TENSOR_CODECS)
# Words that happen to spell a codec's name but mean something else where they are compared.
NOT_CODEC_NAMES = {"converters/compress/mixed.py": {"raw"}}  # budget_counts "raw": bits counted before lossless coding


def python_files(folder: str) -> list[str]:
    found = []
    for directory, _, files in os.walk(os.path.join(ROOT, folder)):
        found += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(found)


def module_name(path: str) -> tuple[str, bool]:
    """(dotted installed name, whether it is a package's __init__) of a source file."""
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    parts[0] = PACKAGES.get(parts[0], parts[0])
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imports(path: str) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import statement in the file."""
    me, is_package = module_name(path)
    package = me.split(".") if is_package else me.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize(
    "folder,forbidden", [("rbeformat", {"rbe_converters", "rbe_loaders"}), ("loaders", {"rbe_converters"})]
)
def test_lower_layers_import_nothing_above_them(folder, forbidden):
    wrong = [
        f"{os.path.relpath(path, ROOT)}:{line} imports {module}"
        for path in python_files(folder)
        for module, _, line in imports(path)
        if top(module) in forbidden
    ]
    assert not wrong


def private_imports(path: str) -> list[str]:
    me, _ = module_name(path)
    wrong = []
    for module, names, line in imports(path):
        if top(module) not in OWN | {"bench"} or module == me:
            continue
        for name in names:
            target = f"{module}.{name}"
            if name.startswith("_") and not name.startswith("__") and (me, target) not in PRIVATE_ALLOWED:
                wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
    return wrong


def private_attributes(path: str) -> list[str]:
    """``alias._name`` where alias is a module of this project imported into the file."""
    me, _ = module_name(path)
    aliases = {}
    for module, names, _ in imports(path):
        if not names:
            aliases[module.split(".")[0]] = module
        for name in names:
            aliases[name] = f"{module}.{name}"
    wrong = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        if node.attr.startswith("_") and not node.attr.startswith("__"):
            target = aliases.get(node.value.id, "")
            if top(target) in OWN | {"bench"} and target != me:
                wrong.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} reads {target}.{node.attr}")
    return wrong


def test_no_module_uses_another_modules_private_names():
    files = [p for folder in (*PACKAGES, "bench", "tests") for p in python_files(folder)]
    wrong = [w for path in files for w in private_imports(path) + private_attributes(path)]
    assert not wrong


def codec_name_comparisons(path: str) -> list[str]:
    here = os.path.relpath(path, ROOT).replace(os.sep, "/")
    names = CODEC_NAMES - NOT_CODEC_NAMES.get(here, set())
    wrong = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            named = [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
            if named:
                wrong.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} compares with {named}")
    return wrong


def test_converters_and_loaders_never_compare_a_codec_name():
    wrong = [
        w for folder in ("converters", "loaders") for path in python_files(folder) for w in codec_name_comparisons(path)
    ]
    assert not wrong


def test_the_check_finds_a_codec_name_comparison(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('def f(codec):\n    return codec.name == "gquant" or codec.name in ("vq", "seed")\n')
    assert len(codec_name_comparisons(str(sample))) == 2


def test_the_benchmarks_call_library_functions_not_the_command_line():
    wrong = [
        f"{os.path.relpath(path, ROOT)}:{line}"
        for path in python_files("bench")
        for module, _, line in imports(path)
        if module == "rbe_converters.cli"
    ]
    sources = {p: open(p, encoding="utf-8").read() for p in python_files("bench")}
    wrong += [os.path.relpath(p, ROOT) for p, text in sources.items() if "rbe_converters.cli" in text]
    assert not wrong


def test_pyproject_lists_every_package_folder():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        listed = set(tomllib.load(fh)["tool"]["setuptools"]["packages"])
    folders = {
        module_name(path)[0]
        for folder in PACKAGES
        for path in python_files(folder)
        if os.path.basename(path) == "__init__.py"
    }
    assert folders == listed
