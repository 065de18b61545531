"""lowrank: truncated SVD with the Eckart-Young error, exact bit cost, hostile params refused."""

import numpy as np
import pytest
from harness import assert_energy_target_met_minimally, check_contract, rel_err, roundtrip
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import JSON, normal, only_format_errors, wild

from rbeformat import FormatError
from rbeformat.codecs.lowrank import LowRank

NORMAL = normal((96, 64))
WILD = wild((96, 64))


@pytest.mark.parametrize(
    "codec,bound",
    [
        (LowRank(rank=8), 0.60),  # measured 0.588, the Eckart-Young optimum
        (LowRank(energy=0.9, residual=True), 1e-7),  # measured 7e-9: the residual restores the rest
        (LowRank(bits=2.0, factor_bits=4.0), 0.43),  # measured 0.419 (rank 19)
    ],
    ids=["rank", "energy-residual", "bits"],
)
def test_contract(codec, bound):
    check_contract(codec, WILD, max_rel_err=bound)


def tail_error(w, r):
    """Eckart-Young: the best rank-r error is the norm of the dropped singular values."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()))


@pytest.mark.parametrize("w", [NORMAL, WILD], ids=["normal", "wild"])
@pytest.mark.parametrize("r", [1, 8, 32])
def test_error_is_the_optimal_truncation_error(w, r):
    enc, out = roundtrip(LowRank(rank=r), w)
    assert enc.params == {"rank": r}
    assert enc.parts["A"].shape == (96, r) and enc.parts["B"].shape == (r, 64)
    # Float32 factors add at most ~1e-6 relative on top of the optimum.
    assert abs(rel_err(w, out) - tail_error(w, r)) < 1e-5


@pytest.mark.parametrize("w", [NORMAL, WILD], ids=["normal", "wild"])
def test_full_rank_is_exact_up_to_rounding(w):
    enc, _ = roundtrip(LowRank(rank=10_000), w, max_rel_err=1e-5)
    assert enc.params == {"rank": 64}  # clipped to min(m, n)


def test_low_rank_plus_noise_recovers_the_signal():
    rng = np.random.default_rng(2)
    signal = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 120))
    noise = 1e-3 * rng.standard_normal((200, 120))
    w = (signal + noise).astype(np.float32)
    _, out = roundtrip(LowRank(rank=8), w)
    # Eckart-Young: no worse than dropping the noise, plus float32 rounding.
    assert rel_err(w, out) <= np.linalg.norm(noise) / np.linalg.norm(w) + 1e-6


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_target_picks_the_smallest_sufficient_rank(energy):
    w = WILD
    enc, out = roundtrip(LowRank(energy=energy), w)
    assert_energy_target_met_minimally(energy, rel_err(w, out), enc.params["rank"], lambda r: tail_error(w, r))


def test_bits_target_fits_the_budget():
    w = normal((300, 200))
    enc, _ = roundtrip(LowRank(bits=2.0, factor_bits=4.0), w)
    r = enc.params["rank"]
    assert r == 60  # floor(2 * 300 * 200 / ((300 + 200) * 4))
    assert r * 500 * 4 <= 2.0 * w.size < (r + 1) * 500 * 4


@pytest.mark.parametrize("w", [NORMAL, WILD], ids=["normal", "wild"])
def test_residual_restores_the_tensor(w):
    codec = LowRank(rank=4, residual=True)
    enc, out = roundtrip(codec, w)
    assert set(enc.parts) == {"A", "B", "residual"}
    # W^ = P + (W - P) in float32: at most one rounding of each.
    assert np.abs(out - w).max() <= 2 * np.finfo(np.float32).eps * np.abs(w).max()


def test_decode_rounds_a_float64_sum():
    w = normal((40, 30))
    codec = LowRank(rank=5)
    enc, out = roundtrip(codec, w)
    expected = (enc.parts["A"].astype(np.float64) @ enc.parts["B"].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


def test_factors_are_balanced_and_sign_canonical():
    enc, _ = roundtrip(LowRank(rank=6), WILD)
    a, b = enc.parts["A"].astype(np.float64), enc.parts["B"].astype(np.float64)
    np.testing.assert_allclose((a**2).sum(axis=0), (b**2).sum(axis=1), rtol=1e-4)
    rows = np.arange(6)
    assert (b[rows, np.abs(b).argmax(axis=1)] > 0).all()


def test_deterministic_and_bits_exact():
    w = wild((128, 96))
    for codec in (LowRank(rank=7), LowRank(energy=0.8, residual=True), LowRank(bits=3, factor_bits=8)):
        one, _ = roundtrip(codec, w)  # bit cost == stored bits
        two = codec.encode(w)
        assert one.params == two.params
        assert all(one.parts[k].tobytes() == two.parts[k].tobytes() for k in one.parts)
    r = 7
    assert LowRank(rank=r).bit_cost({"rank": r}, (128, 96)) == 32 * r * (128 + 96)
    assert LowRank(rank=r, residual=True).bit_cost({"rank": r}, (128, 96)) == 32 * (r * (128 + 96) + 128 * 96)


def test_zero_matrix():
    w = np.zeros((10, 6), np.float32)
    for codec in (LowRank(energy=0.9), LowRank(rank=3)):
        _, out = roundtrip(codec, w)
        assert not out.any()


def test_config_holds_only_the_settings_given():
    assert LowRank(rank=3).config() == {"rank": 3, "residual": False}
    assert LowRank(bits=1.5, factor_bits=4, residual=True).config() == {
        "bits": 1.5,
        "factor_bits": 4.0,
        "residual": True,
    }


@pytest.mark.parametrize(
    "config,message",
    [
        ({}, "missing key"),
        ({"rank": 3}, "missing key"),
        ({"residual": False}, "exactly one of"),
        ({"rank": 0, "residual": False}, "rank"),
        ({"rank": 2.0, "residual": False}, "rank"),
        ({"rank": True, "residual": False}, "rank"),
        ({"rank": 3, "energy": 0.5, "residual": False}, "exactly one of"),
        ({"energy": 0.0, "residual": False}, "energy"),
        ({"energy": 1.5, "residual": False}, "energy"),
        ({"energy": "1", "residual": False}, "energy"),
        ({"bits": 4, "residual": False}, "factor_bits"),
        ({"energy": 0.5, "factor_bits": 4, "residual": False}, "factor_bits"),
        ({"bits": -1, "factor_bits": 4, "residual": False}, "bits"),
        ({"rank": 3, "residual": 1}, "residual"),
        ({"rank": 3, "residual": False, "x": 1}, "unexpected key"),
        ({"energy": float("nan"), "residual": False}, "energy"),
        ("rank", "expected an object"),
    ],
)
def test_bad_config_is_a_format_error_naming_the_problem(config, message):
    with pytest.raises(FormatError, match=message):
        LowRank.from_config(config, "c")


def test_settings_between_fields_are_value_errors_for_users():
    with pytest.raises(ValueError, match="give exactly one of rank, energy, bits; found none"):
        LowRank()
    with pytest.raises(ValueError, match="factor_bits goes with bits"):
        LowRank(rank=2, factor_bits=4)


def test_accepts_only_matrices():
    assert LowRank(rank=2).accepts((5, 3))
    assert not any(LowRank(rank=2).accepts(s) for s in [(5,), (2, 3, 4), (0, 3), ()])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        LowRank(rank=2).encode(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        LowRank(rank=2).encode(np.array([[np.nan, 1.0]], np.float32))


@pytest.mark.parametrize(
    "params,shape",
    [
        ({"rank": 0}, (8, 6)),
        ({"rank": 7}, (8, 6)),
        ({"rank": 1 << 40}, (8, 6)),
        ({"rank": "2"}, (8, 6)),
        ({"rank": 2.0}, (8, 6)),
        ({"rank": True}, (8, 6)),
        ({}, (8, 6)),
        ({"rank": 2, "extra": 1}, (8, 6)),
        (None, (8, 6)),
        ([2], (8, 6)),
        ({"rank": 2}, (48,)),
        ({"rank": 2}, (2, 4, 6)),
        ({"rank": 1}, (0, 6)),
    ],
)
def test_hostile_params_are_format_errors(params, shape):
    codec = LowRank(rank=2, residual=True)
    with pytest.raises(FormatError):
        codec.part_specs(params, shape, "w")
    with pytest.raises(FormatError):
        codec.decode({}, params, shape, "w")
    with pytest.raises(FormatError):
        codec.bit_cost(params, shape)


def test_hostile_parts_are_format_errors():
    codec = LowRank(rank=2, residual=True)
    enc = codec.encode(normal((8, 6)))
    bad = [
        {**enc.parts, "A": enc.parts["A"].T.copy()},
        {**enc.parts, "B": enc.parts["B"].astype(np.float16)},
        {**enc.parts, "residual": enc.parts["residual"][:, :5]},
        {**enc.parts, "A": enc.parts["A"].tolist()},
        "not a dict",
    ]
    for parts in bad:
        with pytest.raises(FormatError):
            codec.decode(parts, enc.params, (8, 6), "w")
    # A rank that disagrees with the stored factors.
    with pytest.raises(FormatError):
        codec.decode(enc.parts, {"rank": 3}, (8, 6), "w")


@settings(max_examples=300, deadline=None)
@given(
    params=JSON | st.fixed_dictionaries({"rank": JSON}),
    config=JSON
    | st.fixed_dictionaries(
        {"residual": JSON}, optional={"rank": JSON, "energy": JSON, "bits": JSON, "factor_bits": JSON}
    ),
)
def test_any_json_params_and_config_raise_only_format_errors(params, config):
    only_format_errors(
        lambda: LowRank(rank=2).part_specs(params, (6, 5), "w"), lambda: LowRank.from_config(config, "c")
    )
