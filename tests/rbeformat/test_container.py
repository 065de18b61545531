"""The numpy API, the writer's guarantees and the reader's surface."""

import os

import numpy as np
import pytest

from rbeformat import (
    InputError,
    OutputExistsError,
    RbeError,
    Reader,
    UsageError,
    Writer,
    load_file,
    safe_open,
    save_file,
)
from rbeformat.codecs.blob.byteplane import Byteplane
from rbeformat.codecs.blob.raw import Raw


def sample(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((300, 70)) * 0.02).astype(np.float32),
        "h": rng.standard_normal(33).astype(np.float16),
        "i": np.arange(-5, 5, dtype=np.int64),
        "b": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float64),
    }


def test_save_load_roundtrip_bit_exact(tmp_path):
    path = tmp_path / "t.rbe"
    tensors = sample()
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == array.tobytes()
    with safe_open(path) as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("i").tolist() == list(range(-5, 5))
        assert list(f.verify(deep=True)) == []


def test_bf16_keeps_its_dtype_name(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x7FC1], np.uint16)  # 1.0, -2.0, a NaN payload
    with Writer(tmp_path / "b.rbe") as w:
        w.add_array("x", bits, dtype="BF16")
    with Reader(tmp_path / "b.rbe") as r:
        assert r.entry("x").dtype.name == "BF16"
        assert r.get_tensor("x").tobytes() == bits.tobytes()


def test_many_chunks_decode_in_parallel(tmp_path):
    data = (np.random.default_rng(3).standard_normal(100_003) * 0.1).astype(np.float32)
    with Writer(tmp_path / "c.rbe", codec=Byteplane(chunk_items=4096), threads=2) as w:
        w.add_array("x", data)
    with Reader(tmp_path / "c.rbe", threads=2) as r:
        assert len(r.entry("x").blob.chunks) == 25
        assert r.get_tensor("x").tobytes() == data.tobytes()


def test_duplicates_are_stored_once_as_aliases(tmp_path):
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    with Writer(tmp_path / "a.rbe") as w:
        assert w.add_array("embed", a) is None
        assert w.add_array("lm_head", a.copy()) == "embed"
        assert w.add_array("other", a.astype(np.float16)) is None  # same values, other dtype
    with Reader(tmp_path / "a.rbe") as r:
        assert r.entry("lm_head").alias_of == "embed"
        assert r.get_tensor("lm_head").tobytes() == a.tobytes()
    assert os.path.getsize(tmp_path / "a.rbe") < 1.5 * a.nbytes


def test_input_stats_go_into_a_stored_tensors_stats_and_never_an_alias(tmp_path):
    path = tmp_path / "s.rbe"
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    before = {"rel_error": 0.0931, "snr_db": 20.6, "max_abs_error": 0.5}
    with Writer(path) as w:
        w.add_array("a", values)
        w.add_array("b", values.copy())  # an alias of "a"
        w.set_input_stats("a", before)
        w.set_input_stats("b", before)
        with pytest.raises(UsageError):
            w.set_input_stats("a", 0.0931)
    with Reader(path) as r:
        assert r.entry("a").extra["stats"] == {"input": before}
        assert r.entry("b").alias_of == "a" and "stats" not in r.entry("b").extra
        np.testing.assert_array_equal(r.get_tensor("a"), values)


def test_writing_twice_gives_identical_bytes(tmp_path):
    for name in ("one.rbe", "two.rbe"):
        save_file(sample(), tmp_path / name)
    assert (tmp_path / "one.rbe").read_bytes() == (tmp_path / "two.rbe").read_bytes()


def test_existing_output_is_kept_without_force(tmp_path):
    path = tmp_path / "x.rbe"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        Writer(path)
    assert path.read_bytes() == b"precious"
    save_file({"a": np.ones(3, np.float32)}, path, force=True)
    assert load_file(path)["a"].tolist() == [1, 1, 1]


def test_failure_midway_leaves_nothing(tmp_path):
    path = tmp_path / "x.rbe"
    with pytest.raises(RuntimeError):
        with Writer(path) as w:
            w.add_array("a", np.ones(10, np.float32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_bad_entries_raise_input_error(tmp_path):
    with Writer(tmp_path / "x.rbe") as w:
        w.add_array("a", np.ones(2, np.float32))
        with pytest.raises(InputError):
            w.add_array("a", np.ones(2, np.float32))
        with pytest.raises(InputError):
            w.add_array("c", np.ones(2, np.complex64))
        with pytest.raises(InputError):
            w.add_file("../escape.txt", b"x")
        with pytest.raises(InputError):
            w.add_file("/abs.txt", b"x")


def test_raw_codec_tensors_are_plain_aligned_bytes(tmp_path):
    a = np.arange(1000, dtype=np.float32)
    with Writer(tmp_path / "r.rbe", codec=Raw()) as w:
        w.add_array("a", a)
    with Reader(tmp_path / "r.rbe", verify_checksums=False) as r:
        chunk = r.entry("a").blob.chunks[0]
        assert chunk.offset % 64 == 0 and chunk.length == a.nbytes
        assert r.get_tensor("a").tobytes() == a.tobytes()
    assert (tmp_path / "r.rbe").read_bytes()[chunk.offset : chunk.offset + a.nbytes] == a.tobytes()


def test_embedded_files_roundtrip(tmp_path):
    with Writer(tmp_path / "f.rbe") as w:
        w.add_file("1_Pooling/config.json", b'{"a": 1}')
        w.add_file("big.bin", bytes(range(256)) * 40000)
    with Reader(tmp_path / "f.rbe") as r:
        assert r.read_file("1_Pooling/config.json") == b'{"a": 1}'
        assert r.read_file("big.bin") == bytes(range(256)) * 40000
        with pytest.raises(RbeError):
            r.read_file("missing")
        with pytest.raises(RbeError):
            r.get_tensor("missing")


def test_an_unknown_dtype_name_is_an_input_error(tmp_path):
    with Writer(tmp_path / "d.rbe", force=True) as w:
        with pytest.raises(InputError, match="unsupported dtype 'F12'"):
            w.add_array("x", np.zeros(4, np.float32), dtype="F12")
