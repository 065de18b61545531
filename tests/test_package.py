"""Package hygiene: one version, every package folder installed."""

import importlib.metadata
import os
import tomllib

import rbeformat
import rbeformat._version as version_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_version_has_one_source():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rbeformat._version.__version__"}
    assert rbeformat.__version__ == version_module.__version__


def test_installed_metadata_has_the_version():
    # A mismatch means the install is stale: reinstall (pip install -e .).
    assert importlib.metadata.version("rbe") == rbeformat.__version__


def test_every_python_folder_of_rbeformat_is_an_installed_package():
    """A folder without __init__.py, or missing from pyproject's list, is left out of a wheel."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    base = os.path.join(ROOT, "rbeformat")
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            package = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            assert "__init__.py" in files, f"{package} has no __init__.py"
            assert package in listed, f"{package} is not in pyproject.toml's packages"
