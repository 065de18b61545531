"""palette: k-means quality, exactness on few values, bit cost, determinism, hostile parts, the GPTQ encoder."""

import numpy as np
import pytest
from harness import check_contract, rel_err, roundtrip
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import gptq_problem

from rbeformat import FormatError
from rbeformat.codecs.core.tensor import Calibration, PartSpec
from rbeformat.codecs.encoders import gptq
from rbeformat.codecs.gquant import GroupQuant
from rbeformat.codecs.palette import Palette, fit_codebooks
from rbeformat.codecs.util import bitpack

RNG = np.random.default_rng(99)
NORMAL = RNG.standard_normal((64, 256)).astype(np.float32) * 0.02
HEAVY = RNG.standard_t(3, (64, 256)).astype(np.float32) * 0.02  # Student t, 3 dof: weights with outliers
# Mean squared error of the optimal (Lloyd-Max) quantizer of a unit normal, by bits.
LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499}


@pytest.mark.parametrize(
    "codec,bound",
    [
        (Palette(4, "tensor"), 0.18),  # measured 0.165
        (Palette(3, "row"), 0.22),  # measured 0.203
        (Palette(2, "group", 64, "F32"), 0.36),  # measured 0.334
    ],
    ids=["tensor", "row", "group"],
)
def test_contract(codec, bound):
    check_contract(codec, HEAVY, max_rel_err=bound)


@pytest.mark.parametrize("bits", sorted(LLOYD_MAX_MSE))
def test_one_codebook_reaches_lloyd_max_on_normal_data(bits):
    # 1-D k-means on many samples converges to the Lloyd-Max quantizer; 3% covers
    # sampling and float16 entries.
    x = np.random.default_rng(bits).standard_normal(1 << 16).astype(np.float32)
    roundtrip(Palette(bits, "tensor"), x, max_rel_err=1.03 * LLOYD_MAX_MSE[bits] ** 0.5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("data", [NORMAL, HEAVY], ids=["normal", "heavy"])
def test_codebooks_beat_uniform_grids_of_the_same_size(bits, data):
    # A uniform grid with an optimised scale and offset is one particular codebook
    # of 2**bits entries; k-means must find one at least as good.
    def error(codec):
        return rel_err(data, roundtrip(codec, data)[1])

    assert error(Palette(bits, "row")) <= error(GroupQuant(bits, 256, "asym", "F32"))
    assert error(Palette(bits, "group", 64)) <= error(GroupQuant(bits, 64, "asym", "F32"))


@pytest.mark.parametrize(
    "bits,scope,group,bound",
    [
        # Per-row codebooks of 256 normal values fit slightly better than Lloyd-Max
        # (which is for the whole distribution); heavy tails need more (measured
        # 0.44, 0.22, 0.10 for 2, 3, 4 bits).
        (2, "row", 0, 0.50),
        (3, "row", 0, 0.25),
        (4, "row", 0, 0.12),
        (4, "group", 64, 0.08),
    ],
)
def test_error_bounds_on_heavy_tails(bits, scope, group, bound):
    roundtrip(Palette(bits, scope, group), HEAVY, max_rel_err=bound)
    roundtrip(Palette(bits, scope, group), NORMAL, max_rel_err=LLOYD_MAX_MSE[bits] ** 0.5)


@pytest.mark.parametrize("dtype", ["F16", "F32"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_at_most_2_to_the_bits_distinct_values_come_back_exactly(dtype, bits):
    values = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)[: 2**bits]
    # Mostly zeros, so several quantile starts coincide.
    x = RNG.choice(values, size=(50, 64), p=None if len(values) < 4 else [0.05, 0.85, 0.05, 0.05])
    for scope, group in [("tensor", 0), ("row", 0), ("group", 16), ("group", 20)]:
        assert np.array_equal(roundtrip(Palette(bits, scope, group, dtype), x)[1], x)


@pytest.mark.parametrize("scope,group", [("tensor", 0), ("row", 0), ("group", 16)])
@pytest.mark.parametrize("shape", [(3, 50), (70,), (2, 3, 40), (5, 16)])
def test_odd_shapes_and_short_last_groups(scope, group, shape):
    codec = Palette(2, scope, group)
    x = RNG.standard_normal(shape).astype(np.float32)
    # 2 bits: Lloyd-Max gives 0.34 on normal data.
    enc, _ = roundtrip(codec, x, max_rel_err=0.4)  # also checks the bit cost against the stored parts
    rows = int(np.prod(shape[:-1]))
    expected = {"tensor": 1, "row": rows, "group": rows * -(-shape[-1] // 16)}[scope]
    assert enc.parts["codebook"].shape == (expected, 4)


@pytest.mark.parametrize("scope,group,shape", [("row", 0, (0, 32)), ("group", 16, (0, 32)), ("group", 16, (4, 0))])
def test_empty_tensors_without_codebooks_round_trip(scope, group, shape):
    # (A tensor-scope codebook, or one per row of (4, 0), would outweigh the tensor: accepts refuses those.)
    codec = Palette(2, scope, group)
    enc, out = roundtrip(codec, np.zeros(shape, np.float32))
    assert out.shape == shape and enc.parts["codebook"].shape == (0, 4)


def test_accepts_only_tensors_larger_than_their_codebooks():
    assert Palette(4, "row").accepts((384, 16)) and not Palette(4, "row").accepts((384, 15))
    assert not Palette(8, "tensor").accepts((255,)) and Palette(8, "tensor").accepts((256,))
    assert not Palette().accepts(()) and not Palette(1, "tensor").accepts((0, 16))
    with pytest.raises(ValueError, match=r"shape \(384, 15\)"):
        Palette(4, "row").encode(np.ones((384, 15), np.float32))


@pytest.mark.parametrize("codec", [Palette(), Palette(3, "group", 64, "F32"), Palette(1, "tensor"), Palette(8, "row")])
def test_exact_bit_cost(codec):
    for shape in [(64, 256), (3, 300), (384,)]:
        roundtrip(codec, RNG.standard_normal(shape).astype(np.float32))  # bit cost == stored bits


def test_bits_per_weight_formula():
    # 4-bit indices + 16 float16 entries per row of 1024.
    assert Palette(4, "row").bit_cost({}, (1024, 1024)) == 1024 * (1024 * 4 + 16 * 16)
    assert Palette(3, "group", 100, "F32").bit_cost({}, (2, 250)) == -(-500 * 3 // 8) * 8 + 2 * 3 * 8 * 32


def test_encoder_settings_are_not_stored():
    assert Palette(4, "row", iterations=3).config() == Palette(4, "row").config()
    with pytest.raises(FormatError, match="unexpected key"):
        Palette.from_config({**Palette().config(), "iterations": 3}, "c")


def test_deterministic():
    for codec in (Palette(4, "row"), Palette(3, "group", 64), Palette(5, "tensor")):
        a, b = codec.encode(HEAVY), codec.encode(HEAVY.copy())
        assert all(a.parts[k].tobytes() == b.parts[k].tobytes() for k in a.parts) and a.params == b.params


def test_encoder_refuses_non_finite_and_scalars():
    with pytest.raises(ValueError, match="NaN or infinite"):
        Palette().encode(np.array([[1.0, np.inf] * 16], np.float32))
    with pytest.raises(ValueError, match=r"shape \(\)"):
        Palette().encode(np.float32(1.0))


@pytest.mark.parametrize(
    "config,key",
    [
        ({"bits": 0, "scope": "row", "group": 0, "codebook_dtype": "F16"}, "bits"),
        ({"bits": 9, "scope": "row", "group": 0, "codebook_dtype": "F16"}, "bits"),
        ({"bits": 4, "scope": "column", "group": 0, "codebook_dtype": "F16"}, "scope"),
        ({"bits": 4, "scope": "row", "group": 64, "codebook_dtype": "F16"}, "group"),
        ({"bits": 4, "scope": "group", "group": 0, "codebook_dtype": "F16"}, "group"),
        ({"bits": 4, "scope": "group", "group": 1 << 30, "codebook_dtype": "F16"}, "group"),
        ({"bits": 4, "scope": "row", "group": 0, "codebook_dtype": "F64"}, "codebook_dtype"),
        ({"bits": True, "scope": "row", "group": 0, "codebook_dtype": "F16"}, "bits"),
        ({"bits": 4, "scope": "row", "group": 0}, "codebook_dtype"),
        ({"bits": 4, "scope": ["row"], "group": 0, "codebook_dtype": "F16"}, "scope"),
        ({"bits": 4, "scope": "row", "group": 0, "codebook_dtype": ["F16"]}, "codebook_dtype"),
        ({"bits": 4, "scope": "row", "group": 0, "codebook_dtype": "F16", "extra": 1}, "extra"),
        ("row", "expected an object"),
    ],
)
def test_bad_config_is_a_format_error_naming_the_key(config, key):
    with pytest.raises(FormatError, match=key):
        Palette.from_config(config, "c")


@pytest.mark.parametrize("params", [{"x": 1}, [], None])
def test_bad_params_raise_format_error(params):
    with pytest.raises(FormatError, match=r"t\.params"):
        Palette().part_specs(params, (4, 32), "t")


@pytest.mark.parametrize("shape", [(), (4, -1), (4, 32.0), (4, None)])
def test_bad_shapes_raise_format_error(shape):
    parts = Palette().encode(NORMAL[:4, :32]).parts
    with pytest.raises(FormatError, match=r"t\.shape"):
        Palette().decode(parts, {}, shape, "t")


def _hostile_cases():
    """Damage the shared harness does not try: wrong lengths and a non-finite codebook."""
    p = Palette(3, "group", 64).encode(NORMAL).parts
    return [
        {**p, "indices": p["indices"][:-1]},
        {**p, "codebook": p["codebook"][:-1]},
        {**p, "codebook": p["codebook"][:, :4]},
        {**p, "codebook": p["codebook"].reshape(-1)},
        {**p, "codebook": np.full_like(p["codebook"], np.nan)},
    ]


@pytest.mark.parametrize("case", range(len(_hostile_cases())))
def test_hostile_parts_raise_format_error(case):
    with pytest.raises(FormatError):
        Palette(3, "group", 64).decode(_hostile_cases()[case], {}, NORMAL.shape, "t")


def test_random_bytes_decode_to_finite_values():
    codec = Palette(3, "group", 16)
    shape = (5, 40)
    specs = codec.part_specs({}, shape, "t")
    assert specs == {"indices": PartSpec("U8", (bitpack.packed_size(200, 3),)), "codebook": PartSpec("F16", (15, 8))}
    rng = np.random.default_rng(7)
    for _ in range(20):
        parts = {
            "indices": rng.integers(0, 256, specs["indices"].shape, dtype=np.uint8),
            "codebook": rng.standard_normal((15, 8)).astype(np.float16),
        }
        out = codec.decode(parts, {}, shape, "t")
        assert np.isfinite(out).all() and np.isin(out.astype(np.float16), parts["codebook"]).all()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    bits=st.integers(1, 8),
    scope=st.sampled_from([("tensor", 0), ("row", 0), ("group", 16), ("group", 23)]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_any_shape_round_trips_to_codebook_values(shape, bits, scope, scale, seed):
    codec = Palette(bits, *scope, "F32")
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    if not codec.accepts(shape):  # more codebook entries than values
        with pytest.raises(ValueError, match="cannot encode a tensor of shape"):
            codec.encode(x)
        return
    enc, out = roundtrip(codec, x)  # checks parts, bit cost and output shape
    assert np.isin(out, enc.parts["codebook"]).all()
    # Every value is within its codebook's range, so no error exceeds the span of the data.
    assert x.size == 0 or np.abs(out - x).max() <= x.max() - x.min()
    if x.size and scope[0] == "tensor":  # k-means never does worse than one entry at the mean
        assert np.linalg.norm(out - x) <= np.linalg.norm(x - x.mean()) * 1.0001


W, HESSIAN = gptq_problem()
GPTQ = Calibration("gptq", HESSIAN)


def _output_error(codec, calibration=None):
    enc = codec.encode(W, calibration=calibration)
    return gptq.output_error(W, codec.decode(enc.parts, enc.params, W.shape, "w"), HESSIAN)


@pytest.mark.parametrize(
    "codec,bound",
    [
        # Measured 0.35, 0.45, 0.37, 0.35.  With the compensation disabled (weighted
        # codebooks, nearest entries) 0.70, 0.81, 0.59, 0.98: each bound would fail.
        (Palette(4, "row"), 0.5),
        (Palette(2, "row"), 0.6),
        (Palette(3, "group", 32), 0.5),
        (Palette(4, "tensor"), 0.5),
    ],
    ids=["4-row", "2-row", "3-group", "4-tensor"],
)
def test_gptq_lowers_the_output_error(codec, bound):
    assert _output_error(codec, GPTQ) < bound * _output_error(codec)


@pytest.mark.parametrize("codec", [Palette(4, "row"), Palette(3, "group", 48), Palette(4, "tensor")])
def test_gptq_output_is_an_ordinary_palette_tensor(codec):
    plain, calibrated = codec.encode(W), codec.encode(W, calibration=GPTQ)
    assert calibrated.params == plain.params == {}
    assert {k: (v.dtype, v.shape) for k, v in calibrated.parts.items()} == {
        k: (v.dtype, v.shape) for k, v in plain.parts.items()
    }
    out = codec.decode(calibrated.parts, calibrated.params, W.shape, "w")
    assert out.dtype == np.float32 and np.isin(out, calibrated.parts["codebook"].astype(np.float32)).all()


def test_gptq_feeds_back_exactly_the_decoded_values(monkeypatch):
    # The error GPTQ spreads is the true one only if its quantized columns are what decode gives.
    seen = []
    compensate = gptq.compensate
    monkeypatch.setattr(gptq, "compensate", lambda *a, **k: seen.append(compensate(*a, **k)) or seen[-1])
    for codec in (Palette(3, "row"), Palette(2, "group", 32, "F32"), Palette(4, "tensor")):
        enc = codec.encode(W, calibration=GPTQ)
        assert seen.pop().astype(np.float32).tobytes() == codec.decode(enc.parts, enc.params, W.shape, "w").tobytes()


def test_gptq_is_deterministic():
    codec = Palette(3, "group", 32)
    a, b = codec.encode(W, calibration=GPTQ), codec.encode(W.copy(), calibration=Calibration("gptq", HESSIAN.copy()))
    assert all(a.parts[k].tobytes() == b.parts[k].tobytes() for k in a.parts)


def test_gptq_needs_a_matrix_and_a_fitting_hessian_and_wanda_is_refused():
    codec = Palette(4, "row")
    with pytest.raises(ValueError, match="matrix"):
        codec.encode(W.reshape(4, 16, 128), calibration=GPTQ)
    with pytest.raises(ValueError, match="matrix"):
        Palette(4, "tensor").encode(W.reshape(-1), calibration=GPTQ)
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode(W, calibration=Calibration("gptq", np.eye(127)))
    with pytest.raises(ValueError, match="no 'wanda' encoder"):
        codec.encode(W, calibration=Calibration("wanda", HESSIAN))


def test_weighted_k_means_follows_the_weights():
    # Four heavily weighted values among many light ones: with four entries the codebook is those four.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 200))
    weights = np.ones_like(x)
    heavy_at = rng.choice(200, 4, replace=False)
    weights[:, heavy_at] = 1e6
    books = fit_codebooks(x, 4, weights=weights)
    np.testing.assert_allclose(books, np.sort(x[:, heavy_at], axis=1), atol=1e-3)

    # Unit weights fit as well as no weights (the same objective, another quantile start).
    def error(b):
        return (np.min((x[:, :, None] - b[:, None, :]) ** 2, axis=2)).sum()

    assert error(fit_codebooks(x, 4, weights=np.ones_like(x))) <= 1.01 * error(fit_codebooks(x, 4))
