"""sparse and nm24: exactly the largest magnitudes kept, compact indices, hostile parts refused."""

import math

import numpy as np
import pytest
from harness import assert_params_refused, check_contract, rel_err, roundtrip
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import JSON, normal, only_format_errors, wild

from rbeformat import FormatError
from rbeformat.codecs.sparse import NM24, Sparse, delta_codes, delta_indices
from rbeformat.codecs.util import bitpack

SHAPE = (64, 48)


@pytest.mark.parametrize(
    "codec,params,bound",
    [
        (Sparse(0.5), {"count": 1536, "index": "mask"}, 0.09),  # measured 0.0826
        (Sparse(0.02), {"count": 61, "index": "deltas", "width": 7, "codes": 66}, 0.43),  # measured 0.414
        (NM24(), {}, 0.14),  # measured 0.126
    ],
    ids=["sparse-mask", "sparse-deltas", "nm24"],
)
def test_contract(codec, params, bound):
    x = wild(SHAPE)
    assert codec.encode(x).params == params  # the case covers the index structure it names
    check_contract(codec, x, max_rel_err=bound)


# ---------------------------------------------------------------- sparse


@pytest.mark.parametrize("data", [normal, wild])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_sparse_keeps_exactly_the_largest(data, density):
    x = data(SHAPE)
    enc, out = roundtrip(Sparse(density), x)
    k = max(1, math.floor(density * x.size + 0.5))
    assert enc.params["count"] == k and np.count_nonzero(out) == k
    kept = out != 0
    np.testing.assert_array_equal(out[kept], x[kept])  # kept values are bit-exact
    if 0 < k < x.size:
        assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()
    # The error is exactly the norm of the dropped values, the best any k-sparse tensor can do.
    dropped = np.sort(np.abs(x).reshape(-1).astype(np.float64))[: x.size - k]
    assert rel_err(x, out) == pytest.approx(np.sqrt((dropped**2).sum()) / np.linalg.norm(x), rel=1e-6, abs=1e-12)


def test_sparse_picks_the_smaller_index_structure():
    x = normal((100, 100))
    dense_enc, _ = roundtrip(Sparse(0.6), x)
    sparse_enc, _ = roundtrip(Sparse(0.02), x)
    assert dense_enc.params["index"] == "mask"
    assert sparse_enc.params["index"] == "deltas"
    # Near the entropy bound: H(0.02) = 0.141 bits per element, a mask costs 1.
    index_bits = sparse_enc.parts["deltas"].nbytes * 8 / x.size
    assert index_bits < 0.2


def test_sparse_ties_go_to_the_lowest_indices():
    x = np.ones(10, np.float32)
    enc, out = roundtrip(Sparse(0.3), x)
    assert out.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_sparse_keeps_at_least_one_and_decodes_zero_kept():
    enc, out = roundtrip(Sparse(0.2), np.array([5.0, 1.0], np.float32))  # 0.4 rounds to 0, one is kept
    assert enc.params["count"] == 1 and out.tolist() == [5.0, 0.0]
    empty = {"values": np.zeros(0, np.float32), "mask": np.zeros(1, np.uint8)}
    assert Sparse(0.5).decode(empty, {"count": 0, "index": "mask"}, (3,), "x").tolist() == [0, 0, 0]
    enc, out = roundtrip(Sparse(1.0), np.array([[-5.0]], np.float32))
    assert out.tolist() == [[-5.0]]


def test_sparse_keeps_infinities_and_refuses_nan():
    x = np.array([0.1, np.inf, -0.2, -np.inf], np.float32)
    _, out = roundtrip(Sparse(0.5), x)
    assert out.tolist() == [0, np.inf, 0, -np.inf]
    with pytest.raises(ValueError):
        Sparse(0.5).encode(np.array([np.nan, 1.0], np.float32))


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 13, 20])
def test_delta_codes_round_trip_with_escapes(width):
    rng = np.random.default_rng(width)
    n = 5000
    indices = np.sort(rng.choice(n, 60, replace=False))
    indices[0] = 0
    indices[-1] = n - 1
    codes = delta_codes(indices, width)
    assert len(codes) == 60 + sum(g // (2**width - 1) for g in np.diff(indices, prepend=-1) - 1)
    data = bitpack.pack(codes, width)
    np.testing.assert_array_equal(delta_indices(data, width, len(codes), n, "x"), indices)


def test_sparse_deterministic_and_bits_exact():
    for x in (normal(SHAPE), wild((7, 13)), normal((1000,))):
        for density in (0.03, 0.2, 0.7):
            codec = Sparse(density)
            one, _ = roundtrip(codec, x)  # bit cost == stored bits
            two = codec.encode(x)
            assert one.params == two.params
            assert all(one.parts[k].tobytes() == two.parts[k].tobytes() for k in one.parts)
    assert Sparse(0.5).bit_cost({"count": 10, "index": "mask"}, (9, 9)) == 32 * 10 + 8 * 11
    assert Sparse(0.5).bit_cost({"count": 10, "index": "deltas", "width": 3, "codes": 12}, (9, 9)) == 320 + 8 * 5


def test_sparse_mask_is_bitpack_width_one():
    x = normal((30, 30))
    enc, _ = roundtrip(Sparse(0.7), x)
    mask = (Sparse(0.7).decode(enc.parts, enc.params, x.shape, "x") != 0).reshape(-1).astype(np.uint8)
    assert enc.parts["mask"].tobytes() == bitpack.pack(mask, 1).tobytes()


@pytest.mark.parametrize(
    "config,message",
    [
        ({}, "missing key"),
        ({"density": 0}, "c.density"),
        ({"density": 1.01}, "c.density"),
        ({"density": "0.5"}, "c.density"),
        ({"density": True}, "c.density"),
        ({"density": float("nan")}, "c.density"),
        ({"density": float("inf")}, "c.density"),
        ({"density": 0.5, "x": 1}, "unexpected key"),
        (None, "expected an object"),
    ],
)
def test_sparse_bad_configs_are_format_errors(config, message):
    with pytest.raises(FormatError, match=message):
        Sparse.from_config(config, "c")


@pytest.mark.parametrize(
    "params",
    [
        None,
        {},
        {"count": 3},
        {"index": "mask"},
        {"count": 3, "index": "bits"},
        {"count": -1, "index": "mask"},
        {"count": 101, "index": "mask"},
        {"count": 3.0, "index": "mask"},
        {"count": 3, "index": "mask", "width": 2},
        {"count": 3, "index": "deltas", "width": 2},
        {"count": 3, "index": "deltas", "width": 0, "codes": 3},
        {"count": 3, "index": "deltas", "width": 8, "codes": 3},  # wider than 100 (7 bits) needs
        {"count": 3, "index": "deltas", "width": 2, "codes": 2},
        {"count": 3, "index": "deltas", "width": 2, "codes": 101},
        {"count": 3, "index": "deltas", "width": 2, "codes": 1 << 50},
    ],
)
def test_sparse_hostile_params_are_format_errors(params):
    with pytest.raises(FormatError):
        Sparse(0.5).part_specs(params, (10, 10), "x")
    with pytest.raises(FormatError):
        Sparse(0.5).decode({}, params, (10, 10), "x")


def test_sparse_hostile_parts_are_format_errors():
    codec = Sparse(0.5)
    values = np.ones(3, np.float32)
    # Mask: too few / too many bits set, padding bits set.
    for mask in ([0b00000011, 0], [0b00001111, 0], [0b00000111, 0b00000100]):
        with pytest.raises(FormatError):
            codec.decode(
                {"values": values, "mask": np.array(mask, np.uint8)}, {"count": 3, "index": "mask"}, (10,), "x"
            )
    deltas = {"count": 2, "index": "deltas", "width": 2, "codes": 3}
    for codes in ([0, 0, 3], [3, 3, 3], [3, 3, 0], [0, 2, 2]):  # trailing escape, too few kept, past the end
        with pytest.raises(FormatError):
            codec.decode({"values": values[:2], "deltas": bitpack.pack(np.array(codes), 2)}, deltas, (5,), "x")
    # Fewer values than the params say.
    enc = codec.encode(normal((10, 10)))
    with pytest.raises(FormatError):
        codec.decode({**enc.parts, "values": enc.parts["values"][:-1]}, enc.params, (10, 10), "x")


def test_sparse_random_delta_streams_never_crash():
    rng = np.random.default_rng(3)
    codec = Sparse(0.5)
    for _ in range(300):
        n, width = int(rng.integers(1, 60)), int(rng.integers(1, 7))
        width = min(width, n.bit_length())
        codes = int(rng.integers(0, n + 1))
        count = int(rng.integers(0, codes + 1))
        params = {"count": count, "index": "deltas", "width": width, "codes": codes}
        data = rng.integers(0, 256, bitpack.packed_size(codes, width), dtype=np.uint8)
        try:
            out = codec.decode({"values": np.ones(count, np.float32), "deltas": data}, params, (n,), "x")
        except FormatError:
            continue
        assert out.shape == (n,) and np.count_nonzero(out) == count


# ---------------------------------------------------------------- nm24


@pytest.mark.parametrize("data", [normal, wild])
@pytest.mark.parametrize("shape", [(64, 48), (3, 4), (7, 20), (40,), (2, 3, 8)])
def test_nm24_keeps_two_largest_of_four(data, shape):
    x = data(shape)
    enc, out = roundtrip(NM24(), x)
    assert enc.parts["values"].shape == (*shape[:-1], shape[-1] // 2)
    groups, decoded = x.reshape(-1, 4), out.reshape(-1, 4)
    kept = decoded != 0
    assert (kept.sum(axis=1) == 2).all()
    np.testing.assert_array_equal(decoded[kept], groups[kept])
    mag = np.abs(groups)
    assert (np.where(kept, mag, np.inf).min(axis=1) >= np.where(kept, -np.inf, mag).max(axis=1)).all()
    # The error is exactly that of dropping the two smallest of each group.
    two_smallest = np.sort(mag.astype(np.float64), axis=1)[:, :2]
    assert rel_err(x, out) == pytest.approx(np.sqrt((two_smallest**2).sum()) / np.linalg.norm(x), rel=1e-6)


def test_nm24_rel_error_on_gaussian_data():
    # Half of the elements dropped, but the small half: for 4 standard normals the
    # two smallest squares carry about 13.3% of the energy, so rel ~ sqrt(0.133) = 0.365.
    x = normal((256, 256))
    _, out = roundtrip(NM24(), x, max_rel_err=0.375)
    assert rel_err(x, out) > 0.355


def test_nm24_pattern_numbering_and_digit_order():
    # Groups with patterns 0..5 then 5: code0 = sum p_d * 6**d over groups 0..4, code1 = 5 (padded with 0).
    groups = np.zeros((6, 4), np.float32)
    for g, (i, j) in enumerate([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]):
        groups[g, [i, j]] = [g + 1, -(g + 1)]
    x = np.concatenate([groups, groups[5:]]).reshape(1, 28)
    enc = NM24().encode(x)
    expected = [0 + 1 * 6 + 2 * 36 + 3 * 216 + 4 * 1296, 5 + 5 * 6]
    assert bitpack.unpack(enc.parts["patterns"], 13, 2).tolist() == expected
    assert enc.parts["values"].reshape(-1).tolist() == [v for g in range(7) for v in (min(g, 5) + 1, -(min(g, 5) + 1))]


def test_nm24_ties_go_to_the_lower_positions():
    x = np.array([[1, 1, 1, 1, 0, 2, 2, 2]], np.float32)
    _, out = roundtrip(NM24(), x)
    assert out.tolist() == [[1, 1, 0, 0, 0, 2, 2, 0]]


def test_nm24_deterministic_and_bits_exact():
    for shape in [(64, 48), (3, 4), (5, 4), (6, 4), (11, 8)]:
        x = wild(shape)
        one, _ = roundtrip(NM24(), x)  # bit cost == stored bits
        two = NM24().encode(x)
        assert all(one.parts[k].tobytes() == two.parts[k].tobytes() for k in one.parts)
        groups = math.prod(shape) // 4
        assert NM24().bit_cost({}, shape) == 8 * math.ceil(13 * math.ceil(groups / 5) / 8) + 64 * groups


def test_nm24_config_and_shape_checks():
    assert NM24().config() == {}
    with pytest.raises(FormatError, match="unexpected key"):
        NM24.from_config({"x": 1}, "c")
    with pytest.raises(FormatError, match="expected an object"):
        NM24.from_config(None, "c")
    assert NM24().accepts((3, 8)) and NM24().accepts((8,))
    assert not any(NM24().accepts(s) for s in [(3, 6), (4, 2), (0, 4), ()])
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        NM24().encode(np.ones((2, 6), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        NM24().encode(np.full((1, 4), np.nan, np.float32))


@pytest.mark.parametrize(
    "params,shape", [({}, (3, 6)), ({}, (4, 2)), ({}, ()), ({}, (0, 4)), ({"a": 1}, (2, 4)), (None, (2, 4))]
)
def test_nm24_hostile_params_are_format_errors(params, shape):
    assert_params_refused(NM24(), params, shape)


def test_nm24_hostile_parts_are_format_errors():
    values = np.ones((1, 4), np.float32)
    for code in (7776, 8191):  # not below 6**5
        with pytest.raises(FormatError):
            NM24().decode({"patterns": bitpack.pack(np.array([code]), 13), "values": values}, {}, (1, 8), "x")
    with pytest.raises(FormatError):  # group 2 is padding and must hold pattern 0
        NM24().decode({"patterns": bitpack.pack(np.array([2 * 36]), 13), "values": values}, {}, (1, 8), "x")
    with pytest.raises(FormatError):  # patterns one byte short
        NM24().decode({"patterns": np.zeros(1, np.uint8), "values": values}, {}, (1, 8), "x")
    with pytest.raises(FormatError):
        NM24().decode({"patterns": np.zeros(2, np.uint8), "values": values.reshape(4)}, {}, (1, 8), "x")


def test_nm24_random_pattern_bytes_never_crash():
    rng = np.random.default_rng(4)
    for _ in range(300):
        shape = (int(rng.integers(1, 4)), 4 * int(rng.integers(1, 9)))
        size = NM24().part_specs({}, shape, "x")["patterns"].shape[0]
        parts = {
            "patterns": rng.integers(0, 256, size, dtype=np.uint8),
            "values": rng.standard_normal((shape[0], shape[1] // 2)).astype(np.float32),
        }
        try:
            out = NM24().decode(parts, {}, shape, "x")
        except FormatError:
            continue
        assert (np.count_nonzero(out.reshape(-1, 4), axis=1) <= 2).all()


KEYS = {"count": JSON, "index": st.sampled_from(["mask", "deltas"]) | JSON, "width": JSON, "codes": JSON}


@settings(max_examples=300, deadline=None)
@given(params=JSON | st.fixed_dictionaries({}, optional=KEYS), config=JSON | st.fixed_dictionaries({"density": JSON}))
def test_any_json_params_and_config_raise_only_format_errors(params, config):
    only_format_errors(
        lambda: Sparse(0.5).part_specs(params, (6, 5), "x"),
        lambda: Sparse.from_config(config, "c"),
        lambda: NM24().part_specs(params, (6, 8), "x"),
        lambda: NM24.from_config(config, "c"),
    )
