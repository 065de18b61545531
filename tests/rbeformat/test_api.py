"""The safetensors-style numpy API: safe_open, get_slice, save_file and load_file."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from rbeformat import (
    EmbeddedFileNotFoundError,
    FileMissingError,
    FormatError,
    InputError,
    OutputExistsError,
    RbeError,
    Reader,
    TensorNotFoundError,
    UsageError,
    UsageTypeError,
    Writer,
    load_file,
    safe_open,
    save_file,
)
from rbeformat.chain import parse_chain
from rbeformat.codecs.blob.byteplane import Byteplane
from rbeformat.codecs.registry import TENSOR_CODECS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def grid():
    """A 2-D tensor whose 4096-element chunks end in the middle of its 70-element rows."""
    return (np.random.default_rng(1).standard_normal((300, 70)) * 0.02).astype(np.float32)


@pytest.fixture
def grid_file(tmp_path, grid):
    path = tmp_path / "g.rbe"
    with Writer(path, codec=Byteplane(chunk_items=4096)) as w:
        w.add_array("g", grid)
        w.add_array("tied", grid.copy())  # stored as an alias of "g"
        w.add_array("scalar", np.array(2.5, np.float64))
        w.add_array("bits", np.arange(12, dtype=np.uint16).reshape(3, 4), dtype="BF16")
        w.set_metadata({"format": "pt"})
    return path


def test_safe_open_numpy_names_and_device(grid_file, grid):
    for framework in ("np", "numpy"):
        with safe_open(grid_file, framework=framework, device="cpu") as f:
            assert f.keys() == ["bits", "g", "scalar", "tied"]  # sorted, as safetensors' keys()
            assert f.metadata() == {"format": "pt"}
            assert f.get_tensor("g").tobytes() == grid.tobytes()
    with safe_open(grid_file) as f:  # numpy is the default
        assert isinstance(f.get_tensor("g"), np.ndarray)


def test_unknown_framework_lists_the_valid_ones(grid_file):
    with pytest.raises(UsageError, match="np, numpy, pt, torch"):
        safe_open(grid_file, framework="tf")
    with pytest.raises(UsageError, match="device must be 'cpu'"):
        safe_open(grid_file, framework="np", device="cuda:0")


INDEXES = [
    slice(2, 7),
    slice(None),
    slice(58, 120),
    (slice(58, 120), slice(3, 9)),
    3,
    -1,
    (5, 6),
    (-300, -70),
    (Ellipsis, 0),
    (Ellipsis,),
    (slice(None, None, -2),),
    (slice(250, 30, -7), slice(None, None, 3)),
    slice(5, 5),
    slice(280, 1000),
    slice(-10, None),
    (slice(1, 299, 17), Ellipsis, slice(-4, None)),
    np.int64(42),
]


@pytest.mark.parametrize("key", INDEXES, ids=repr)
def test_get_slice_matches_numpy_indexing(grid_file, grid, key):
    with safe_open(grid_file) as f:
        for name in ("g", "tied"):
            part = f.get_slice(name)[key]
            assert part.dtype == grid.dtype and part.shape == grid[key].shape
            assert part.tobytes() == np.ascontiguousarray(grid[key]).tobytes()


def test_slice_shape_dtype_and_bits(grid_file):
    with safe_open(grid_file) as f:
        sl = f.get_slice("g")
        assert sl.get_shape() == [300, 70] and sl.get_dtype() == "F32"
        bits = f.get_slice("bits")
        assert bits.get_dtype() == "BF16"
        assert bits[1:].dtype == np.uint16 and bits[1:].tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
        scalar = f.get_slice("scalar")
        assert scalar.get_shape() == [] and scalar[...].shape == () and scalar[()] == 2.5


@pytest.mark.parametrize(
    "key",
    [(1, 2, 3), None, [1, 2], 300, -301, slice(0, 4, 0), (Ellipsis, Ellipsis), slice("a", 3), (slice(None), 70), True],
)
def test_bad_slice_indexes_are_usage_errors(grid_file, key):
    with safe_open(grid_file) as f:
        with pytest.raises(UsageError):
            f.get_slice("g")[key]


def test_get_slice_of_an_unknown_name(grid_file):
    with safe_open(grid_file) as f:
        with pytest.raises(RbeError, match="no tensor named 'nope'"):
            f.get_slice("nope")


@pytest.mark.parametrize(
    "ask", [lambda f: f.get_tensor("nope"), lambda f: f.get_slice("nope"), lambda f: f.entry("nope")]
)
def test_an_unknown_tensor_is_a_key_error_as_in_a_dict(grid_file, ask):
    with safe_open(grid_file) as f:
        with pytest.raises(KeyError) as caught:
            ask(f)
    assert isinstance(caught.value, TensorNotFoundError) and isinstance(caught.value, InputError)
    assert str(caught.value) == f"{grid_file}: no tensor named 'nope'"  # not KeyError's quoted repr


def test_an_unknown_embedded_file_is_a_key_error(grid_file):
    with safe_open(grid_file) as f:
        with pytest.raises(KeyError, match="no embedded file 'config.json'") as caught:
            f.read_file("config.json")
    assert isinstance(caught.value, EmbeddedFileNotFoundError) and isinstance(caught.value, RbeError)


@pytest.mark.parametrize("opener", [safe_open, Reader, load_file])
def test_a_missing_file_is_a_file_not_found_error(tmp_path, opener):
    missing = tmp_path / "nope.rbe"
    with pytest.raises(FileNotFoundError) as caught:
        opener(missing)
    error = caught.value
    assert isinstance(error, FileMissingError) and isinstance(error, InputError)
    assert error.filename == str(missing) and error.errno == 2
    assert str(error) == f"{missing}: cannot open (No such file or directory)"  # one line, not "[Errno 2] ..."


def _damaged_copy(source, tmp_path, name, damage):
    data = bytearray(source.read_bytes())
    damage(data)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def _flip_first_chunk(data: bytearray) -> None:
    data[64] ^= 0xFF  # the first byte after the 64-byte header: tensor "g"'s first chunk


@pytest.mark.parametrize(
    "name, damage, reads",
    [
        ("cut.rbe", lambda data: data.__delitem__(slice(len(data) // 2, None)), "opening"),
        ("header.rbe", lambda data: data.__setitem__(10, data[10] ^ 0xFF), "opening"),
        ("chunk.rbe", _flip_first_chunk, "get_tensor"),
        ("chunk-slice.rbe", _flip_first_chunk, "get_slice"),
    ],
)
def test_a_damaged_files_error_names_the_file(grid_file, tmp_path, name, damage, reads):
    """A program reading several files sees which one is damaged, as the command line says."""
    path = _damaged_copy(grid_file, tmp_path, name, damage)
    with pytest.raises(FormatError) as caught:
        with safe_open(path) as f:
            if reads == "get_tensor":
                f.get_tensor("g")
            elif reads == "get_slice":
                f.get_slice("g")[:2]
    assert str(caught.value).startswith(f"{path}: ") and str(path) not in str(caught.value)[len(str(path)) :]


def test_verify_lines_do_not_name_the_file_they_are_about(grid_file, tmp_path):
    """rbe verify prefixes each line with the file's name once; a deep check's lines come without it."""
    path = _damaged_copy(grid_file, tmp_path, "chunk.rbe", _flip_first_chunk)
    with Reader(path) as r:
        problems = list(r.verify(deep=True))
    assert len(problems) >= 2 and not any(str(path) in line for line in problems), problems


def test_bad_argument_values_are_value_errors(grid_file):
    with pytest.raises(ValueError, match="framework 'tf' is not supported"):
        safe_open(grid_file, framework="tf")
    with pytest.raises(ValueError, match="device must be 'cpu'"):
        safe_open(grid_file, device="cuda")
    with safe_open(grid_file) as f:
        with pytest.raises(ValueError, match="out of range"):
            f.get_slice("g")[400]


@pytest.mark.parametrize(
    "tensors,metadata",
    [([np.ones(2)], None), ({1: np.ones(2)}, None), ({"a": [1.0, 2.0]}, None), ({"a": np.ones(2)}, "meta")],
)
def test_arguments_of_the_wrong_type_are_type_errors(tmp_path, tensors, metadata):
    with pytest.raises(TypeError) as caught:
        save_file(tensors, tmp_path / "x.rbe", metadata)
    assert isinstance(caught.value, UsageTypeError) and isinstance(caught.value, InputError)
    assert not (tmp_path / "x.rbe").exists()


def _overlapping(chunks, first: int, stop: int) -> int:
    count, start = 0, 0
    for c in chunks:
        count += start < stop and start + c.items > first
        start += c.items
    return count


def test_a_row_range_decodes_only_the_chunks_holding_it(tmp_path, monkeypatch):
    # 3M float32 elements: byteplane's default (at most 4 MiB) chunks end inside rows of 1200.
    weights = np.random.default_rng(2).standard_normal((2500, 1200)).astype(np.float32)
    save_file({"w": weights, "tied": weights.copy()}, tmp_path / "big.rbe")
    decoded = []
    original = Byteplane.decode_chunk

    def counting(self, payload, params, dtype, out, where):
        decoded.append(where)
        return original(self, payload, params, dtype, out, where)

    monkeypatch.setattr(Byteplane, "decode_chunk", counting)
    with safe_open(tmp_path / "big.rbe") as f:
        chunks = f.stored_entry("w").blob.chunks
        assert len(chunks) >= 3
        for name, rows in [
            ("w", (0, 1)),
            ("w", (800, 900)),
            ("w", (1000, 1500)),
            ("tied", (2400, 2500)),
            ("w", (2499, 2500)),
        ]:
            decoded.clear()
            before = f.chunks_decoded
            part = f.get_slice(name)[rows[0] : rows[1], 7:]
            expected = _overlapping(chunks, rows[0] * 1200, rows[1] * 1200)
            assert expected < len(chunks)
            assert len(decoded) == expected == f.chunks_decoded - before
            assert part.tobytes() == weights[rows[0] : rows[1], 7:].tobytes()
        decoded.clear()
        assert f.get_tensor("w").tobytes() == weights.tobytes()
        assert len(decoded) == len(chunks)


def test_a_transformed_tensor_is_decoded_whole_then_cut(tmp_path, grid):
    with Writer(tmp_path / "q.rbe") as w:
        w.add_transformed("q", "F32", grid, parse_chain("gquant(bits=4, group=32)", TENSOR_CODECS))
    with safe_open(tmp_path / "q.rbe") as f:
        whole = f.get_tensor("q")
        assert f.get_slice("q")[10:20, ::3].tobytes() == np.ascontiguousarray(whole[10:20, ::3]).tobytes()
        assert f.get_slice("q")[-1].tobytes() == whole[-1].tobytes()


def test_numpy_path_never_imports_torch(grid_file):
    code = (
        "import sys, rbeformat\n"
        "with rbeformat.safe_open(sys.argv[1], framework='np') as f:\n"
        "    f.get_tensor('g'); f.get_slice('g')[1:3]\n"
        "rbeformat.load_file(sys.argv[1])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(grid_file)], check=True, cwd=ROOT)


def test_framework_pt_without_torch_says_how_to_install_it(grid_file):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "import rbeformat\n"
        "try:\n"
        "    rbeformat.safe_open(sys.argv[1], framework='pt')\n"
        "except ImportError as exc:  # a MissingExtraError: also a UsageError\n"
        "    print(isinstance(exc, rbeformat.UsageError), exc.name, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(grid_file)], check=True, cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert out.startswith("True torch ") and "needs torch" in out and "pip install 'rbe[hf]'" in out


# -- save_file / load_file ------------------------------------------------------------


def test_save_file_keeps_bf16_through_dtypes(tmp_path):
    bits = np.array([[0x3F80, 0xC000], [0x7FC1, 0x0001]], np.uint16)
    save_file({"b": bits, "u": bits}, tmp_path / "b.rbe", dtypes={"b": "BF16"})
    with Reader(tmp_path / "b.rbe") as r:
        assert r.entry("b").dtype.name == "BF16" and r.entry("u").dtype.name == "U16"
    loaded = load_file(tmp_path / "b.rbe")
    assert loaded["b"].tobytes() == bits.tobytes() and loaded["b"].dtype == np.uint16


@pytest.mark.parametrize(
    "tensors, error, message",
    [
        ({"a": [1.0, 2.0]}, InputError, "expected a numpy array, got list"),
        ({"a": 3.0}, InputError, "expected a numpy array, got float"),
        ({1: np.ones(2)}, InputError, "names must be strings"),
        ([("a", np.ones(2))], InputError, "dict of name -> numpy array"),
        ({"a": np.ones(2, object)}, InputError, "has no rbe dtype"),
    ],
)
def test_save_file_rejects_what_is_not_numpy(tmp_path, tensors, error, message):
    with pytest.raises(error, match=message):
        save_file(tensors, tmp_path / "x.rbe")
    assert os.listdir(tmp_path) == []


def test_save_file_points_torch_users_to_the_torch_module(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(InputError, match=r"rbe_loaders\.torch\.save_file"):
        save_file({"w": torch.ones(2)}, tmp_path / "x.rbe")
    assert os.listdir(tmp_path) == []


def test_save_file_checks_dtypes_and_metadata(tmp_path):
    with pytest.raises(UsageError, match="unknown dtype 'F12'"):
        save_file({"a": np.ones(2, np.uint16)}, tmp_path / "x.rbe", dtypes={"a": "F12"})
    with pytest.raises(UsageError, match="not among the tensors"):
        save_file({"a": np.ones(2, np.uint16)}, tmp_path / "x.rbe", dtypes={"b": "BF16"})
    with pytest.raises(InputError, match="itemsize|2-byte items"):
        save_file({"a": np.ones(2, np.float32)}, tmp_path / "x.rbe", dtypes={"a": "BF16"})
    with pytest.raises(InputError, match="metadata"):
        save_file({"a": np.ones(2)}, tmp_path / "x.rbe", metadata={"n": 1})
    with pytest.raises(InputError, match="metadata"):
        save_file({"a": np.ones(2)}, tmp_path / "x.rbe", metadata=[("n", "1")])
    assert os.listdir(tmp_path) == []


def test_save_file_replaces_like_safetensors_unless_told_not_to(tmp_path):
    path = tmp_path / "x.rbe"
    save_file({"a": np.ones(3, np.float32)}, path)
    save_file({"a": np.zeros(2, np.float32)}, path)
    assert load_file(path)["a"].tolist() == [0, 0]
    with pytest.raises(OutputExistsError):
        save_file({"a": np.ones(3, np.float32)}, path, force=False)
    assert load_file(path)["a"].tolist() == [0, 0]


def test_a_failed_save_leaves_the_existing_file_alone(tmp_path):
    path = tmp_path / "x.rbe"
    path.write_bytes(b"precious")
    with pytest.raises(InputError):
        save_file({"a": np.ones(3, np.float32), "b": np.ones(2, object)}, path)
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["x.rbe"]


def test_save_file_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        save_file({"a": np.ones(2)}, tmp_path / "dir")
    assert os.listdir(tmp_path / "dir") == []
    with pytest.raises(RbeError, match="cannot write"):
        save_file({"a": np.ones(2)}, tmp_path / "missing" / "x.rbe")


def test_load_file_gives_aliases_their_own_arrays(grid_file, grid):
    loaded = load_file(grid_file)
    assert sorted(loaded) == ["bits", "g", "scalar", "tied"]
    assert loaded["tied"].tobytes() == grid.tobytes()
    loaded["g"][0, 0] = 99
    assert loaded["tied"][0, 0] == grid[0, 0]


def test_load_file_of_a_missing_file(tmp_path):
    with pytest.raises(RbeError, match="cannot open"):
        load_file(tmp_path / "nope.rbe")


def test_safe_open_lists_keys_as_safetensors_does(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open as st_safe_open

    arrays = {name: np.full(3, i, np.float32) for i, name in enumerate(["b.10", "b.2", "a", "B", "c"])}
    st.save_file(arrays, str(tmp_path / "m.safetensors"))
    with Writer(tmp_path / "m.rbe") as w:
        for name, array in arrays.items():  # written in this order, not sorted
            w.add_array(name, array)
    with st_safe_open(str(tmp_path / "m.safetensors"), "np") as theirs, safe_open(tmp_path / "m.rbe") as ours:
        assert ours.keys() == theirs.keys()
