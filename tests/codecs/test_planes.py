"""The C fast path must give exactly the bytes of the numpy reference."""

import numpy as np
import pytest

from rbeformat.codecs import planes

pytestmark = pytest.mark.skipif(not planes.has_native(), reason="C extension not built")


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("n", [0, 1, 7, 4099])
def test_split_and_join_match_reference(width, rotate, n):
    data = np.random.default_rng(width * 100 + n).integers(0, 256, n * width, dtype=np.uint8).tobytes()
    native = planes.split(data, width, rotate)
    reference = planes.split_reference(data, width, rotate)
    assert native.tobytes() == reference.tobytes()
    grid = tuple(native.reshape(width, n)) if n else tuple(np.empty(0, np.uint8) for _ in range(width))
    out_native, out_reference = bytearray(len(data)), bytearray(len(data))
    planes.join(grid, width, rotate, out_native)
    planes.join_reference(grid, width, rotate, out_reference)
    assert bytes(out_native) == bytes(out_reference) == data


def test_rotation_moves_sign_to_bit_zero():
    x = np.array([-1.5], np.float32).tobytes()  # sign 1, exponent 127
    top, *_ = planes.split_reference(x, 4, True)[::-1]
    assert top == 127  # the whole exponent lands in the top byte
    assert planes.split_reference(x, 4, True)[0] & 1 == 1


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_group_ungroup_match_reference(n):
    rng = np.random.default_rng(n)
    values = rng.integers(0, 256, n, dtype=np.uint8)
    context = rng.integers(120, 126, n, dtype=np.uint8)
    grouped = planes.group(values, context)
    assert grouped.tobytes() == planes.group_reference(values, context).tobytes()
    counts = planes.histogram(context)
    assert counts.tolist() == np.bincount(context, minlength=256).tolist()
    runs, start = [], 0
    for c in counts[counts > 0]:
        runs.append(grouped[start : start + c])
        start += c
    assert planes.ungroup(tuple(runs), context).tobytes() == values.tobytes()
    assert planes.ungroup_reference(tuple(runs), context).tobytes() == values.tobytes()


def test_ungroup_rejects_runs_of_wrong_length():
    context = np.array([1, 1, 2], np.uint8)
    with pytest.raises(ValueError):
        planes.ungroup((np.zeros(1, np.uint8), np.zeros(1, np.uint8)), context)
    with pytest.raises(ValueError):
        planes.ungroup((np.zeros(2, np.uint8),), context)
