"""seed: the LFSR is the one the spec fixes, decode is exact, the error is as promised."""

import numpy as np
import pytest
from harness import assert_recorded_settings_ignored, check_contract, roundtrip, run_doctests
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import heavy, normal

from rbeformat import FormatError
from rbeformat.codecs.seed import SeedCodec, basis_table
from rbeformat.codecs.util import bitpack, lfsr

# Test vectors of spec/codecs/seed.md.
SEED1_STATES = [32768, 16384, 8192, 4096, 2048, 1024, 512, 256, 128, 64]
SEED1_U = [
    [-6143, -27583, -5253],
    [6033, 23611, 20051],
    [-17793, -11652, 5695],
    [21958, 5281, -6216],
    [-28260, 14148, 4551],
    [8960, -9544, -6764],
    [-21649, 30082, -7682],
    [7857, -25026, -32121],
]
SEED12345_U = [
    [21425, -29770, 2160],
    [22305, 24244, 25658],
    [5778, -23216, 2436],
    [-26983, 20824, 8623],
    [30972, 9755, 11886],
    [-4789, -5926, 5297],
    [6062, -21491, -1041],
    [6582, 10272, -26003],
]


def reference_step(x, bits):
    """One step written from the spec's words, one bit at a time."""
    feedback = 0
    for tap in lfsr.TAPS[bits]:
        feedback ^= (x >> (bits - tap)) & 1
    return (x >> 1) | (feedback << (bits - 1))


def reference_basis(seed, block, rank, bits):
    x, u = seed, []
    for _ in range(block * rank):
        for _ in range(bits):
            x = reference_step(x, bits)
        u.append(x - 2 ** (bits - 1))
    return np.array(u, np.int64).reshape(block, rank)


def reference_decode(codec, parts, params, shape):
    """The spec's decode in Python integers and float64 (exact for these sizes)."""
    n = int(np.prod(shape)) // codec.block
    seeds = bitpack.unpack(parts["seeds"], codec.seed_bits, n)
    q = bitpack.unpack(parts["coeffs"], codec.coef_bits, n * codec.rank).reshape(n, codec.rank)
    e = bitpack.unpack(parts["exponents"], codec.exp_bits, n)
    out = np.empty((n, codec.block))
    for b in range(n):
        u = reference_basis(int(seeds[b]), codec.block, codec.rank, codec.seed_bits)
        m = u @ (q[b].astype(np.int64) - 2 ** (codec.coef_bits - 1))
        out[b] = m * 2.0 ** (int(e[b]) - params["exp_bias"] - (codec.seed_bits - 1))
    return out.astype(np.float32).reshape(shape)


@pytest.mark.parametrize(
    "codec,bound",
    [
        (SeedCodec(seed_bits=10), 0.26),  # measured 0.235
        (SeedCodec(block=4, rank=2, coef_bits=3, seed_bits=10), 0.105),  # measured 0.092
    ],
    ids=["default-10-bit-seeds", "block4-rank2"],
)
def test_contract(codec, bound):
    check_contract(codec, heavy((16, 64)), max_rel_err=bound)


def test_lfsr_doctests():
    run_doctests("rbeformat.codecs.util.lfsr")


@pytest.mark.parametrize("bits", sorted(lfsr.TAPS))
def test_feedback_polynomials_are_maximal(bits):
    assert lfsr.period(bits) == 2**bits - 1


def test_lfsr_test_vectors():
    assert lfsr.states(1, 16, 10).tolist() == SEED1_STATES
    assert lfsr.states(0xACE1, 16, 1).tolist() == [0x5670]
    table = basis_table(8, 3, 16)
    assert table[1].tolist() == SEED1_U and table[12345].tolist() == SEED12345_U
    assert lfsr.values(np.array([1, 2**15, 2**16 - 1]), 16).tolist() == [-1 + 2**-15, 0.0, 1 - 2**-15]


@pytest.mark.parametrize("bits", [8, 11, 16])
def test_vectorised_table_matches_reference_steps(bits):
    rng = np.random.default_rng(bits)
    table = basis_table(5, 2, bits)
    for seed in rng.integers(1, 2**bits, 5):
        assert (table[seed] == reference_basis(int(seed), 5, 2, bits)).all()


# Bounds: measured (0.113, 0.213, 0.225) plus ~10%.  The least-squares fit on
# the best of 2**16 - 1 random 8x3 bases leaves ~9% of a Gaussian block's norm;
# 4-bit coefficients with a power-of-two scale add the rest.  Fewer seeds
# (seed_bits 10) or more weights per seed (block 12) leave more.
@pytest.mark.parametrize(
    "config,bound",
    [
        ({}, 0.125),
        ({"block": 12, "rank": 4}, 0.235),
        ({"block": 8, "rank": 3, "seed_bits": 10}, 0.25),
    ],
)
def test_normal_error_bound(config, bound):
    roundtrip(SeedCodec(**config), normal((32, 96)), max_rel_err=bound)


def test_heavy_tailed_error_bound_and_exact_decode():
    x = heavy((24, 64))
    codec = SeedCodec()
    enc, y = roundtrip(codec, x, max_rel_err=0.135)  # measured 0.122
    assert y.tobytes() == reference_decode(codec, enc.parts, enc.params, x.shape).tobytes()


def test_bits_equal_stored_parts_and_formula():
    codec = SeedCodec(block=16, rank=3, seed_bits=12)
    x = normal((5, 48))
    enc, _ = roundtrip(codec, x)  # parts as declared, bit cost == stored bits
    n = x.size // 16
    assert codec.bit_cost(enc.params, x.shape) == 8 * (
        bitpack.packed_size(n, 12) + bitpack.packed_size(3 * n, 4) + bitpack.packed_size(n, 4)
    )


def test_zero_blocks_shapes_and_values():
    codec = SeedCodec(seed_bits=10)
    x = np.zeros((2, 3, 16), np.float32)
    x[0, 0, :8] = normal(8)
    _, y = roundtrip(codec, x)
    assert not y[1].any() and not y[0, 1:].any() and y[0, 0, :8].any()
    assert codec.accepts((8,)) and not codec.accepts((12,)) and not codec.accepts(())
    with pytest.raises(ValueError, match="NaN or infinite"):
        codec.encode(np.full(8, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"shape \(12,\)"):
        codec.encode(np.ones(12, np.float32))


def test_deterministic():
    x = heavy((8, 64), seed=5)
    a, b = SeedCodec().encode(x), SeedCodec().encode(x)
    assert a.params == b.params and all(a.parts[k].tobytes() == b.parts[k].tobytes() for k in a.parts)


def test_config_validation():
    good = SeedCodec(block=12, rank=4, coef_bits=5, exp_bits=3, seed_bits=14).config()
    for key, value in [
        ("block", 1),
        ("block", 33),
        ("rank", 0),
        ("rank", 13),
        ("coef_bits", 1),
        ("coef_bits", 9),
        ("exp_bits", 0),
        ("seed_bits", 7),
        ("seed_bits", 17),
        ("block", "8"),
    ]:
        with pytest.raises(FormatError, match=key):
            SeedCodec.from_config({**good, key: value}, "c")
    with pytest.raises(FormatError, match="2\\*\\*24"):  # 8 * 2**(16 + 8 - 2) products could round
        SeedCodec.from_config({**good, "rank": 8, "block": 16, "coef_bits": 8, "seed_bits": 16}, "c")
    with pytest.raises(FormatError, match="missing key"):
        SeedCodec.from_config({k: v for k, v in good.items() if k != "exp_bits"}, "c")


def test_recorded_candidates_never_affect_reading():
    """candidates is written for older readers; any value, or none, reads the same."""
    writer = SeedCodec(seed_bits=10, candidates=4)
    assert writer.config()["candidates"] == 4
    assert_recorded_settings_ignored(writer, heavy((4, 32), seed=4))
    for value in (3, 128):  # not a power of two, above the limit: refused from a user, accepted from a file
        assert SeedCodec.from_config({**writer.config(), "candidates": value}, "c") == SeedCodec(seed_bits=10)
    # A user still cannot ask the encoder for a count that does not split the seeds evenly.
    with pytest.raises(ValueError, match=r"seed\.candidates"):
        SeedCodec(candidates=6)


def _encoded():
    codec = SeedCodec(seed_bits=10)
    x = normal((4, 32))
    return codec, x.shape, codec.encode(x)


@pytest.mark.parametrize(
    "params",
    [
        None,
        {},
        {"exp_bias": "3"},
        {"exp_bias": 3.0},
        {"exp_bias": 1000},
        {"exp_bias": -1000},
        {"exp_bias": 3, "more": 1},
    ],
)
def test_hostile_params(params):
    codec, shape, _ = _encoded()
    with pytest.raises(FormatError):
        codec.part_specs(params, shape, "t")


def test_hostile_parts():
    codec, shape, enc = _encoded()
    for name in enc.parts:
        with pytest.raises(FormatError):
            codec.decode({**enc.parts, name: enc.parts[name][:-1]}, enc.params, shape, "t")
    seeds = bitpack.unpack(enc.parts["seeds"], 10, 16)
    seeds[3] = 0
    with pytest.raises(FormatError, match="seed 0"):
        codec.decode({**enc.parts, "seeds": bitpack.pack(seeds, 10)}, enc.params, shape, "t")
    with pytest.raises(FormatError):
        codec.part_specs(enc.params, (4, 30), "t")
    # Any other stored value is a valid code: extreme ones decode to finite floats.
    low, high = codec._bias_range()
    parts = {
        "seeds": bitpack.pack(np.full(16, 1023), 10),
        "coeffs": np.full(24, 0xFF, np.uint8),
        "exponents": np.full(8, 0xFF, np.uint8),
    }
    for bias in (low, high):
        y = codec.decode(parts, {"exp_bias": bias}, shape, "t")
        assert (
            np.isfinite(y).all() and y.tobytes() == reference_decode(codec, parts, {"exp_bias": bias}, shape).tobytes()
        )


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=30, max_size=30), st.integers(-200, 200))
def test_random_part_bytes_decode_or_raise_format_error(data, bias):
    codec = SeedCodec(block=8, rank=3, seed_bits=12)
    shape = (2, 24)  # 6 blocks: 9 seed bytes, 9 coefficient bytes, 3 exponent bytes
    parts = {
        "seeds": np.frombuffer(data[:9], np.uint8),
        "coeffs": np.frombuffer(data[9:18], np.uint8),
        "exponents": np.frombuffer(data[18:21], np.uint8),
    }
    try:
        y = codec.decode(parts, {"exp_bias": bias}, shape, "t")
    except FormatError:
        return
    assert y.shape == shape and np.isfinite(y).all()
    assert y.tobytes() == reference_decode(codec, parts, {"exp_bias": bias}, shape).tobytes()
