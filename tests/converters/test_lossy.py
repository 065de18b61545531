"""Codec chains through the container: round trips, accounting, hostile files."""

import json
import os

import numpy as np
import pytest
from conftest import make_model_dir

from rbe_converters.cli import main
from rbe_converters.evaluate.report import tensor_rows, totals
from rbeformat import FormatError, RbeError, Reader, UnsupportedError, Writer
from rbeformat.chain import parse_chain
from rbeformat.codecs.registry import TENSOR_CODECS
from rbeformat.layout import crc32, pack_footer

RNG = np.random.default_rng(7)
W = (RNG.standard_normal((128, 256)) * 0.02).astype(np.float32)

CHAINS = {
    "gquant(bits=4, group=32)": 0.12,
    "gquant(bits=4, group=64, mode=asym, scales=gquant(bits=8, group=0))": 0.12,
    "gquant(bits=8, group=0)": 0.02,
    "lowrank(rank=16, A=gquant(bits=4, group=32), B=gquant(bits=4, group=32), "
    "residual=nm24(values=gquant(bits=8, group=32)))": 0.5,
    "sparse(density=0.5, values=gquant(bits=8, group=32))": 0.3,
}


def chain(text):
    return parse_chain(text, TENSOR_CODECS)


def write(path, text, dtype="F32", array=W):
    with Writer(path, force=True) as w:
        stats = w.add_transformed("w", dtype, array, chain(text))
    return stats


@pytest.mark.parametrize("text, bound", sorted(CHAINS.items()))
def test_chain_roundtrip_within_bound_and_stats_match(tmp_path, text, bound):
    path = tmp_path / "c.rbe"
    stats = write(path, text)
    with Reader(path) as r:
        decoded = r.get_tensor("w")
        assert list(r.verify(deep=True)) == []
    rel = float(np.linalg.norm(decoded - W) / np.linalg.norm(W))
    assert rel < bound
    assert abs(rel - stats["rel_error"]) < 1e-6  # what info reports is what a reader gets


def test_bf16_and_f16_tensors_decode_to_their_dtype(tmp_path):
    bits = (W.view(np.uint32) >> 16).astype(np.uint16)
    write(tmp_path / "b.rbe", "gquant(bits=4, group=32)", "BF16", bits)
    write(tmp_path / "h.rbe", "gquant(bits=4, group=32)", "F16", W.astype(np.float16))
    with Reader(tmp_path / "b.rbe") as r:
        assert r.get_tensor("w").dtype == np.uint16
    with Reader(tmp_path / "h.rbe") as r:
        assert r.get_tensor("w").dtype == np.float16


def test_bit_accounting_adds_up_to_the_file_size(tmp_path):
    path = tmp_path / "c.rbe"
    with Writer(path) as w:
        w.add_transformed("q", "F32", W, chain("gquant(bits=4, group=32)"))
        w.add_transformed("l", "F32", W, chain("lowrank(rank=8, A=gquant(bits=4, group=32))"))
        w.add_array("bias", np.ones(16, np.float32))
    with Reader(path) as r:
        t = totals(r)
        rows = {row["name"]: row for row in tensor_rows(r)}
    assert t["tensor_stored_bytes"] + t["embedded_file_bytes"] + t["overhead_bytes"] == os.path.getsize(path)
    assert 3.9 < rows["q"]["bits_per_weight"] < 4.6  # 4-bit codes + one fp16 scale per 32, compressed
    assert rows["q"]["stats"]["rel_error"] > 0


def test_unknown_chainable_part_is_refused(tmp_path):
    with pytest.raises(RbeError):
        write(tmp_path / "x.rbe", "gquant(bits=4, group=32, codes=gquant(bits=8, group=0))")


def _rewrite_manifest(path, edit):
    data = bytearray(open(path, "rb").read())
    footer = data[-64:]
    offset, length = int.from_bytes(footer[8:16], "little"), int.from_bytes(footer[16:24], "little")
    stored = bytes(data[offset : offset + length])
    if footer[32] == 1:  # zstd-compressed manifest
        import zstandard

        stored = zstandard.ZstdDecompressor().decompress(stored)
    manifest = json.loads(stored)
    edit(manifest)
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    new = bytes(data[:offset]) + body
    new += b"\0" * (-len(new) % 64)
    new += pack_footer(offset, len(body), crc32(body))
    open(path, "wb").write(new)


def _tensor(m):
    return m["tensors"][0]


HOSTILE = {
    "codes shape": lambda m: _tensor(m)["parts"]["codes"].__setitem__("shape", [1]),
    "codes dtype": lambda m: _tensor(m)["parts"]["codes"].__setitem__("dtype", "F32"),
    "missing part": lambda m: _tensor(m)["parts"].pop("scales"),
    "extra part": lambda m: _tensor(m)["parts"].__setitem__("x", _tensor(m)["parts"]["codes"]),
    "bits 99": lambda m: _tensor(m)["codec"]["config"].__setitem__("bits", 99),
    "group 7": lambda m: _tensor(m)["codec"]["config"].__setitem__("group", 7),
    "unknown codec": lambda m: _tensor(m)["codec"].__setitem__("name", "quantum"),
    "huge shape": lambda m: _tensor(m).__setitem__("shape", [1 << 20, 1 << 20]),
    "int dtype": lambda m: _tensor(m).__setitem__("dtype", "I32"),
    "params not object": lambda m: _tensor(m).__setitem__("params", [1, 2]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_lossy_manifest_raises_project_error(tmp_path, name):
    path = tmp_path / "h.rbe"
    write(path, "gquant(bits=4, group=32)")
    _rewrite_manifest(path, HOSTILE[name])
    with pytest.raises(RbeError):
        with Reader(path) as r:
            r.get_tensor("w")


def test_hostile_lowrank_rank_and_chain_depth(tmp_path):
    path = tmp_path / "l.rbe"
    write(path, "lowrank(rank=8)")

    def absurd_rank(m):
        _tensor(m)["params"]["rank"] = 10**9

    _rewrite_manifest(path, absurd_rank)
    with pytest.raises(FormatError):
        Reader(path)


def test_unknown_codec_is_unsupported(tmp_path):
    path = tmp_path / "u.rbe"
    write(path, "gquant(bits=4, group=32)")
    _rewrite_manifest(path, lambda m: _tensor(m)["codec"].__setitem__("name", "future-codec"))
    with pytest.raises(UnsupportedError):
        Reader(path)


def test_cli_codec_and_recipe_on_a_model_directory(tmp_path, capsys):
    src = tmp_path / "model"
    tensors = make_model_dir(str(src))
    out = tmp_path / "q.rbe"
    assert main(["convert", str(src), str(out), "--quiet", "--codec", "gquant(bits=4, group=32)"]) == 0
    back = tmp_path / "back"
    assert main(["decode", str(out), str(back), "--quiet"]) == 0
    from safetensors.numpy import load_file

    first = load_file(str(back / "model-00001-of-00002.safetensors"))
    assert np.array_equal(first["layer.0.bias"], tensors["layer.0.bias"])  # 1-D: lossless
    err = np.linalg.norm(first["layer.0.weight"] - tensors["layer.0.weight"]) / np.linalg.norm(
        tensors["layer.0.weight"]
    )
    assert 0 < err < 0.15
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[rule]]\nmatch = "norm.weight"\ncodec = "normdelta(mode=bits)"\n'
        '[[rule]]\nmatch = "layer.*.weight"\nndim = 2\ncodec = "gquant(bits=8, group=64)"\n'
    )
    assert main(["convert", str(src), str(tmp_path / "r.rbe"), "--quiet", "--recipe", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "r.rbe")]) == 0
    text = capsys.readouterr().out
    assert "normdelta" in text and "gquant(bits=8" in text and "rel.err" in text
    with Reader(tmp_path / "r.rbe") as r:
        assert r.get_tensor("norm.weight").tobytes() == tensors["norm.weight"].tobytes()
        assert all(not k.startswith("rbe:") for k in r.keys())
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nmatch = "*"\ncodec = "nonsense(bits=4)"\n')
    assert main(["convert", str(src), str(tmp_path / "b.rbe"), "--quiet", "--recipe", str(bad)]) == 2  # a usage error
    assert not (tmp_path / "b.rbe").exists()


def test_large_manifests_are_stored_compressed_and_bounded(tmp_path):
    path = tmp_path / "many.rbe"
    with Writer(path) as w:
        for i in range(40):
            w.add_array(f"layer.{i}.weight", np.full(8, i, np.float32))
    data = path.read_bytes()
    assert data[-64 + 32] == 1  # zstd-stored manifest
    with Reader(path) as r:
        assert len(r.keys()) == 40 and list(r.verify()) == []
    import zstandard

    offset = int.from_bytes(data[-64 + 8 : -64 + 16], "little")
    bomb = zstandard.ZstdCompressor().compress(b" " * (65 * 1024 * 1024))
    hostile = data[:offset] + bomb
    hostile += b"\0" * (-len(hostile) % 64)
    hostile += pack_footer(offset, len(bomb), crc32(bomb), 1)
    (tmp_path / "bomb.rbe").write_bytes(hostile)
    with pytest.raises(FormatError, match="declares"):
        Reader(tmp_path / "bomb.rbe")
