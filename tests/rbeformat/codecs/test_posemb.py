"""posdct and sinusoid: DCT truncation error by Parseval, formula tables recognised or refused."""

import math

import numpy as np
import pytest
from harness import (
    assert_energy_target_met_minimally,
    assert_params_refused,
    assert_recorded_settings_ignored,
    check_contract,
    rel_err,
    roundtrip,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import JSON, only_format_errors, wild

from rbeformat import FormatError
from rbeformat.codecs.posemb import NotSinusoidal, PositionDCT, Sinusoidal, dct_basis


def learned_table(positions=128, hidden=32, seed=0):
    """Like a trained position table: smooth random walks along positions plus noise."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.standard_normal((positions, hidden)), axis=0) / math.sqrt(positions)
    return (walk + 0.01 * rng.standard_normal((positions, hidden))).astype(np.float32)


def heavy_table():
    """Student t entries (2 dof): no smoothness at all, a few huge values."""
    return wild((96, 16))


def dropped_energy(x, keep):
    """Parseval: the error of keeping K orthonormal coefficients is the norm of the rest."""
    n = x.shape[0]
    naive = np.array([[math.cos(math.pi * (2 * p + 1) * k / (2 * n)) for p in range(n)] for k in range(n)])
    naive *= np.where(np.arange(n) == 0, math.sqrt(1 / n), math.sqrt(2 / n))[:, None]
    coeffs = naive @ x.astype(np.float64)
    return float(np.sqrt((coeffs[keep:] ** 2).sum() / (coeffs**2).sum()))


@pytest.mark.parametrize(
    "codec,bound",
    [
        (PositionDCT(keep=8), 0.17),  # measured 0.152
        (PositionDCT(energy=0.99), 0.1 + 1e-6),  # sqrt(1 - energy) by Parseval; measured 0.09999 (17 kept)
    ],
    ids=["keep", "energy"],
)
def test_posdct_contract(codec, bound):
    check_contract(codec, learned_table(), max_rel_err=bound)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 200])
def test_basis_is_orthonormal_dct_ii(n):
    basis = dct_basis(n, range(n))
    np.testing.assert_allclose(basis @ basis.T, np.eye(n), atol=1e-12)
    k, p = 3 % n, n - 1
    expected = math.sqrt((1 if k == 0 else 2) / n) * math.cos(math.pi * (2 * p + 1) * k / (2 * n))
    assert basis[k, p] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(dct_basis(n, range(1, n))[: n - 1], basis[1:])


@pytest.mark.parametrize("data", [learned_table, heavy_table])
@pytest.mark.parametrize("keep", [1, 8, 32, 96])
def test_error_is_the_dropped_coefficients(data, keep):
    x = data()
    enc, out = roundtrip(PositionDCT(keep=keep), x)
    assert enc.parts["coeffs"].shape == (keep, x.shape[1])
    # float32 coefficients and output add ~1e-7 relative to the exact truncation error.
    assert abs(rel_err(x, out) - dropped_energy(x, keep)) < 1e-5


def test_smooth_table_needs_few_coefficients():
    x = learned_table()
    enc, out = roundtrip(PositionDCT(energy=0.99), x)
    assert enc.params["keep"] < 32 and rel_err(x, out) <= 0.1 + 1e-6


@pytest.mark.parametrize("data", [learned_table, heavy_table])
def test_all_coefficients_reconstruct(data):
    x = data()
    _, out = roundtrip(PositionDCT(keep=10_000), x)  # clipped to the number of positions
    assert np.abs(out - x).max() <= 1e-5 * np.abs(x).max()


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.999, 1.0])
def test_energy_target(energy):
    x = heavy_table()
    enc, out = roundtrip(PositionDCT(energy=energy), x)
    assert_energy_target_met_minimally(energy, rel_err(x, out), enc.params["keep"], lambda k: dropped_energy(x, k))


def test_decode_is_float64_rounded_once():
    x = learned_table(40, 6)
    codec = PositionDCT(keep=9)
    enc, out = roundtrip(codec, x)
    expected = (dct_basis(40, range(9)).T @ enc.parts["coeffs"].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


def test_posdct_deterministic_bits_and_config():
    x = learned_table()
    for codec in (PositionDCT(keep=5), PositionDCT(energy=0.95)):
        one, two = codec.encode(x), codec.encode(x)
        assert one.params == two.params and one.parts["coeffs"].tobytes() == two.parts["coeffs"].tobytes()
        assert codec.bit_cost(one.params, x.shape) == one.parts["coeffs"].nbytes * 8 == 32 * one.params["keep"] * 32
    assert PositionDCT(keep=5).config() == {"keep": 5} and PositionDCT(energy=0.95).config() == {"energy": 0.95}
    for config, message in [
        ({}, "exactly one of"),
        ({"keep": 0}, "c.keep"),
        ({"keep": 2.5}, "c.keep"),
        ({"energy": 0}, "c.energy"),
        ({"energy": 2}, "c.energy"),
        ({"keep": 3, "energy": 0.5}, "exactly one of"),
        ({"keep": 3, "x": 1}, "unexpected key"),
        ({"energy": "0.5"}, "c.energy"),
        (None, "expected an object"),
    ]:
        with pytest.raises(FormatError, match=message):
            PositionDCT.from_config(config, "c")


@pytest.mark.parametrize(
    "params,shape",
    [
        ({"keep": 0}, (16, 4)),
        ({"keep": 17}, (16, 4)),
        ({"keep": 1 << 40}, (16, 4)),
        ({"keep": "3"}, (16, 4)),
        ({"keep": True}, (16, 4)),
        ({}, (16, 4)),
        ({"keep": 2, "x": 0}, (16, 4)),
        (None, (16, 4)),
        ({"keep": 2}, (16,)),
        ({"keep": 2}, (4, 4, 4)),
        ({"keep": 1}, (0, 4)),
        ({"keep": 1}, (4, 0)),
    ],
)
def test_posdct_hostile_params_are_format_errors(params, shape):
    with pytest.raises(FormatError):
        PositionDCT(keep=2).part_specs(params, shape, "x")
    with pytest.raises(FormatError):
        PositionDCT(keep=2).decode({}, params, shape, "x")


def test_posdct_hostile_parts_are_format_errors():
    codec = PositionDCT(keep=3)
    enc = codec.encode(learned_table(16, 4))
    for parts in (
        {"coeffs": enc.parts["coeffs"][:2]},
        {"coeffs": enc.parts["coeffs"].astype(np.float16)},
        {},
        {**enc.parts, "x": enc.parts["coeffs"]},
        {"coeffs": enc.parts["coeffs"].T.copy()},
    ):
        with pytest.raises(FormatError):
            codec.decode(parts, enc.params, (16, 4), "x")


def test_posdct_refuses_what_it_cannot_encode():
    assert not PositionDCT(keep=2).accepts((16,))
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        PositionDCT(keep=2).encode(np.ones(16, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        PositionDCT(keep=2).encode(np.full((4, 4), np.inf, np.float32))


# ---------------------------------------------------------------- sinusoid


def float64_formula(positions, hidden, base, layout):
    """An independent statement of the formula (loops, math module)."""
    out = np.zeros((positions, hidden), np.float64)
    for p in range(positions):
        for i in range(hidden // 2):
            angle = p / base ** (2 * i / hidden)
            sin_col, cos_col = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, hidden // 2 + i)
            out[p, sin_col], out[p, cos_col] = math.sin(angle), math.cos(angle)
    return out.astype(np.float32)


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_sinusoid_contract(layout):
    # The formula computed independently (loops, math module): measured 0.0; 1e-6 allows another libm.
    check_contract(Sinusoidal(), float64_formula(64, 24, 10000.0, layout), max_rel_err=1e-6)


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
@pytest.mark.parametrize("base", [10000.0, 500.0, 123457.0])
def test_sinusoid_recognises_and_rebuilds_formula_tables(layout, base):
    table = float64_formula(64, 24, base, layout)
    np.testing.assert_allclose(Sinusoidal.table(64, 24, base, layout), table, atol=1e-6)
    enc, out = roundtrip(Sinusoidal(), table)
    assert enc.parts == {} and enc.params == {"base": base, "layout": layout}
    assert np.abs(out - table).max() <= 1e-6
    assert Sinusoidal().bit_cost(enc.params, table.shape) == 0
    # The decoder's own table round-trips bit for bit.
    exact = Sinusoidal.table(64, 24, base, layout)
    np.testing.assert_array_equal(roundtrip(Sinusoidal(), exact)[1], exact)


def test_sinusoid_refuses_learned_and_perturbed_tables():
    for table in (learned_table(), heavy_table(), np.zeros((8, 4), np.float32)):
        with pytest.raises(NotSinusoidal):
            Sinusoidal().encode(table)
    table = Sinusoidal.table(32, 16, 10000.0, "halves")
    table[5, 3] += 1e-5
    with pytest.raises(ValueError):
        Sinusoidal().encode(table)
    assert Sinusoidal(tolerance=1e-4).encode(table).params["layout"] == "halves"
    table[5, 3] = np.nan
    with pytest.raises(NotSinusoidal):
        Sinusoidal(tolerance=1.0).encode(table)


def test_sinusoid_float32_computed_tables_need_a_looser_tolerance():
    # Tables built in float32 arithmetic (as many frameworks do) drift from the
    # float64 formula by about ulp(angle) at large positions.
    positions, hidden = 512, 64
    inv = np.exp(np.arange(0, hidden, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / hidden))
    angle = np.arange(positions, dtype=np.float32)[:, None] * inv
    table = np.empty((positions, hidden), np.float32)
    table[:, 0::2], table[:, 1::2] = np.sin(angle), np.cos(angle)
    with pytest.raises(NotSinusoidal):
        Sinusoidal().encode(table)
    assert Sinusoidal(tolerance=1e-4).encode(table).params == {"base": 10000.0, "layout": "interleaved"}


def test_sinusoid_shapes():
    assert Sinusoidal().accepts((10, 8))
    assert not any(Sinusoidal().accepts(s) for s in [(10, 7), (10,), (0, 4), (2, 2, 2)])
    with pytest.raises(NotSinusoidal):
        Sinusoidal().encode(np.zeros((4, 5), np.float32))


def test_sinusoid_recorded_settings_never_affect_reading():
    """tolerance and base guide the encoder only (the params carry the base); any value, or none, reads the same."""
    writer = Sinusoidal(tolerance=1e-4, base=500)
    assert writer.config() == {"tolerance": 1e-4, "base": 500.0}  # recorded for older readers
    table = Sinusoidal.table(32, 16, 123457.0, "halves")
    enc, out = roundtrip(writer, table)
    assert enc.params == {"base": 123457.0, "layout": "halves"} and out.tobytes() == table.tobytes()
    assert_recorded_settings_ignored(writer, table)
    for config in [{"tolerance": -1, "base": 1e4}, {"tolerance": 1e-6, "base": 0.5}, {"base": 1e13}]:
        assert Sinusoidal.from_config(config, "c") == Sinusoidal()  # out of range for a user, still opens
    with pytest.raises(FormatError, match="unexpected key"):
        Sinusoidal.from_config({"tolerance": 0, "base": 1e4, "x": 1}, "c")
    # A user still cannot ask the encoder for a base outside the formula's range.
    with pytest.raises(ValueError, match=r"sinusoid\.base"):
        Sinusoidal(base=0.5)


@pytest.mark.parametrize(
    "params,shape",
    [
        ({"base": 1e4, "layout": "interleaved"}, (8, 7)),
        ({"base": 1e4, "layout": "interleaved"}, (8,)),
        ({"base": 1e4, "layout": "interleaved"}, (0, 8)),
        ({"base": 0, "layout": "halves"}, (8, 8)),
        ({"base": -5.0, "layout": "halves"}, (8, 8)),
        ({"base": float("nan"), "layout": "halves"}, (8, 8)),
        ({"base": float("inf"), "layout": "halves"}, (8, 8)),
        ({"base": True, "layout": "halves"}, (8, 8)),
        ({"base": "1e4", "layout": "halves"}, (8, 8)),
        ({"base": 1e4, "layout": "rows"}, (8, 8)),
        ({"base": 1e4}, (8, 8)),
        ({"base": 1e4, "layout": "halves", "x": 1}, (8, 8)),
        (None, (8, 8)),
        ({"base": 1e4, "layout": ["halves"]}, (8, 8)),
    ],
)
def test_sinusoid_hostile_params_are_format_errors(params, shape):
    assert_params_refused(Sinusoidal(), params, shape)


def test_sinusoid_refuses_parts():
    with pytest.raises(FormatError):
        Sinusoidal().decode({"x": np.zeros(1, np.float32)}, {"base": 1e4, "layout": "halves"}, (4, 4), "x")


@settings(max_examples=300, deadline=None)
@given(
    params=JSON | st.fixed_dictionaries({}, optional={"keep": JSON, "base": JSON, "layout": JSON}),
    config=JSON | st.fixed_dictionaries({}, optional={"keep": JSON, "energy": JSON, "tolerance": JSON, "base": JSON}),
)
def test_any_json_params_and_config_raise_only_format_errors(params, config):
    only_format_errors(
        lambda: PositionDCT(keep=2).part_specs(params, (16, 4), "x"),
        lambda: PositionDCT.from_config(config, "c"),
        lambda: Sinusoidal().part_specs(params, (16, 4), "x"),
        lambda: Sinusoidal.from_config(config, "c"),
    )
