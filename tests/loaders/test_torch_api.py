"""torch through the safetensors-style API: safe_open(framework="pt") and rbe_loaders.torch."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rbe_loaders.torch import load_file, load_state_dict, save_file  # noqa: E402
from rbeformat import InputError, Reader, UsageError, Writer, safe_open  # noqa: E402
from rbeformat.codecs.blob.byteplane import Byteplane  # noqa: E402
from rbeformat.codecs.blob.raw import Raw  # noqa: E402


def bits(t: torch.Tensor) -> list:
    """Comparable values: the raw bits for one-byte floats, which have no exact equality in torch."""
    return t.view(torch.uint8).tolist() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t.tolist()


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    return {
        "f64": x.double(),
        "f32": x,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "e4m3": x.to(torch.float8_e4m3fn),
        "e5m2": x.to(torch.float8_e5m2),
        "i64": torch.arange(-3, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.tensor([-7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([65535], dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([7], dtype=torch.int64).to(torch.uint32),
        "u64": torch.tensor([9]).to(torch.uint64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }


def test_save_and_load_every_dtype(tmp_path):
    tensors = every_dtype()
    save_file(tensors, tmp_path / "t.rbe", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "t.rbe")
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert bits(loaded[name]) == bits(t), name
    with Reader(tmp_path / "t.rbe") as r:
        assert r.metadata() == {"format": "pt"}
        assert r.entry("bf16").dtype.name == "BF16" and r.entry("e5m2").dtype.name == "F8_E5M2"
        assert list(r.verify(deep=True)) == []


def test_safe_open_pt_gives_torch_tensors_and_slices(tmp_path):
    tensors = every_dtype()
    save_file(tensors, tmp_path / "t.rbe")
    for framework in ("pt", "torch"):
        with safe_open(tmp_path / "t.rbe", framework=framework, device="cpu") as f:
            for name, t in tensors.items():
                got = f.get_tensor(name)
                assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and bits(got) == bits(t), name
            sl = f.get_slice("bf16")
            assert sl.get_shape() == [6, 5] and sl.get_dtype() == "BF16"
            assert torch.equal(sl[1:4, ::2], tensors["bf16"][1:4, ::2])
            assert torch.equal(sl[-1], tensors["bf16"][-1])
            assert bits(f.get_slice("e4m3")[2:]) == bits(tensors["e4m3"][2:])
            assert f.get_slice("scalar")[...].item() == 2.5


def test_slices_read_only_their_chunks_in_torch_too(tmp_path):
    w = torch.randn(64, 100)
    with Writer(tmp_path / "c.rbe", codec=Byteplane(chunk_items=1000)) as writer:
        writer.add_array("w", w.numpy())
    with safe_open(tmp_path / "c.rbe", framework="pt") as f:
        part = f.get_slice("w")[20:29]  # elements 2000..2900: inside chunk 2 of 7
        assert f.chunks_decoded == 1 and torch.equal(part, w[20:29])


def test_a_raw_mapped_tensor_comes_back_writable(tmp_path):
    # With map_raw, raw tensors are views of the read-only map; torch gets a copy.
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with Writer(tmp_path / "r.rbe", codec=Raw()) as writer:
        writer.add_array("w", w.numpy())
    with safe_open(tmp_path / "r.rbe", framework="pt", verify_checksums=False, map_raw=True) as f:
        got = f.get_tensor("w")
        got += 1
        assert torch.equal(got, w + 1)


def test_shared_storage_is_stored_once_and_views_are_copied(tmp_path):
    emb = torch.randn(10, 4)
    tensors = {"embed": emb, "lm_head": emb, "rows": emb[2:5], "transposed": emb.t()}
    save_file(tensors, tmp_path / "s.rbe")
    with Reader(tmp_path / "s.rbe") as r:
        assert r.entry("lm_head").alias_of == "embed"
        assert r.entry("rows").alias_of is None and r.entry("transposed").alias_of is None
    loaded = load_file(tmp_path / "s.rbe")
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name
    assert loaded["embed"].data_ptr() != loaded["lm_head"].data_ptr()  # load_file: each its own
    state = load_state_dict(tmp_path / "s.rbe")
    assert state["embed"].data_ptr() == state["lm_head"].data_ptr()  # a state dict keeps the tie
    assert torch.equal(state["transposed"], emb.t())


def test_save_file_takes_grad_tensors_and_keeps_inputs(tmp_path):
    p = torch.randn(3, 3, requires_grad=True)
    before = p.detach().clone()
    save_file({"p": p}, tmp_path / "g.rbe")
    assert torch.equal(load_file(tmp_path / "g.rbe")["p"], before) and torch.equal(p.detach(), before)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.ones(2, np.float32), "expected a torch.Tensor, got ndarray"),
        (torch.zeros(2, dtype=torch.complex64), "complex64 has no rbe dtype"),
        (torch.zeros(3, 3).to_sparse(), "sparse"),
        (torch.empty(2, device="meta"), "cannot copy it from meta"),
    ],
)
def test_save_file_rejects_what_it_cannot_store(tmp_path, value, message):
    with pytest.raises(InputError, match=message):
        save_file({"x": value}, tmp_path / "x.rbe")
    assert os.listdir(tmp_path) == []


def test_devices_are_checked_when_opening(tmp_path):
    save_file({"w": torch.ones(2, 3)}, tmp_path / "d.rbe")
    with pytest.raises(UsageError, match="not usable"):
        safe_open(tmp_path / "d.rbe", framework="pt", device="no-such-device")
    # The meta device exercises the move to a device on any machine: shapes and dtypes, no data.
    moved = load_file(tmp_path / "d.rbe", device="meta")["w"]
    assert moved.device.type == "meta" and moved.shape == (2, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(tmp_path):
    w = torch.randn(40, 30).bfloat16()
    save_file({"w": w}, tmp_path / "cuda.rbe")
    with safe_open(tmp_path / "cuda.rbe", framework="pt", device="cuda:0") as f:
        got, rows = f.get_tensor("w"), f.get_slice("w")[5:9]
    assert got.device.type == "cuda" and torch.equal(got.cpu(), w) and torch.equal(rows.cpu(), w[5:9])
    assert load_state_dict(tmp_path / "cuda.rbe", device="cuda")["w"].is_cuda
