"""The committed golden files of the tensor codecs decode bit for bit.

They are found per version folder (tests/golden.py): every fixtures/v*/index.json
names its files, so a new version folder is checked with no edit here.
"""

import hashlib

import golden
import numpy as np
import pytest

from rbeformat import Reader

INDEX = golden.lossy_index()  # "folder/name" -> chain, digests, relative error


def test_there_are_lossy_golden_files_of_version_1_1():
    assert any(name.startswith("v1.1/") for name in INDEX)


def test_every_tensor_codec_has_a_golden_file():
    from rbeformat.codecs.registry import TENSOR_CODECS

    covered = {entry["chain"].split("(")[0] for entry in INDEX.values()}
    for entry in INDEX.values():  # chained codecs count too
        covered |= {name for name in TENSOR_CODECS if f"{name}(" in entry["chain"]}
    assert set(TENSOR_CODECS) <= covered


@pytest.mark.parametrize("name", sorted(INDEX))
def test_golden_lossy_file_decodes_exactly(name):
    from safetensors.numpy import load_file

    entry = INDEX[name]
    path = golden.path(name, ".rbe")
    with open(path, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == entry["rbe_sha256"]
    expected = load_file(golden.path(name, ".expected.safetensors"))
    with Reader(path) as r:
        decoded = r.get_tensor("w")
        assert list(r.verify(deep=True)) == []
    assert decoded.tobytes() == expected["decoded"].tobytes()
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == entry["decoded_sha256"]
    x = expected["input"]
    rel = float(np.linalg.norm(decoded.astype(np.float64) - x) / np.linalg.norm(x))
    assert rel == pytest.approx(entry["rel_error"], rel=1e-6, abs=1e-12)
