"""Float conversions and error statistics of large tensors, in bounded memory."""

import numpy as np
import pytest

from rbeformat import values


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_stored_error_stats_of_a_large_tensor_block_by_block_match_the_whole(monkeypatch, dtype):
    rng = np.random.default_rng(3)
    original = rng.standard_normal((257, 33)).astype(np.float32)
    reference = values.from_float32(original, dtype)
    decoded = original + rng.standard_normal(original.shape).astype(np.float32) * 0.01
    whole = values.stored_error_stats(reference, decoded, dtype)
    monkeypatch.setattr(values, "STATS_BLOCK", 1000)  # 9 blocks, the last one shorter
    blocks = values.stored_error_stats(reference, decoded, dtype)
    assert blocks["max_abs_error"] == whole["max_abs_error"]
    assert blocks["rel_error"] == pytest.approx(whole["rel_error"], rel=1e-12)
    assert blocks["snr_db"] == pytest.approx(whole["snr_db"], rel=1e-12)
    decoded[5, 5] = np.inf
    assert values.stored_error_stats(reference, decoded, dtype)["rel_error"] is None


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
def test_as_stored_rounds_in_place_as_a_reader_sees_the_values(monkeypatch, dtype):
    monkeypatch.setattr(values, "CONVERT_BLOCK", 100)
    decoded = np.random.default_rng(4).standard_normal((40, 30)).astype(np.float32)
    expected = values.to_float32(values.from_float32(decoded, dtype), dtype)
    out = values.as_stored(decoded, dtype)
    np.testing.assert_array_equal(out, expected)
    assert out is decoded or dtype == "F64"  # no second copy of a large tensor
    transposed = np.ascontiguousarray(decoded.T).T  # not C-contiguous: rounded in a copy
    np.testing.assert_array_equal(values.as_stored(transposed, dtype), expected)
