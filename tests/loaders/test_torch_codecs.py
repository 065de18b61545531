"""rbe_loaders.torch.decoders: codec parts kept compressed in torch, decoded at each use, against the numpy reference."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rbe_craft import append_section, assemble, split_file, tensor  # noqa: E402

from rbe_loaders.torch import decoders as tc  # noqa: E402
from rbe_loaders.torch.decoders import base as tc_base  # noqa: E402
from rbe_loaders.torch.decoders import gquant as tc_gquant  # noqa: E402
from rbe_loaders.torch.decoders import sparse as tc_sparse  # noqa: E402
from rbeformat import FormatError, Reader, Writer  # noqa: E402
from rbeformat.chain import Chain, parse_chain  # noqa: E402
from rbeformat.codecs.blob.raw import Raw  # noqa: E402
from rbeformat.codecs.normdelta import NormDelta  # noqa: E402
from rbeformat.codecs.registry import TENSOR_CODECS  # noqa: E402
from rbeformat.layout import crc32  # noqa: E402
from rbeformat.spec import DTYPES  # noqa: E402
from rbeformat.values import to_float32  # noqa: E402

torch.set_num_threads(1)

INT4_TOLERANCE = 1e-2  # of the output scale: bf16 activations, scales and outputs (about 3e-3 measured)
EXACT_TOLERANCE = 1e-5  # of the output scale: float32 products in another order


def weights(shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)


def write(path, tensors: dict) -> str:
    """``tensors``: name -> (array, chain text, dtype); a chain of None stores the array losslessly."""
    with Writer(path, force=True, threads=1) as w:
        for name, (array, text, dtype) in tensors.items():
            if text is None:
                w.add_array(name, array, dedup=False)
            else:
                w.add_transformed(name, dtype, array, parse_chain(text, TENSOR_CODECS), dedup=False)
    return str(path)


def single(tmp_path, text, shape, seed=0, dtype="F32"):
    return write(tmp_path / "t.rbe", {"w": (weights(shape, seed), text, dtype)})


def reference(r: Reader, name: str) -> np.ndarray:
    return to_float32(r.get_tensor(name), r.entry(name).dtype.name)


def relative_error(got: torch.Tensor, want: np.ndarray) -> float:
    """Max abs error over the output's scale (its largest magnitude)."""
    return float(np.abs(got.double().numpy() - want).max() / max(np.abs(want).max(), 1e-30))


def check(
    r: Reader,
    name: str,
    *,
    kernel="int4",
    exact=True,
    linear_tolerance=EXACT_TOLERANCE,
    matmul_tolerance=EXACT_TOLERANCE,
    compressed=True,
) -> tc_base.WeightDecoder:
    """forward, rows, linear and matmul of the decoder against the reference decode; returns the decoder."""
    want = reference(r, name)
    dec = tc.build_decoder(r, name, kernel=kernel)
    assert dec is not None and tc.decode_at_load_reason(r, name) is None
    got = dec()
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    if exact:
        np.testing.assert_array_equal(got.numpy(), want)
    else:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    first = want.shape[0]
    index = torch.tensor([[0, first - 1], [first // 2, 0]])
    rows = dec.rows(index)
    np.testing.assert_allclose(
        rows.numpy(), want[index.numpy()], rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6 * np.abs(want).max()
    )
    np.testing.assert_array_equal(dec.rows(torch.tensor([-1])).numpy(), rows[0, 1:].numpy())
    if want.ndim == 2:
        rng = np.random.default_rng(5)
        x = rng.standard_normal((3, want.shape[1])).astype(np.float32)
        assert relative_error(dec.linear(torch.from_numpy(x)), x.astype(np.float64) @ want.T) < linear_tolerance
        x = rng.standard_normal((2, 2, want.shape[0])).astype(np.float32)
        assert relative_error(dec.matmul(torch.from_numpy(x)), x.astype(np.float64) @ want) < matmul_tolerance
    if compressed:
        assert dec.resident_bytes() < want.size * 4, (dec.resident_bytes(), dec.form)
    assert dec.form and isinstance(dec.resident_bytes(), int)
    return dec


# -- packed codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", list(range(1, 17)) + [21, 25])
def test_unpacking_matches_bitpack(bits):
    from rbeformat.codecs.util import bitpack

    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 9, 101):
        values = rng.integers(0, 2**bits, count)
        packed = torch.from_numpy(tc_base.padded_packed(bitpack.pack(values, bits), bits, count))
        if bits <= 16:
            np.testing.assert_array_equal(tc_base.unpack(packed, bits, count).long().numpy(), values)
        positions = rng.integers(0, max(count, 1), (3, 5)) if count else np.zeros((0,), np.int64)
        np.testing.assert_array_equal(
            tc_base.unpack_at(packed, bits, torch.from_numpy(positions)).numpy(), values[positions]
        )


# -- gquant ---------------------------------------------------------------------------------------

GQUANT_CASES = {  # name: (shape, group, scale dtype, fits the int4 kernel)
    "a": ((32, 64), 32, "F16", True),
    "b": ((48, 100), 32, "F16", True),  # K not a multiple of the group: K padded
    "c": ((16, 72), 0, "F16", True),  # one scale for the tensor
    "d": ((20, 48), 16, "F16", False),  # a group the kernel's groups do not fit in
    "e": ((40, 128), 64, "F32", True),  # N not a multiple of 16: rows padded
    "f": ((4, 6, 40), 16, "F32", False),  # not a matrix
    "g": ((50,), 0, "F16", False),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_gquant_decodes_exactly_and_runs_the_int4_kernel_where_it_fits(tmp_path, bits, mode):
    tensors = {
        name: (weights(shape, i), f"gquant(bits={bits}, group={group}, mode={mode}, scale_dtype={sd})", "F32")
        for i, (name, (shape, group, sd, _)) in enumerate(GQUANT_CASES.items())
    }
    with Reader(write(tmp_path / "g.rbe", tensors)) as r:
        for name, (shape, _, _, fits) in GQUANT_CASES.items():
            dec = check(r, name, linear_tolerance=INT4_TOLERANCE if fits else EXACT_TOLERANCE)
            assert (dec.int4 is not None) == fits, (name, dec.int4_reason)
            assert ("int4 kernel" in dec.form) == fits
            if fits:
                assert dec.int4.planes == (1 if bits <= 4 else 2)
                exact = check(r, name, kernel="exact")  # the same weight without the kernel
                assert exact.int4 is None and exact.int4_reason == "not asked for"
            elif len(shape) == 2:
                assert "group 16 is not a multiple of 32" in dec.int4_reason


def test_int4_kernel_error_is_within_its_documented_size(tmp_path):
    path = single(tmp_path, "gquant(bits=4, group=64, mode=asym)", (64, 256))
    with Reader(path) as r:
        want = reference(r, "w")
        dec = tc.build_decoder(r, "w")
        x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
        error = relative_error(dec.linear(x), x.double().numpy() @ want.T)
        assert 1e-4 < error < 6e-3  # bf16: far from exact, and about 0.3% of the output scale
        assert dec.linear(x.to(torch.bfloat16)).dtype == torch.bfloat16
        assert dec.linear(x[0]).shape == (64,)


def test_int4_fit_rules():
    codec = TENSOR_CODECS["gquant"](bits=4, group=96)
    assert tc_gquant.int4_kernel_fits(codec, (16, 192))  # kernel group 32 inside each group of 96
    assert tc_gquant.int4_unfit_reason(codec, (16, 192), "meta").startswith("the int4 kernel runs on the CPU")
    assert "not a non-empty matrix" in tc_gquant.int4_unfit_reason(codec, (16, 0))
    assert not tc_gquant.int4_kernel_fits(TENSOR_CODECS["gquant"](bits=4, group=48), (16, 96))
    assert (
        tc_gquant.int4_kernel_group(0, 72) == 32
        and tc_gquant.int4_kernel_group(256, 64) == 64
        and tc_gquant.int4_kernel_group(128, 512) == 128
    )


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_narrow_tensors_come_back_rounded_as_the_reader_rounds_them(tmp_path, dtype):
    array = weights((32, 64))
    stored = array.astype(np.float16) if dtype == "F16" else (array.view(np.uint32) >> 16).astype(np.uint16)
    path = write(
        tmp_path / "n.rbe",
        {"q": (stored, "gquant(bits=5, group=32, mode=asym)", dtype), "l": (stored, "lowrank(rank=8)", dtype)},
    )
    with Reader(path) as r:
        check(r, "q", kernel="exact")
        check(r, "l", exact=False)


def test_chained_scales_and_zeros_are_child_decoders(tmp_path):
    text = "gquant(bits=4, group=32, mode=asym, scales=gquant(bits=8, group=0), zeros=gquant(bits=8, group=32))"
    with Reader(single(tmp_path, text, (32, 96))) as r:
        dec = check(r, "w", linear_tolerance=INT4_TOLERANCE)
        assert isinstance(dec.scales, tc_gquant.GQuantDecoder) and isinstance(dec.zeros, tc_gquant.GQuantDecoder)
        assert "scales: gquant 8-bit g0 sym" in dec.form and dec.int4 is not None
        # Scales are never a Linear weight: no int4 kernel built for them.
        assert dec.zeros.int4 is None and dec.zeros.int4_reason == "not read as a Linear weight"


# -- transpose and lowrank ------------------------------------------------------------------------


def test_transpose_of_gquant_runs_matmul_on_the_int4_kernel(tmp_path):
    # A MatMul weight B (K=64 in, N=48 out) stored as values = B.T (N, K), grouped along its input axis.
    path = write(
        tmp_path / "t.rbe",
        {
            "b": (weights((64, 48)), "transpose(values=gquant(bits=4, group=32))", "F32"),
            "plain": (weights((24, 40)), "transpose", "F32"),
            "p": (weights((40, 64)), "transpose(values=palette(bits=4))", "F32"),
        },
    )
    with Reader(path) as r:
        dec = check(r, "b", matmul_tolerance=INT4_TOLERANCE)
        assert dec.values.int4 is not None and dec.form.startswith("transpose of [gquant 4-bit g32 sym")
        check(r, "b", kernel="exact")
        check(r, "plain", compressed=False)
        check(r, "p")


@pytest.mark.parametrize(
    "text, kernel_used",
    [
        ("lowrank(rank=8)", False),
        ("lowrank(rank=32, A=gquant(bits=4, group=32), B=gquant(bits=4, group=32))", True),
        (
            "lowrank(rank=8, A=gquant(bits=6, group=16, mode=asym), B=palette(bits=4, scope=row), "
            "residual=nm24(values=gquant(bits=8, group=32)))",
            False,
        ),
        ("lowrank(rank=8, A=posdct(keep=16), residual=sparse(density=0.2))", False),
    ],
)
def test_lowrank_runs_linear_as_two_matmuls(tmp_path, text, kernel_used):
    with Reader(single(tmp_path, text, (64, 96), seed=3)) as r:
        tolerance = 3 * INT4_TOLERANCE if kernel_used else EXACT_TOLERANCE
        dec = check(
            r, "w", exact=False, linear_tolerance=tolerance, compressed="residual" not in text or "gquant" in text
        )
        if kernel_used:
            assert dec.A.int4 is not None and dec.B.int4 is not None
            check(r, "w", exact=False, kernel="exact")
        if "posdct" in text:  # a part whose codec has no mapping: decoded once, at build
            assert isinstance(dec.A, torch.Tensor) and "A: decoded at build from posdct" in dec.form


# -- palette, vq, sparse, nm24 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "palette(bits=1, scope=tensor)",
        "palette(bits=4, scope=tensor)",
        "palette(bits=8, scope=tensor, codebook_dtype=F32)",
        "palette(bits=3, scope=row)",
        "palette(bits=2, scope=group, group=16)",
    ],
)
def test_palette(tmp_path, text):
    with Reader(single(tmp_path, text, (24, 40), seed=4)) as r:  # rows of 40: groups of 16, 16 and 8
        check(r, "w")


@pytest.mark.parametrize(
    "text, shape",
    [
        ("vq(dim=4, bits=4)", (24, 64)),
        ("vq(dim=8, bits=10, scale=tensor)", (64, 128)),  # 1024 centroids: 10-bit indices
        ("vq(dim=4, bits=6, codebook=gquant(bits=8, group=0), scales=gquant(bits=8, group=0))", (32, 64)),
    ],
)
def test_vq(tmp_path, text, shape):
    with Reader(single(tmp_path, text, shape, seed=5)) as r:
        dec = check(r, "w")
        if "codebook=" in text:
            assert isinstance(dec.codebook, tc_gquant.GQuantDecoder) and isinstance(dec.scales, tc_gquant.GQuantDecoder)


@pytest.mark.parametrize(
    "text, index",
    [
        ("sparse(density=0.5)", "mask"),
        ("sparse(density=0.02)", "deltas"),
        ("sparse(density=0.3, values=gquant(bits=8, group=32))", None),
    ],
)
def test_sparse(tmp_path, text, index, monkeypatch):
    with Reader(single(tmp_path, text, (32, 64), seed=6)) as r:
        if index is not None:
            assert r.stored_entry("w").transform.params["index"] == index
        check(r, "w", compressed="0.5" not in text)
        if index == "deltas":  # codes wider than unpack_at reads are held as a mask instead
            monkeypatch.setattr(tc_sparse, "MAX_GATHER_BITS", 1)
            dec = check(r, "w")
            assert dec.index == "mask" and not hasattr(dec, "deltas")


@pytest.mark.parametrize(
    "text, shape", [("nm24", (16, 40)), ("nm24", (3, 12)), ("nm24(values=gquant(bits=4, group=16))", (32, 64))]
)
def test_nm24(tmp_path, text, shape):
    with Reader(single(tmp_path, text, shape, seed=7)) as r:
        check(r, "w", compressed="gquant" in text)


# -- seed -------------------------------------------------------------------------------------------


def test_seed_decodes_exactly_from_one_shared_table_per_setting(tmp_path):
    path = write(
        tmp_path / "s.rbe",
        {
            "a": (weights((16, 64), 1), "seed(block=8, rank=3, seed_bits=12)", "F32"),
            "b": (weights((8, 32), 2), "seed(block=8, rank=3, seed_bits=12)", "F32"),
            "c": (weights((8, 48), 3), "seed(block=4, rank=2, seed_bits=8, coef_bits=3, exp_bits=5)", "F32"),
        },
    )
    tables: dict = {}
    with Reader(path) as r:
        for name in "abc":
            check(r, name)
        a, b, c = (tc.build_decoder(r, name, tables=tables) for name in "abc")
        assert a.table is b.table and a.table is not c.table and len(tables) == 2
        assert a.table.dtype == torch.int16 and c.table.dtype == torch.int8
        assert tc.shared_bytes([a, b, c]) == 2**12 * 8 * 3 * 2 + 2**8 * 4 * 2


# -- what gets no decoder ---------------------------------------------------------------------------


def test_plain_and_unmapped_tensors_get_no_decoder(tmp_path):
    base = np.array([1.0, 0.5, -2.0, 0.25], np.float32)
    smooth = np.cos(np.outer(np.arange(64) / 64, [1.0, 2.0, 3.0])).astype(np.float32)
    path = tmp_path / "u.rbe"
    with Writer(path, threads=1) as w:
        w.add_array("plain", weights((4, 4)))
        w.add_transformed("pos", "F32", smooth, parse_chain("posdct(keep=8)", TENSOR_CODECS))
        w.add_array("rbe:base/F32/4", base, dedup=False, internal=True)
        w.add_transformed(
            "ln", "F32", base + 0.0625, Chain(NormDelta("rbe:base/F32/4", "float"), {}), refs={"rbe:base/F32/4": base}
        )
    with Reader(path) as r:
        for name, reason in (
            ("plain", "stored losslessly"),
            ("pos", "posdct has no torch mapping"),
            ("ln", "normdelta reads other tensors (rbe:base/F32/4)"),
        ):
            assert tc.build_decoder(r, name) is None
            assert tc.decode_at_load_reason(r, name) == reason
        with pytest.raises(ValueError, match="kernel"):
            tc.build_decoder(r, "pos", kernel="fast")


# -- malformed parts ----------------------------------------------------------------------------------


def with_part(path, name: str, part: str, payload: bytes) -> str:
    """A copy of the file whose ``part`` of tensor ``name`` holds ``payload`` (stored raw, same length)."""
    area, manifest = split_file(open(path, "rb").read())
    area, offset = append_section(area, payload)
    entry = tensor(manifest, name)["parts"][part]
    items = len(payload) // DTYPES[entry["dtype"]].itemsize
    entry.update(
        codec=Raw().describe(),
        digest="sha256:" + hashlib.sha256(payload).hexdigest(),
        chunks=[{"offset": offset, "length": len(payload), "crc32": crc32(payload), "items": items, "params": {}}],
    )
    out = str(path) + ".bad.rbe"
    with open(out, "wb") as fh:
        fh.write(assemble(area, manifest))
    return out


def bad_values(path, part: str, bits: int, count: int, edit) -> str:
    """The file with part ``part`` (``count`` values of ``bits`` bits) unpacked, edited and packed again."""
    from rbeformat.codecs.util import bitpack

    with Reader(path) as r:
        values = bitpack.unpack(r.get_part("w", part), bits, count).astype(np.int64)
    edit(values)
    return with_part(path, "w", part, bitpack.pack(values, bits).tobytes())


@pytest.mark.parametrize(
    "text, shape, part, bits, count, edit, message",
    [
        # 6 vectors: k = 6 centroids with 3-bit indices, so index 7 is past the codebook.
        ("vq(dim=4, bits=4)", (3, 8), "indices", 3, 6, lambda v: v.__setitem__(2, 7), "index 7 out of range"),
        (
            "seed(block=8, rank=3, seed_bits=8)",
            (2, 16),
            "seeds",
            8,
            4,
            lambda v: v.__setitem__(1, 0),
            "seed 0 is invalid",
        ),
        ("nm24", (2, 8), "patterns", 13, 1, lambda v: v.__setitem__(0, 7776), "not below 6\\*\\*5"),
        ("nm24", (2, 8), "patterns", 13, 1, lambda v: v.__setitem__(0, 6**4), "padding groups"),
    ],
)
def test_out_of_range_indices_raise_format_error(tmp_path, text, shape, part, bits, count, edit, message):
    path = bad_values(single(tmp_path, text, shape), part, bits, count, edit)
    with Reader(path) as r:
        with pytest.raises(FormatError, match=message):
            r.get_tensor("w")  # the reference refuses it too
        with pytest.raises(FormatError, match=message):
            tc.build_decoder(r, "w")


def test_non_finite_scales_and_bad_sparse_masks_raise_format_error(tmp_path):
    path = single(tmp_path, "gquant(bits=4, group=32, scale_dtype=F32)", (4, 32))
    with Reader(path) as r:
        scales = r.get_part("w", "scales").copy()
    scales[2, 0] = np.inf
    with Reader(with_part(path, "w", "scales", scales.tobytes())) as r:
        with pytest.raises(FormatError, match="NaN or infinite"):
            tc.build_decoder(r, "w")
    path = single(tmp_path, "sparse(density=0.5)", (3, 5))  # 15 elements: one padding bit in the mask
    with Reader(path) as r:
        mask = r.get_part("w", "mask").copy()
    mask[-1] |= 0x80
    with Reader(with_part(path, "w", "mask", mask.tobytes())) as r:
        with pytest.raises(FormatError, match="padding bits"):
            tc.build_decoder(r, "w")


def test_rows_out_of_range_is_an_index_error(tmp_path):
    with Reader(single(tmp_path, "gquant(bits=4, group=32)", (8, 32))) as r:
        dec = tc.build_decoder(r, "w")
        with pytest.raises(IndexError):
            dec.rows(torch.tensor([8]))
        assert dec.rows(torch.tensor([], dtype=torch.int64)).shape == (0, 32)
        assert math.prod(dec.rows(torch.tensor(3)).shape) == 32
