"""Encoders on several threads: the same bits for any number of threads and any slicing."""

import numpy as np
import pytest
from harness import run_doctests

from rbeformat.codecs import gquant
from rbeformat.codecs.core.tensor import Calibration
from rbeformat.codecs.encoders import gptq
from rbeformat.codecs.util import parallel

RNG = np.random.default_rng(5)
W = (RNG.standard_normal((300, 200)) * 0.02).astype(np.float32)  # 200 columns: the last group is short
X = RNG.standard_normal((800, 200)) * np.exp(RNG.standard_normal(200))
HESSIAN = X.T @ X / len(X)


def test_doctests():
    run_doctests("rbeformat.codecs.util.parallel")


def _parts(codec, calibration=None, threads=1):
    with parallel.encoder_threads(threads):
        return codec.encode(W, calibration=calibration).parts


@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("gptq_order", [None, "activation"])
def test_gquant_gives_the_same_bits_on_any_number_of_threads_and_slices(monkeypatch, mode, gptq_order):
    codec = gquant.GroupQuant(bits=3, group=64, mode=mode, **({"gptq_order": gptq_order} if gptq_order else {}))
    calibration = Calibration("gptq", HESSIAN) if gptq_order else None
    one = _parts(codec, calibration)
    monkeypatch.setattr(gquant, "ENCODE_SLICE_BYTES", 7 * 4 * 256)  # slices of 7 rows: 43 of them
    for threads in (2, 3, 8):
        many = _parts(codec, calibration, threads)
        assert one.keys() == many.keys()
        for name in one:
            np.testing.assert_array_equal(one[name], many[name])


def _compensate_row_major(w, hessian, quantize, block=gptq.BLOCK):
    """GPTQ as the module states it, on row-major arrays: the reference for the column-major work."""
    work = np.array(w, np.float64)
    upper = gptq.inverse_cholesky(hessian)
    out = np.empty_like(work)
    n = work.shape[1]
    for start in range(0, n, block):
        stop = min(start + block, n)
        errors = np.empty((len(work), stop - start))
        for j in range(start, stop):
            out[:, j] = quantize(j, work)
            e = (work[:, j] - out[:, j]) / upper[j, j]
            errors[:, j - start] = e
            work[:, j:stop] -= np.outer(e, upper[j, j:stop])
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    return out


def test_gptq_column_major_gives_the_bits_of_the_row_major_statement():
    def quantize(j, current):
        return np.round(current[:, j] * 50) / 50

    expected = _compensate_row_major(W, HESSIAN, quantize, block=64)
    gptq.forget_factor()
    np.testing.assert_array_equal(gptq.compensate(W, HESSIAN, quantize, block=64), expected)


def test_the_thread_count_is_restored_and_an_error_in_a_piece_is_raised():
    outer = parallel.threads()
    with parallel.encoder_threads(3):
        assert parallel.threads() == 3
        with parallel.encoder_threads(None):
            assert parallel.threads() == parallel.default_threads()
        assert parallel.threads() == 3
    assert parallel.threads() == outer

    def fail_on_two(i):
        if i == 2:
            raise ValueError("piece 2")

    with parallel.encoder_threads(2), pytest.raises(ValueError, match="piece 2"):
        parallel.run_each(fail_on_two, range(5))
