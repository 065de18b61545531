"""slices: whole slices kept or dropped along one axis, kept values exact or chained, hostile masks refused."""

import math

import numpy as np
import pytest
from harness import assert_params_refused, check_contract, rel_err, roundtrip
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import JSON, normal, only_format_errors, wild

from rbeformat import FormatError, InputError, Reader, Writer
from rbeformat.chain import parse_chain
from rbeformat.codecs.core.tensor import Calibration
from rbeformat.codecs.encoders import gptq
from rbeformat.codecs.registry import TENSOR_CODECS
from rbeformat.codecs.slices import Slices


def pruned(shape, axis, dropped, data=normal):
    """Sample data with the slices ``dropped`` along ``axis`` zeroed."""
    x = data(shape)
    index = [slice(None)] * len(shape)
    index[axis] = list(dropped)
    x[tuple(index)] = 0
    return x


def chain(text):
    return parse_chain(text, TENSOR_CODECS)


@pytest.mark.parametrize(
    "axis,shape,dropped",
    [
        (0, (64, 48), range(8, 24)),
        (1, (64, 48), [0, 5, 47]),
        (1, (3, 13, 8), [0, 4, 5, 12]),
        (2, (2, 3, 9), []),
    ],
    ids=["rows", "columns", "3d-padding", "nothing-dropped"],
)
def test_contract(axis, shape, dropped):
    check_contract(Slices(axis=axis), pruned(shape, axis, dropped, wild), max_rel_err=0.0)


@pytest.mark.parametrize("data", [normal, wild])
@pytest.mark.parametrize(
    "axis,shape,dropped",
    [
        (0, (16, 8), [0, 1, 15]),
        (1, (16, 8), [3]),
        (0, (9,), [2, 8]),
        (2, (2, 3, 17), range(0, 17, 2)),
        (1, (4, 64, 2), range(8, 64)),
    ],
)
def test_round_trip_keeps_exactly_the_nonzero_slices(data, axis, shape, dropped):
    x = pruned(shape, axis, dropped, data)
    enc, out = roundtrip(Slices(axis=axis), x)
    assert out.tobytes() == x.tobytes()  # every kept value is copied, every dropped slice is +0.0
    kept = [i for i in range(shape[axis]) if i not in set(dropped)]
    assert enc.params == {"count": len(kept)}
    bits = np.unpackbits(enc.parts["mask"], bitorder="little")
    assert np.flatnonzero(bits).tolist() == kept  # and the padding bits are zero
    np.testing.assert_array_equal(enc.parts["values"], np.take(x, kept, axis=axis))


def test_no_zero_slice_sets_every_bit_and_stores_the_tensor():
    x = normal((5, 11))
    enc, out = roundtrip(Slices(axis=1), x)
    assert enc.parts["mask"].tolist() == [0xFF, 0x07] and enc.params == {"count": 11}
    assert enc.parts["values"].tobytes() == x.tobytes()


def test_a_slice_with_one_nonzero_element_is_kept():
    x = np.zeros((4, 6), np.float32)
    x[2, 3] = 1e-30
    x[0, 5] = np.nan
    x[1, 1] = -np.inf
    enc, out = roundtrip(Slices(axis=0), x)
    assert enc.params == {"count": 3}
    assert out.tobytes() == x.tobytes()


def test_negative_zero_slices_are_dropped_and_decode_as_positive_zero():
    x = normal((3, 4))
    x[1] = -0.0
    enc, out = roundtrip(Slices(axis=0), x)
    assert enc.params == {"count": 2} and np.array_equal(out, x)
    assert not np.signbit(out[1]).any()
    assert not Slices().is_lossless()


def test_an_all_zero_tensor_keeps_one_slice_and_count_zero_decodes():
    enc, out = roundtrip(Slices(axis=1), np.zeros((3, 5), np.float32))
    assert enc.params == {"count": 1} and enc.parts["values"].shape == (3, 1) and not out.any()
    empty = {"mask": np.zeros(1, np.uint8), "values": np.zeros((3, 0), np.float32)}
    assert not Slices(axis=1).decode(empty, {"count": 0}, (3, 5), "x").any()


def test_bit_cost():
    codec = Slices(axis=1)
    assert codec.bit_cost({"count": 3}, (4, 10)) == 8 * 2 + 32 * 3 * 4
    assert codec.bit_cost({"count": 0}, (4, 10)) == 16
    assert Slices(axis=0).bit_cost({"count": 5}, (8, 2, 3)) == 8 + 32 * 5 * 6
    x = pruned((64, 48), 1, range(16))
    enc, _ = roundtrip(codec, x)  # equals the stored bytes
    assert codec.bit_cost(enc.params, x.shape) == 8 * 6 + 32 * 64 * 32


def test_the_spec_example():
    x = np.zeros((2, 10), np.float32)
    x[:, [0, 3, 8, 9]] = [[1.5, 0.25, 4.0, -0.5], [-2.0, 0.0, 1.0, 3.0]]
    enc, out = roundtrip(Slices(axis=1), x)
    assert enc.parts["mask"].tobytes() == bytes([0x09, 0x03]) and enc.params == {"count": 4}
    assert Slices(axis=1).bit_cost(enc.params, x.shape) == 272
    for mask in ([0x09, 0x43], [0x09, 0x01]):  # a padding bit set; three slices for count 4
        with pytest.raises(FormatError):
            Slices(axis=1).decode({**enc.parts, "mask": np.array(mask, np.uint8)}, enc.params, x.shape, "x")


def test_accepts_and_settings():
    assert Slices(axis=0).accepts((3,)) and Slices(axis=2).accepts((1, 1, 4))
    assert not any(Slices(axis=1).accepts(s) for s in [(3,), (), (0, 4), (4, 0)])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        Slices(axis=1).encode(np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"slices\.axis \("):
        Slices(axis=-1)
    with pytest.raises(ValueError, match=r"slices\.axis \("):
        Slices(axis=8)
    assert Slices(axis=3).config() == {"axis": 3}


@pytest.mark.parametrize(
    "config,message",
    [
        ({}, "missing key"),
        ({"axis": -1}, "c.axis"),
        ({"axis": 8}, "c.axis"),
        ({"axis": 1.0}, "c.axis"),
        ({"axis": True}, "c.axis"),
        ({"axis": "0"}, "c.axis"),
        ({"axis": 0, "x": 1}, "unexpected key"),
        (None, "expected an object"),
    ],
)
def test_bad_configs_are_format_errors(config, message):
    with pytest.raises(FormatError, match=message):
        Slices.from_config(config, "c")


@pytest.mark.parametrize(
    "params,shape",
    [
        (None, (4, 10)),
        ([], (4, 10)),
        ({}, (4, 10)),
        ({"count": -1}, (4, 10)),
        ({"count": 11}, (4, 10)),
        ({"count": 3.0}, (4, 10)),
        ({"count": True}, (4, 10)),
        ({"count": "3"}, (4, 10)),
        ({"count": 1 << 60}, (4, 10)),
        ({"count": 3, "index": "mask"}, (4, 10)),
        ({"count": 0}, (10,)),
        ({"count": 0}, ()),
        ({"count": 0}, (0, 4)),
        ({"count": 0}, (4, 0)),
    ],
)
def test_hostile_params_and_shapes_are_format_errors(params, shape):
    assert_params_refused(Slices(axis=1), params, shape)


def test_hostile_parts_are_format_errors():
    codec, shape = Slices(axis=1), (2, 10)
    values = np.ones((2, 3), np.float32)
    for mask in ([0b00000111, 0b00000100], [0b00000011, 0], [0b00001111, 0], [0xFF, 0xFF], [0, 0]):
        with pytest.raises(FormatError):
            codec.decode({"mask": np.array(mask, np.uint8), "values": values}, {"count": 3}, shape, "x")
    good = {"mask": np.array([0b111, 0], np.uint8), "values": values}
    assert codec.decode(good, {"count": 3}, shape, "x")[:, :3].tolist() == [[1, 1, 1]] * 2
    for bad in (
        {**good, "values": np.ones((3, 2), np.float32)},
        {**good, "values": np.ones(6, np.float32)},
        {**good, "mask": np.zeros(1, np.uint8)},
        {**good, "mask": np.zeros(2, np.int8)},
    ):
        with pytest.raises(FormatError):
            codec.decode(bad, {"count": 3}, shape, "x")


def test_random_masks_never_crash():
    rng = np.random.default_rng(5)
    for _ in range(300):
        axis = int(rng.integers(0, 3))
        shape = tuple(int(d) for d in rng.integers(1, 12, axis + 1))
        n, k = shape[axis], int(rng.integers(0, shape[axis] + 1))
        values = np.ones(shape[:axis] + (k,) + shape[axis + 1 :], np.float32)
        mask = rng.integers(0, 256, math.ceil(n / 8), dtype=np.uint8)
        try:
            out = Slices(axis=axis).decode({"mask": mask, "values": values}, {"count": k}, shape, "x")
        except FormatError:
            continue
        assert out.shape == shape and int(out.sum()) == values.size


@settings(max_examples=300, deadline=None)
@given(
    params=JSON | st.fixed_dictionaries({}, optional={"count": JSON}),
    config=JSON | st.fixed_dictionaries({"axis": JSON}),
)
def test_any_json_params_and_config_raise_only_format_errors(params, config):
    only_format_errors(lambda: Slices(axis=1).part_specs(params, (6, 5), "x"), lambda: Slices.from_config(config, "c"))


# ---------------------------------------------------------------- in a chain


def write_and_read(tmp_path, x, text, calibration=None):
    path = tmp_path / "t.rbe"
    with Writer(path, force=True) as w:
        stats = w.add_transformed("w", "F32", x, chain(text), calibration=calibration)
    with Reader(path) as r:
        assert list(r.verify(deep=True)) == []
        return r.get_tensor("w"), stats


@pytest.mark.parametrize("axis", [0, 1])
def test_chained_gquant_quantizes_only_the_kept_slices(tmp_path, axis):
    dropped = list(range(0, 64, 2))
    x = pruned((64, 128), axis, dropped) * 0.02
    out, stats = write_and_read(tmp_path, x, f"slices(axis={axis}, values=gquant(bits=4, group=64))")
    assert not np.take(out, dropped, axis=axis).any()  # dropped slices stay exactly zero
    assert 0 < stats["rel_error"] < 0.12 and rel_err(x, out) == pytest.approx(stats["rel_error"], rel=1e-5)
    # The kept values decode as gquant alone decodes them.
    kept = np.delete(x, dropped, axis=axis)
    codec = TENSOR_CODECS["gquant"](bits=4, group=64)
    enc = codec.encode(kept)
    np.testing.assert_array_equal(
        np.delete(out, dropped, axis=axis), codec.decode(enc.parts, enc.params, kept.shape, "k")
    )


RNG = np.random.default_rng(11)
N = 256
MIX = RNG.standard_normal((N, N)) / np.sqrt(N) + np.eye(N)
X = (RNG.standard_normal((4096, N)) @ MIX) * np.exp(RNG.standard_normal(N) * 0.7)
HESSIAN = X.T @ X / len(X)
# A Linear weight with a quarter of its input columns (whole 32-wide "heads") pruned.
DROPPED = list(range(32, 64)) + list(range(160, 192))
W = pruned((96, N), 1, DROPPED) * 0.02


def test_gptq_through_the_chain_lowers_the_output_error(tmp_path):
    text = "slices(axis=1, values=gquant(bits=4, group=64, gptq_order=activation))"
    plain, _ = write_and_read(tmp_path, W, text)
    calibrated, _ = write_and_read(tmp_path, W, text, Calibration("gptq", HESSIAN))
    assert not calibrated[:, DROPPED].any()
    err_plain, err_cal = (gptq.output_error(W, out, HESSIAN) for out in (plain, calibrated))
    assert err_cal < 0.8 * err_plain, (err_cal, err_plain)


def test_part_calibration_restricts_the_hessian_to_the_kept_columns():
    calibration = Calibration("gptq", HESSIAN)
    enc = Slices(axis=1).encode(W, calibration=calibration)
    kept = [j for j in range(N) if j not in DROPPED]
    sub = Slices(axis=1).part_calibration("values", calibration, enc)
    assert sub.method == "gptq" and np.array_equal(sub.hessian, HESSIAN[np.ix_(kept, kept)])
    rows = Slices(axis=0).encode(pruned((N, 96), 0, DROPPED))
    wide = Calibration("gptq", np.eye(96))
    assert Slices(axis=0).part_calibration("values", wide, rows) is wide  # rows dropped: the same inputs
    assert Slices(axis=1).part_calibration("mask", calibration, enc) is None
    three_d = Slices(axis=1).encode(pruned((2, 8, 4), 1, [1]))
    assert Slices(axis=1).part_calibration("values", Calibration("gptq", np.eye(8)), three_d) is None
    with pytest.raises(ValueError, match="does not fit"):
        Slices(axis=1).part_calibration("values", Calibration("gptq", np.eye(N + 8)), enc)


def test_a_calibration_that_does_not_fit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        Slices(axis=1).encode(W, calibration=Calibration("gptq", np.eye(N - 1)))
    with pytest.raises(InputError, match="cannot encode"):
        write_and_read(tmp_path, W, "slices(axis=1, values=gquant(bits=4, group=64))", Calibration("gptq", np.eye(8)))


def test_other_codecs_hand_no_calibration_to_their_parts():
    codec = TENSOR_CODECS["gquant"](bits=4, group=64)
    assert codec.part_calibration("scales", Calibration("gptq", HESSIAN), codec.encode(W)) is None


def test_a_part_codec_without_the_method_encodes_uncalibrated(tmp_path):
    # lowrank has no GPTQ encoder: the values chain runs without the calibration, as without one.
    text = "slices(axis=1, values=lowrank(rank=8))"
    plain, _ = write_and_read(tmp_path, W, text)
    calibrated, _ = write_and_read(tmp_path, W, text, Calibration("gptq", HESSIAN))
    assert plain.tobytes() == calibrated.tobytes()
