"""normdelta: bit-exact in "bits" mode, one rounding in "float" mode, the base checked."""

import numpy as np
import pytest
from harness import check_contract, roundtrip
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import JSON, only_format_errors

from rbeformat import FormatError
from rbeformat.codecs.normdelta import NormDelta, shared_base

BASE = "encoder.norm.base"


def layers(count=6, size=384, seed=0):
    """LayerNorm-like weights: a common profile around 1 plus a per-layer deviation."""
    rng = np.random.default_rng(seed)
    common = 1 + 0.2 * rng.standard_normal(size)
    return [(common + 0.02 * rng.standard_normal(size)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize(
    "mode,statistic,bound",
    [
        ("bits", "median", 0.0),  # lossless
        ("float", "mean", 1e-7),  # one float32 rounding at most; measured 0.0 on this sample
    ],
)
def test_contract(mode, statistic, bound):
    vectors = layers()
    base = shared_base(vectors, statistic)
    check_contract(NormDelta(BASE, mode), vectors[1], {BASE: base}, max_rel_err=bound)


def test_bits_mode_is_bit_exact_for_every_pattern():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, 4096, dtype=np.uint32).view(np.float32)  # NaNs, infinities, subnormals, all
    base = rng.integers(0, 2**32, 4096, dtype=np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38], np.float32)
    for xs, bs in ((x, base), (special, special[::-1].copy()), (x[:7], special)):
        enc, out = roundtrip(NormDelta(BASE, "bits"), xs, {BASE: bs})
        assert enc.parts["delta"].dtype == np.int32
        assert out.tobytes() == xs.tobytes()


def test_bits_mode_deltas_are_small_near_the_base():
    vectors = layers()
    base = shared_base(vectors)
    deltas = [NormDelta(BASE, "bits").encode(v, {BASE: base}).parts["delta"] for v in vectors]
    # The lower median is one layer's value at each position: 384 zero deltas in all.
    assert sum(int((d == 0).sum()) for d in deltas) == 384
    # Within +-10% of the base, the bit patterns differ by far less than 2**23 (one binade).
    assert max(int(np.abs(d).max()) for d in deltas) < 2**23


@pytest.mark.parametrize("seed", [0, 1])
def test_float_mode_error_is_one_rounding(seed):
    vectors = layers(seed=seed)
    heavy = np.random.default_rng(seed).standard_t(2, 384).astype(np.float32)
    base = shared_base(vectors, "mean")
    for x in vectors + [heavy]:
        enc, out = roundtrip(NormDelta(BASE, "float"), x, {BASE: base})
        assert enc.parts["delta"].dtype == np.float32
        # x^ = base + fl(x - base): two float32 roundings at most.
        eps = np.finfo(np.float32).eps
        assert (np.abs(out - x) <= eps * (np.abs(x - base) + np.abs(x))).all()


def test_float_mode_with_a_coarse_delta():
    # What a chain does: the delta quantized; the error is that of the delta only.
    vectors = layers()
    base = shared_base(vectors, "mean")
    codec = NormDelta(BASE, "float")
    x = vectors[2]
    enc = codec.encode(x, {BASE: base})
    step = 1e-3
    coarse = (np.round(enc.parts["delta"] / step) * step).astype(np.float32)
    out = codec.decode({"delta": coarse}, {}, x.shape, "x", {BASE: base})
    assert np.abs(out - x).max() <= step / 2 + 1e-6


def test_shared_base():
    vectors = [np.array(v, np.float32) for v in ([1, 5, 3], [2, 4, 9], [3, 6, 1], [4, 0, 2])]
    assert shared_base(vectors).tolist() == [2, 4, 2]  # lower median, a value of one vector
    assert shared_base(vectors[:3]).tolist() == [2, 5, 3]
    assert shared_base(vectors, "mean").tolist() == [2.5, 3.75, 3.75]
    with pytest.raises(ValueError):
        shared_base(vectors, "mode")


def test_modes_declare_lossless_and_chainable():
    bits, flt = NormDelta(BASE, "bits"), NormDelta(BASE, "float")
    assert bits.is_lossless() and bits.chainable() == ()
    assert not flt.is_lossless() and flt.chainable() == ("delta",)
    assert bits.references() == flt.references() == [BASE]


def test_deterministic_and_bits_exact():
    vectors = layers()
    base = shared_base(vectors)
    for mode in ("bits", "float"):
        codec = NormDelta(BASE, mode)
        one, _ = roundtrip(codec, vectors[1], {BASE: base})  # bit cost == stored bits
        two = codec.encode(vectors[1], {BASE: base})
        assert one.parts["delta"].tobytes() == two.parts["delta"].tobytes()
        assert codec.bit_cost(one.params, (384,)) == 32 * 384
    assert NormDelta(BASE).bit_cost({}, (3, 5)) == 32 * 15


@pytest.mark.parametrize(
    "config,message",
    [
        ({}, "missing key"),
        ({"base": BASE}, "missing key"),
        ({"mode": "bits"}, "missing key"),
        ({"base": "", "mode": "bits"}, "c.base"),
        ({"base": 3, "mode": "bits"}, "c.base"),
        ({"base": "n" * 2000, "mode": "bits"}, "c.base"),
        ({"base": BASE, "mode": "int"}, "c.mode"),
        ({"base": BASE, "mode": "bits", "x": 0}, "unexpected key"),
        (None, "expected an object"),
    ],
)
def test_bad_configs_are_format_errors(config, message):
    with pytest.raises(FormatError, match=message):
        NormDelta.from_config(config, "c")


def test_hostile_inputs_are_format_errors():
    codec = NormDelta(BASE, "bits")
    x = layers()[0]
    enc = codec.encode(x, {BASE: x})
    good_refs = {BASE: x}
    cases = [
        (enc.parts, enc.params, None),
        (enc.parts, enc.params, {}),
        (enc.parts, enc.params, {"other": x}),
        (enc.parts, enc.params, {BASE: x[:-1]}),
        (enc.parts, enc.params, {BASE: x.astype(np.float64)}),
        (enc.parts, {"x": 1}, good_refs),
        (enc.parts, None, good_refs),
        ({"delta": enc.parts["delta"].view(np.float32)}, enc.params, good_refs),
        ({"delta": enc.parts["delta"][:-1]}, enc.params, good_refs),
    ]
    for parts, params, refs in cases:
        with pytest.raises(FormatError):
            codec.decode(parts, params, x.shape, "x", refs)
    with pytest.raises(FormatError):
        codec.encode(x, {BASE: x[:10]})
    with pytest.raises(FormatError):
        NormDelta(BASE, "float").decode({"delta": enc.parts["delta"]}, {}, x.shape, "x", good_refs)  # I32 given


def test_other_shapes():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    base = np.ones((3, 4), np.float32)
    for mode in ("bits", "float"):
        _, out = roundtrip(NormDelta(BASE, mode), x, {BASE: base})
        np.testing.assert_array_equal(out, x)
    _, out = roundtrip(NormDelta(BASE, "bits"), np.float32(2.5).reshape(()), {BASE: np.float32(1).reshape(())})
    assert out.shape == () and float(out) == 2.5


@settings(max_examples=300, deadline=None)
@given(params=JSON, config=JSON | st.fixed_dictionaries({"base": JSON | st.text(), "mode": JSON | st.just("bits")}))
def test_any_json_params_and_config_raise_only_format_errors(params, config):
    only_format_errors(
        lambda: NormDelta(BASE).part_specs(params, (4,), "x"), lambda: NormDelta.from_config(config, "c")
    )
