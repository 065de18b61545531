"""lowrank: truncated SVD with the Eckart-Young error, exact bit cost, hostile params refused."""

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rbeformat.codecs.lowrank as lowrank_module
from rbeformat import FormatError
from rbeformat.codecs.lowrank import LowRank


def normal(m=96, n=64, seed=0):
    return np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)


def heavy(m=96, n=64, seed=1):
    # Student t with 2 degrees of freedom: infinite variance, a few huge entries.
    return np.random.default_rng(seed).standard_t(2, (m, n)).astype(np.float32)


def roundtrip(codec, w):
    enc = codec.encode(w)
    return enc, codec.decode(enc.parts, enc.params, w.shape, "w")


def rel(w, w_hat):
    return float(np.linalg.norm(w - w_hat) / np.linalg.norm(w))


def tail_error(w, r):
    """Eckart-Young: the best rank-r error is the norm of the dropped singular values."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))


def test_doctest():
    assert doctest.testmod(lowrank_module).failed == 0


@pytest.mark.parametrize("data", [normal, heavy])
@pytest.mark.parametrize("r", [1, 8, 32])
def test_error_is_the_optimal_truncation_error(data, r):
    w = data()
    enc, out = roundtrip(LowRank(rank=r), w)
    assert enc.params == {"rank": r}
    assert enc.parts["A"].shape == (96, r) and enc.parts["B"].shape == (r, 64)
    # Float32 factors add at most ~1e-6 relative on top of the optimum.
    assert abs(rel(w, out) - tail_error(w, r)) < 1e-5


@pytest.mark.parametrize("data", [normal, heavy])
def test_full_rank_is_exact_up_to_rounding(data):
    w = data()
    _, out = roundtrip(LowRank(rank=10_000), w)  # clipped to min(m, n)
    assert rel(w, out) < 1e-5


def test_low_rank_plus_noise_recovers_the_signal():
    rng = np.random.default_rng(2)
    signal = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 120))
    noise = 1e-3 * rng.standard_normal((200, 120))
    w = (signal + noise).astype(np.float32)
    _, out = roundtrip(LowRank(rank=8), w)
    # Eckart-Young: no worse than dropping the noise, plus float32 rounding.
    assert rel(w, out) <= np.linalg.norm(noise) / np.linalg.norm(w) + 1e-6


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_target_picks_the_smallest_sufficient_rank(energy):
    w = heavy()
    enc, out = roundtrip(LowRank(energy=energy), w)
    r = enc.params["rank"]
    assert rel(w, out) <= np.sqrt(1 - energy) + 1e-5
    if r > 1:
        assert tail_error(w, r - 1) > np.sqrt(1 - energy) - 1e-9


def test_bits_target_fits_the_budget():
    w = normal(300, 200)
    enc, _ = roundtrip(LowRank(bits=2.0, factor_bits=4.0), w)
    r = enc.params["rank"]
    assert r == (2 * 300 * 200) // (500 * 4) == 60
    assert r * 500 * 4 <= 2.0 * w.size < (r + 1) * 500 * 4


@pytest.mark.parametrize("data", [normal, heavy])
def test_residual_restores_the_tensor(data):
    w = data()
    codec = LowRank(rank=4, residual=True)
    enc, out = roundtrip(codec, w)
    assert set(enc.parts) == {"A", "B", "residual"}
    # W^ = P + (W - P) in float32: at most one rounding of each.
    assert np.abs(out - w).max() <= 2 * np.finfo(np.float32).eps * np.abs(w).max()


def test_decode_rounds_a_float64_sum():
    w = normal(40, 30)
    codec = LowRank(rank=5)
    enc, out = roundtrip(codec, w)
    expected = (enc.parts["A"].astype(np.float64) @ enc.parts["B"].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


def test_factors_are_balanced_and_sign_canonical():
    w = heavy()
    enc, _ = roundtrip(LowRank(rank=6), w)
    a, b = enc.parts["A"].astype(np.float64), enc.parts["B"].astype(np.float64)
    np.testing.assert_allclose((a ** 2).sum(axis=0), (b ** 2).sum(axis=1), rtol=1e-4)
    rows = np.arange(6)
    assert (b[rows, np.abs(b).argmax(axis=1)] > 0).all()


def test_deterministic_and_bits_exact():
    w = heavy(128, 96)
    for codec in (LowRank(rank=7), LowRank(energy=0.8, residual=True), LowRank(bits=3, factor_bits=8)):
        one, two = codec.encode(w), codec.encode(w)
        assert one.params == two.params
        assert all(one.parts[k].tobytes() == two.parts[k].tobytes() for k in one.parts)
        assert codec.bits(one.params, w.shape) == sum(p.nbytes * 8 for p in one.parts.values())
    r = 7
    assert LowRank(rank=r).bits({"rank": r}, (128, 96)) == 32 * r * (128 + 96)
    assert LowRank(rank=r, residual=True).bits({"rank": r}, (128, 96)) == 32 * (r * (128 + 96) + 128 * 96)


def test_zero_matrix():
    w = np.zeros((10, 6), np.float32)
    for codec in (LowRank(energy=0.9), LowRank(rank=3)):
        _, out = roundtrip(codec, w)
        assert not out.any()


@pytest.mark.parametrize("codec", [LowRank(rank=3), LowRank(energy=0.25),
                                   LowRank(bits=1.5, factor_bits=4, residual=True)])
def test_config_round_trip(codec):
    assert LowRank.from_config(codec.config(), "c") == codec
    assert LowRank.from_config(codec.config(), "c").config() == codec.config()


@pytest.mark.parametrize("config", [
    {}, {"rank": 3}, {"residual": False}, {"rank": 0, "residual": False}, {"rank": 2.0, "residual": False},
    {"rank": True, "residual": False}, {"rank": 3, "energy": 0.5, "residual": False},
    {"energy": 0.0, "residual": False}, {"energy": 1.5, "residual": False}, {"energy": "1", "residual": False},
    {"bits": 4, "residual": False}, {"energy": 0.5, "factor_bits": 4, "residual": False},
    {"bits": -1, "factor_bits": 4, "residual": False}, {"rank": 3, "residual": 1},
    {"rank": 3, "residual": False, "x": 1},
    {"energy": float("nan"), "residual": False}, "rank",
])
def test_bad_config_is_a_format_error(config):
    with pytest.raises(FormatError):
        LowRank.from_config(config, "c")


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.5}, {"rank": 0}, {"rank": 2.0}, {"energy": True},
                                    {"energy": 0}, {"bits": 4}, {"bits": 4, "factor_bits": True},
                                    {"rank": 2, "factor_bits": 4}, {"rank": 2, "residual": "yes"}])
def test_bad_settings_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        LowRank(**kwargs)


def test_accepts_only_matrices():
    assert LowRank(rank=2).accepts((5, 3))
    assert not any(LowRank(rank=2).accepts(s) for s in [(5,), (2, 3, 4), (0, 3), ()])
    with pytest.raises(ValueError):
        LowRank(rank=2).encode(np.ones(5, np.float32))
    with pytest.raises(ValueError):
        LowRank(rank=2).encode(np.array([[np.nan, 1.0]], np.float32))


@pytest.mark.parametrize("params,shape", [
    ({"rank": 0}, (8, 6)), ({"rank": 7}, (8, 6)), ({"rank": 1 << 40}, (8, 6)), ({"rank": "2"}, (8, 6)),
    ({"rank": 2.0}, (8, 6)), ({"rank": True}, (8, 6)), ({}, (8, 6)), ({"rank": 2, "extra": 1}, (8, 6)),
    (None, (8, 6)), ([2], (8, 6)), ({"rank": 2}, (48,)), ({"rank": 2}, (2, 4, 6)), ({"rank": 1}, (0, 6)),
])
def test_hostile_params_are_format_errors(params, shape):
    codec = LowRank(rank=2, residual=True)
    with pytest.raises(FormatError):
        codec.part_specs(params, shape, "w")
    with pytest.raises(FormatError):
        codec.decode({}, params, shape, "w")
    with pytest.raises(FormatError):
        codec.bits(params, shape)


def test_hostile_parts_are_format_errors():
    codec = LowRank(rank=2, residual=True)
    enc = codec.encode(normal(8, 6))
    bad = [
        {k: v for k, v in enc.parts.items() if k != "residual"},
        {**enc.parts, "extra": enc.parts["A"]},
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


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(params=JSON | st.fixed_dictionaries({"rank": JSON}), config=JSON | st.fixed_dictionaries(
    {"residual": JSON}, optional={"rank": JSON, "energy": JSON, "bits": JSON, "factor_bits": JSON}))
def test_any_json_params_and_config_raise_only_format_errors(params, config):
    for call in (lambda: LowRank(rank=2).part_specs(params, (6, 5), "w"),
                 lambda: LowRank.from_config(config, "c")):
        try:
            call()
        except FormatError:
            pass
