"""The C fast path must give exactly the bytes of the numpy reference."""

import numpy as np
import pytest

from rbeformat.codecs import planes

pytestmark = pytest.mark.skipif(not planes.has_native(), reason="C extension not built")


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("rotate", [0, 1, 3, 7, 9, 63])
@pytest.mark.parametrize("n", [0, 1, 7, 4099])
def test_split_and_join_match_reference(width, rotate, n):
    if rotate >= 8 * width:
        pytest.skip("rotation wider than the word")
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
    top, *_ = planes.split_reference(x, 4, 1)[::-1]
    assert top == 127  # the whole exponent lands in the top byte
    assert planes.split_reference(x, 4, 1)[0] & 1 == 1


def test_rotation_by_three_pairs_low_exponent_bits_with_top_mantissa_bits():
    x = np.array([-1.5], np.float32).tobytes()  # sign 1, exponent 0b01111111, mantissa 0b1000...
    grid = planes.split_reference(x, 4, 3)
    assert grid[3] == 0b11111110  # exponent bits 5..0, then mantissa bits 22..21
    assert grid[0] == 0b00000101  # mantissa bits 4..0, sign, exponent bits 7..6


@pytest.mark.parametrize("width,rotate", [(2, 16), (4, -1), (1, 8), (3, 1)])
def test_rotation_out_of_range_is_refused(width, rotate):
    data = bytes(24)
    with pytest.raises(ValueError):
        planes.split(data, width, rotate)
    with pytest.raises(ValueError):
        planes.split_reference(data, width, rotate)


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


@pytest.mark.parametrize("deposit", [False, True])
@pytest.mark.parametrize("low", range(1, 8))
@pytest.mark.parametrize("n", [0, 1, 8, 13, 64, 1001])
def test_join_fields_matches_reference_on_both_paths(deposit, low, n):
    rng = np.random.default_rng(n * 10 + low)
    plane = rng.integers(0, 256, n, dtype=np.uint8)
    high, low_values = planes.split_fields(plane, low)
    previous = planes._native.set_bit_deposit(deposit)
    try:
        native = planes.join_fields(high.tobytes(), low_values.tobytes(), low, n)
    finally:
        planes._native.set_bit_deposit(previous)
    assert native.tobytes() == planes.join_fields_reference(high, low_values, low, n).tobytes() == plane.tobytes()


def test_join_fields_refuses_wrong_sizes():
    assert planes.join_fields(bytes(3), bytes(1), 2, 4).tolist() == [0] * 4  # 4 x 6 bits, 4 x 2 bits
    for high, low_values, low in [(bytes(2), bytes(1), 2), (bytes(3), bytes(2), 2), (bytes(3), bytes(1), 0),
                                  (bytes(4), bytes(0), 8)]:
        with pytest.raises(ValueError):
            planes.join_fields(high, low_values, low, 4)
        if planes.has_native() and 1 <= low <= 7:
            with pytest.raises(ValueError):
                planes._native.join_fields(high, low_values, low, np.empty(4, np.uint8))


@pytest.mark.parametrize("n", [0, 1, 3, 5, 4099])
@pytest.mark.parametrize("count", [1, 3])
def test_ungroup_planes_matches_reference(n, count):
    rng = np.random.default_rng(n + 7 * count)
    context = rng.integers(120, 126, n, dtype=np.uint8)
    values = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(count)]
    segments = planes.segment_histograms(context)
    assert segments.sum(axis=0).tolist() == np.bincount(context, minlength=256).tolist()
    step = -(-n // planes.SEGMENTS)
    assert segments[0].sum() == min(step, n)
    counts = segments.sum(axis=0)
    runs = []
    for v in values:
        grouped, start, plane_runs = planes.group(v, context), 0, []
        for c in counts[counts > 0]:
            plane_runs.append(grouped[start : start + c])
            start += c
        runs.append(tuple(plane_runs))
    out = planes.ungroup_planes(runs, context, segments)
    assert [o.tobytes() for o in out] == [v.tobytes() for v in values]


def test_ungroup_planes_rejects_wrong_runs_and_counts():
    context = np.array([1, 1, 2, 1, 2], np.uint8)
    segments = planes.segment_histograms(context)
    good = (np.zeros(3, np.uint8), np.zeros(2, np.uint8))
    for runs in [[(np.zeros(2, np.uint8), np.zeros(2, np.uint8))], [good[:1]], [good + (np.zeros(1, np.uint8),)]]:
        with pytest.raises(ValueError):
            planes.ungroup_planes(runs, context, segments)
    wrong = segments.copy()
    wrong[0, 1], wrong[1, 1] = wrong[0, 1] + 1, wrong[1, 1] - 1  # same totals, wrong split between segments
    with pytest.raises(ValueError):
        planes.ungroup_planes([good], context, wrong)
    negative = segments.copy()
    negative[0, 7] = -1
    with pytest.raises(ValueError):
        planes.ungroup_planes([good], context, negative)


@pytest.mark.parametrize("low", range(1, 8))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_split_fields_matches_reference(low, n):
    plane = np.random.default_rng(n + low).integers(0, 256, n, dtype=np.uint8)
    native = planes.split_fields(plane, low)
    reference = planes.split_fields_reference(plane, low)
    assert [a.tobytes() for a in native] == [b.tobytes() for b in reference]


def test_joint_histogram_matches_bincount():
    rng = np.random.default_rng(5)
    context, values = rng.integers(0, 256, 5000, dtype=np.uint8), rng.integers(0, 256, 5000, dtype=np.uint8)
    expected = np.bincount(context.astype(np.int64) * 256 + values, minlength=65536).reshape(256, 256)
    assert np.array_equal(planes.joint_histogram(context, values), expected)
    with pytest.raises(ValueError):
        planes._native.joint_histogram(context, values[:-1], np.empty(65536, np.int64))


@pytest.mark.parametrize("clmul", [False, True])
def test_crc32_matches_zlib_on_both_paths(clmul):
    import zlib

    rng = np.random.default_rng(9)
    previous = planes._native.set_clmul(clmul)
    try:
        for n in [*range(0, 130), 1000, 65535, 65536, 65536 * 3 + 17]:
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            for start in (0, 0xDEADBEEF, 0xFFFFFFFF):
                assert planes._native.crc32(data, start) == zlib.crc32(data, start), (n, start)
        data = memoryview(bytes(range(256)) * 40)[3:-5]  # unaligned slices of a buffer
        assert planes._native.crc32(data) == zlib.crc32(data)
    finally:
        planes._native.set_clmul(previous)
