"""Finds the committed golden files, one folder per format version (fixtures/v1, v1.1, ...).

A folder ``fixtures/vMAJOR[.MINOR]`` holds files written in that format version,
of two kinds, told apart by what sits beside the .rbe file:

* lossless: ``NAME.rbe`` with ``NAME.expected.json`` (digests) and
  ``NAME.expected.safetensors`` (the tensors that went in), checked by
  tests/rbeformat/test_fixtures.py;
* lossy: an ``index.json`` naming each ``NAME`` (chain, digests, error), with
  ``NAME.rbe`` and ``NAME.expected.safetensors``, checked by
  tests/rbeformat/test_fixtures_lossy.py.

A new version folder is picked up by both test files with no edit to either;
tests/rbeformat/test_fixtures.py checks that every .rbe of every folder is one of the two.
"""

from __future__ import annotations

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
_VERSION_FOLDER = re.compile(r"v(\d+)(?:\.(\d+))?")


def folder_version(folder: str) -> tuple[int, int]:
    """The format version a folder holds: "v1" -> (1, 0), "v1.2" -> (1, 2)."""
    match = _VERSION_FOLDER.fullmatch(folder)
    if match is None:
        raise ValueError(f"{folder!r} is not a version folder (vMAJOR or vMAJOR.MINOR)")
    return int(match[1]), int(match[2] or 0)


def version_folders() -> list[str]:
    """The version folders under fixtures/, oldest first."""
    folders = [
        f for f in os.listdir(FIXTURES) if _VERSION_FOLDER.fullmatch(f) and os.path.isdir(os.path.join(FIXTURES, f))
    ]
    return sorted(folders, key=folder_version)


def path(name: str, suffix: str) -> str:
    """The file of fixture ``name`` ("folder/NAME") ending in ``suffix`` (".rbe", ...)."""
    return os.path.join(FIXTURES, name + suffix)


def rbe_files() -> list[str]:
    """Every committed .rbe file, as "folder/NAME"."""
    return [
        f"{folder}/{f.removesuffix('.rbe')}"
        for folder in version_folders()
        for f in sorted(os.listdir(os.path.join(FIXTURES, folder)))
        if f.endswith(".rbe")
    ]


def lossless_names() -> list[str]:
    """The fixtures described by a NAME.expected.json, as "folder/NAME"."""
    return [
        f"{folder}/{f.removesuffix('.expected.json')}"
        for folder in version_folders()
        for f in sorted(os.listdir(os.path.join(FIXTURES, folder)))
        if f.endswith(".expected.json")
    ]


def lossy_index() -> dict[str, dict]:
    """ "folder/NAME" -> its index.json entry, over every folder that has an index.json."""
    entries = {}
    for folder in version_folders():
        index = os.path.join(FIXTURES, folder, "index.json")
        if os.path.exists(index):
            with open(index) as fh:
                entries.update({f"{folder}/{name}": entry for name, entry in json.load(fh).items()})
    return entries
