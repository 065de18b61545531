"""transpose: a matrix stored as its transpose, exact alone, groups along the other axis when chained."""

import numpy as np
import pytest
from harness import assert_params_refused, check_contract, rel_err, roundtrip
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_samples import JSON, gptq_problem, normal, only_format_errors, wild

from rbeformat import FormatError, InputError, Reader, Writer
from rbeformat.chain import parse_chain
from rbeformat.codecs.core.tensor import Calibration
from rbeformat.codecs.encoders import gptq
from rbeformat.codecs.registry import TENSOR_CODECS
from rbeformat.codecs.transpose import Transpose

CHAIN = "transpose(values=gquant(bits=4, group=32, mode=asym))"


def chain(text):
    return parse_chain(text, TENSOR_CODECS)


def write_and_read(tmp_path, x, text, calibration=None):
    """(decoded tensor, the stored manifest's tensor entries)."""
    from rbe_craft import split_file

    path = tmp_path / "t.rbe"
    with Writer(path, force=True) as w:
        w.add_transformed("w", "F32", x, chain(text), calibration=calibration)
    with Reader(path) as r:
        assert list(r.verify(deep=True)) == []
        decoded = r.get_tensor("w")
    return decoded, split_file(path.read_bytes())[1]["tensors"]


@pytest.mark.parametrize("shape", [(64, 48), (1, 7), (9, 1)], ids=["wide", "one-row", "one-column"])
def test_contract(shape):
    check_contract(Transpose(), wild(shape), max_rel_err=0.0)


@pytest.mark.parametrize("data", [normal, wild])
def test_round_trip_is_bit_exact_and_values_is_the_transpose(data):
    x = data((5, 11))
    x[0, 0], x[1, 2], x[3, 4] = np.nan, -np.inf, -0.0
    enc, out = roundtrip(Transpose(), x)
    assert enc.params == {} and enc.parts["values"].shape == (11, 5)
    assert enc.parts["values"].tobytes() == np.ascontiguousarray(x.T).tobytes()
    assert out.tobytes() == x.tobytes() and out.flags.c_contiguous
    assert Transpose().is_lossless()


def test_bit_cost_is_the_transposed_float32_matrix():
    assert Transpose().bit_cost({}, (96, 40)) == 32 * 96 * 40


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), (0, 4), (4, 0), ()])
def test_only_non_empty_matrices_are_accepted(shape):
    assert not Transpose().accepts(shape)
    assert_params_refused(Transpose(), {}, shape)


def test_chain_text_parses_and_prints_back():
    parsed = chain(CHAIN)
    assert isinstance(parsed.codec, Transpose) and set(parsed.parts) == {"values"}
    assert parsed.text() == "transpose(values=gquant(bits=4, group=32, mode=asym, scale_dtype=F16))"
    assert chain(parsed.text()).text() == parsed.text()
    assert chain("transpose").text() == "transpose()"


@pytest.mark.parametrize(
    "text,message",
    [
        ("transpose(axis=1)", "no setting 'axis'"),
        ("transpose(codes=gquant())", "no setting 'codes'"),
        ("transpose(values=normdelta())", "shares state"),
    ],
)
def test_bad_chains_are_usage_errors(text, message):
    from rbeformat import UsageError

    with pytest.raises(UsageError, match=message):
        chain(text)


def test_chained_gquant_groups_along_the_first_axis(tmp_path):
    # Each column of x has a scale of its own, 1000x apart across a row.
    x = (normal((64, 16)) * np.logspace(-3, 0, 16)[None, :]).astype(np.float32)
    decoded, tensors = write_and_read(tmp_path, x, CHAIN)
    inner = TENSOR_CODECS["gquant"](bits=4, group=32, mode="asym")
    enc = inner.encode(np.ascontiguousarray(x.T))
    expected = inner.decode(enc.parts, enc.params, (16, 64), "v").T
    assert decoded.tobytes() == np.ascontiguousarray(expected).tobytes()
    values = tensors[0]["parts"]["values"]
    assert values["shape"] == [16, 64] and values["parts"]["scales"]["shape"] == [16, 2]
    untransposed, _ = write_and_read(tmp_path, x, "gquant(bits=4, group=32, mode=asym)")
    small = slice(0, 4)  # the columns of the smallest scale: lost in a row's shared scale
    assert rel_err(x[:, small], decoded[:, small]) < 0.2 * rel_err(x[:, small], untransposed[:, small])


def test_hostile_values_shape_is_a_format_error():
    x = normal((6, 4))
    enc = Transpose().encode(x)
    for bad in (x, np.zeros((4, 7), np.float32), np.zeros((24,), np.float32), enc.parts["values"].astype(np.float16)):
        with pytest.raises(FormatError, match="part 'values' should be F32 \\(4, 6\\)"):
            Transpose().decode({"values": bad}, {}, (6, 4), "t")
    with pytest.raises(FormatError, match="transpose needs a non-empty 2-D tensor"):
        Transpose().decode(enc.parts, {}, (24,), "t")


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t["parts"]["values"].__setitem__("shape", [6, 4]),  # the same 24 values, untransposed
        lambda t: t.__setitem__("shape", [3, 8]),  # a tensor shape the stored values do not fit
        lambda t: t.__setitem__("shape", [24]),
        lambda t: t.__setitem__("params", {"axes": [1, 0]}),
    ],
    ids=["values-shape", "tensor-shape", "not-a-matrix", "params"],
)
def test_a_hostile_file_is_refused_with_a_format_error(tmp_path, edit):
    from rbe_craft import assemble, split_file

    path = tmp_path / "h.rbe"
    with Writer(path, force=True) as w:
        w.add_transformed("w", "F32", normal((6, 4)), chain("transpose"))
    area, manifest = split_file(path.read_bytes())
    edit(manifest["tensors"][0])
    path.write_bytes(assemble(area, manifest))
    with pytest.raises(FormatError):
        with Reader(path) as r:
            r.get_tensor("w")


@settings(max_examples=60, deadline=None)
@given(params=JSON, rows=st.integers(0, 3), cols=st.integers(0, 3))
def test_any_params_and_parts_give_format_errors_only(params, rows, cols):
    parts = {"values": np.zeros((cols, rows), np.float32)}
    only_format_errors(
        lambda: Transpose().decode(parts, params, (rows, cols), "t"),
        lambda: Transpose().decode(parts, {}, (rows, cols, 1), "t"),
    )


def test_calibration_passes_unchanged_to_the_values_chain():
    w, hessian = gptq_problem()  # w is (out, in); stored input x output it is w.T
    calibration = Calibration("gptq", hessian)
    enc = Transpose().encode(w.T, calibration=calibration)
    assert Transpose().part_calibration("values", calibration, enc) is calibration
    with pytest.raises(ValueError, match="does not fit"):
        Transpose().encode(w, calibration=calibration)  # (out, in): 64 rows, H is for 128 inputs


def test_gptq_through_the_chain_lowers_the_output_error(tmp_path):
    w, hessian = gptq_problem()
    text = "transpose(values=gquant(bits=4, group=32, mode=asym))"
    plain, _ = write_and_read(tmp_path, np.ascontiguousarray(w.T), text)
    calibrated, _ = write_and_read(tmp_path, np.ascontiguousarray(w.T), text, Calibration("gptq", hessian))
    err_plain, err_cal = (gptq.output_error(w, out.T, hessian) for out in (plain, calibrated))
    assert err_cal < 0.8 * err_plain, (err_cal, err_plain)
    direct = TENSOR_CODECS["gquant"](bits=4, group=32, mode="asym")
    enc = direct.encode(w, calibration=Calibration("gptq", hessian))
    expected = direct.decode(enc.parts, enc.params, w.shape, "w")
    assert calibrated.T.tobytes() == np.ascontiguousarray(expected).tobytes()  # exactly GPTQ on (out, in)
    with pytest.raises(InputError, match="cannot encode"):
        write_and_read(tmp_path, np.ascontiguousarray(w.T), text, Calibration("gptq", np.eye(64)))
