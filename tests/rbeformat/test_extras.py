"""rbeformat.extras: each optional feature names the one extra of pyproject.toml that installs all it imports."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tomllib

import pytest

from rbeformat import MissingExtraError, UsageError
from rbeformat.extras import NEEDS, Need

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def extras() -> dict[str, list[str]]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]["optional-dependencies"]


def distributions(extra: str, declared: dict[str, list[str]]) -> set[str]:
    """The distributions ``pip install 'rbe[extra]'`` installs, the extras it names (rbe[hf]) followed."""
    found = set()
    for requirement in declared[extra]:
        name = re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", requirement)
        base, included = name.group(0).split("[")[0], name.group(1)
        if base == "rbe":
            for inner in included.strip("[]").split(","):
                found |= distributions(inner.strip(), declared)
        else:
            found.add(base.lower().replace("_", "-"))
    return found


def distribution_of(module: str) -> str:
    """The installed distribution that provides an importable top-level module (torch -> torch)."""
    provided = importlib.metadata.packages_distributions().get(module, [module])
    return provided[0].lower().replace("_", "-")


@pytest.mark.parametrize("need", NEEDS, ids=lambda need: f"{need.extra}:{'+'.join(need.modules)}")
def test_each_need_names_an_extra_that_installs_every_module_it_imports(need):
    declared = extras()
    assert need.extra in declared
    missing = [m for m in need.modules if distribution_of(m) not in distributions(need.extra, declared)]
    assert not missing, f"rbe[{need.extra}] does not install {missing}"


def test_the_distribution_lookup_follows_included_extras():
    declared = extras()
    assert {"torch", "transformers", "onnx", "onnxscript"} <= distributions("hf-onnx", declared)
    assert "torch" not in distributions("ort", declared)  # the ort extra is the one without torch


@pytest.mark.parametrize("blocked", ["onnx", "onnxruntime", "tokenizers"])
def test_a_missing_module_is_one_import_error_naming_the_extra(monkeypatch, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # import now raises ModuleNotFoundError
    need = Need("rbe run", "ort", ("onnx", "onnxruntime", "tokenizers"))
    with pytest.raises(ImportError) as caught:
        need.require()
    error = caught.value
    assert isinstance(error, MissingExtraError) and isinstance(error, UsageError)  # the command line: exit 2
    assert error.name == blocked and error.extra == "ort"
    assert str(error) == (
        f"rbe run needs onnx, onnxruntime and tokenizers; {blocked} is not installed: pip install 'rbe[ort]'"
    )


def test_one_module_needed_reads_as_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError) as caught:
        Need("rbe_loaders.torch", "hf", ("torch",)).require("framework 'pt'")
    assert str(caught.value) == "framework 'pt' needs torch, which is not installed: pip install 'rbe[hf]'"


def test_installed_modules_come_back_in_order():
    import json

    assert Need("x", "hf", ("json", "re")).require() == [json, re]
