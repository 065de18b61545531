"""The committed golden files of every format version must keep decoding bit for bit.

Fixtures are found per version folder (tests/golden.py): every fixtures/v*/
folder's NAME.expected.json fixtures are checked here, its index.json ones by
tests/rbeformat/test_fixtures_lossy.py, and every .rbe of every folder must be one or the
other.  A reader change that breaks files already written fails here.  The .rbe
bytes are not compared with a fresh encoding (a newer zstd may compress
differently); instead encoding is checked to be deterministic within one run,
and a fresh encoding must decode to the same tensors as the committed file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

import golden
import numpy as np
import pytest

from rbe_converters.decode import decode
from rbe_converters.safetensors_io import read_header
from rbeformat import Reader
from rbeformat.layout import unpack_header

FIXTURES = golden.FIXTURES


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIXTURES, "make_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


make_fixtures = _load_generator()
NAMES = golden.lossless_names()  # "folder/name", e.g. "v1/lossless-f32", "v1.2/lossless-rotl"
# The formats whose golden files must keep decoding; a newer folder joins by itself.
REQUIRED_VERSIONS = {"v1", "v1.1", "v1.2"}


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def rbe_path(name: str) -> str:
    return golden.path(name, ".rbe")


def expected(name: str) -> dict:
    with open(golden.path(name, ".expected.json")) as fh:
        return json.load(fh)


def expected_tensors(name: str) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, bytes) from the .expected.safetensors file."""
    st = read_header(golden.path(name, ".expected.safetensors"))
    with open(st.path, "rb") as fh:
        data = fh.read()[st.data_start :]
    return {t.name: (t.dtype, t.shape, data[t.begin : t.end]) for t in st.tensors}


def test_every_rbe_file_of_every_version_is_checked():
    """Each .rbe is a lossless fixture (checked here) or a lossy one (test_fixtures_lossy.py):
    a file that is neither would be skipped silently."""
    lossless, lossy = set(NAMES), set(golden.lossy_index())
    assert not lossless & lossy, "a fixture is described both ways"
    assert sorted(golden.rbe_files()) == sorted(lossless | lossy)
    folders = {name.split("/")[0] for name in golden.rbe_files()}
    assert REQUIRED_VERSIONS <= folders <= set(golden.version_folders())


def test_every_lossless_fixture_is_complete_and_generated():
    generated = {f"{group}/{name}" for group, names in make_fixtures.SETS.items() for name in names}
    assert set(NAMES) == generated  # make_fixtures.py can rewrite every one
    for name in NAMES:
        for suffix in (".rbe", ".expected.safetensors"):
            assert os.path.isfile(golden.path(name, suffix)), name + suffix


@pytest.mark.parametrize("name", golden.rbe_files())
def test_each_file_is_in_the_format_version_of_its_folder(name):
    with open(rbe_path(name), "rb") as fh:
        assert unpack_header(fh.read(64)) == golden.folder_version(name.split("/")[0])


@pytest.mark.parametrize("name", NAMES)
def test_committed_file_is_unchanged(name):
    """The golden bytes themselves: an accidental rewrite shows up here."""
    with open(rbe_path(name), "rb") as fh:
        data = fh.read()
    assert {"size": len(data), "sha256": sha256(data)} == expected(name)["rbe"]


@pytest.mark.parametrize("name", NAMES)
def test_expected_files_agree(name):
    """The .expected.json digests describe the .expected.safetensors contents."""
    tensors = expected_tensors(name)
    table = expected(name)["tensors"]
    assert sorted(tensors) == sorted(table)
    for tensor, (dtype, shape, data) in tensors.items():
        assert (dtype, list(shape), sha256(data)) == (
            table[tensor]["dtype"],
            table[tensor]["shape"],
            table[tensor]["sha256"],
        )


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("name", NAMES)
def test_decodes_bit_for_bit(name, threads):
    tensors = expected_tensors(name)
    table = expected(name)["tensors"]
    with Reader(rbe_path(name), threads=threads) as r:
        assert sorted(r.keys()) == sorted(table)
        for tensor, (dtype, shape, data) in tensors.items():
            entry = r.entry(tensor)
            array = r.get_tensor(tensor)
            assert (entry.dtype.name, array.shape) == (dtype, shape), tensor
            assert array.dtype == np.dtype(entry.dtype.numpy_storage)
            assert array.tobytes() == data, tensor
            assert r.tensor_bytes(tensor).tobytes() == data, tensor
            assert entry.alias_of == table[tensor].get("alias_of"), tensor


@pytest.mark.parametrize("name", NAMES)
def test_verifies_clean(name):
    with Reader(rbe_path(name)) as r:
        assert list(r.verify(deep=True)) == []
    with Reader(rbe_path(name), verify_checksums=False) as r:
        assert list(r.verify(deep=True)) == []


def test_fixtures_cover_every_plane_method():
    """Golden files that never use a method would not protect its decoder."""
    assert make_fixtures.plane_methods(rbe_path("v1/lossless-f32")) == {"raw", "zstd", "split"}
    assert "split" in make_fixtures.plane_methods(rbe_path("v1/lossless-bf16"))
    assert make_fixtures.plane_methods(rbe_path("v1.2/lossless-rotl")) == {"raw", "zstd", "fields"}
    assert len(make_fixtures.rotations(rbe_path("v1.2/lossless-rotl"))) >= 3


def test_fixtures_have_multi_chunk_and_empty_tensors():
    with Reader(rbe_path("v1/lossless-f32")) as r:
        chunk_counts = {e.name: len(e.blob.chunks) for e in r.manifest.tensors.values()}
    assert chunk_counts["weight.normal"] >= 3
    assert chunk_counts["weight.empty"] == 0


def test_model_dir_decodes_to_the_original_files(tmp_path):
    files = expected("v1/model-dir")["files"]
    with Reader(rbe_path("v1/model-dir")) as r:
        assert sorted(r.files()) == sorted(files)
        for path, digest in files.items():
            if r.files()[path].role == "file":
                assert sha256(r.read_file(path)) == digest, path
    out = tmp_path / "model"
    decode(rbe_path("v1/model-dir"), str(out))
    written = {p.relative_to(out).as_posix(): sha256(p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert written == files


def test_expected_safetensors_is_readable_by_the_reference_library():
    safetensors = pytest.importorskip("safetensors")
    for name in NAMES:
        tensors = expected_tensors(name)
        with safetensors.safe_open(golden.path(name, ".expected.safetensors"), "np") as f:
            assert sorted(f.keys()) == sorted(tensors)
            for tensor, (dtype, _, data) in tensors.items():
                if dtype not in ("BF16", "F8_E4M3"):  # numpy has no bfloat16 or fp8
                    assert f.get_tensor(tensor).tobytes() == data


@pytest.mark.parametrize("name", NAMES)
def test_encoding_is_deterministic_and_matches_the_committed_inputs(name, tmp_path):
    """Two encodings of the same input are identical and decode to the golden tensors."""
    fixture = make_fixtures.BUILDERS[name.split("/")[1]]()
    first, second = tmp_path / "a.rbe", tmp_path / "b.rbe"
    fixture.write(str(first))
    fixture.write(str(second))
    assert first.read_bytes() == second.read_bytes()
    table = expected(name)["tensors"]
    with Reader(first) as r:
        assert {t: sha256(r.tensor_bytes(t)) for t in r.keys()} == {t: v["sha256"] for t, v in table.items()}
