"""The C fast path must give exactly the bytes of the numpy reference, and both paths work.

Tests taking ``path`` run twice: on the C extension and on the numpy fallback
(forced in-process by clearing ``planes.kernels``).  Tests taking ``native`` need
the extension: they skip where it was not built, and fail instead when
RBE_REQUIRE_NATIVE=1 (as in CI).  The subprocess tests at the end check the
loader itself (rbeformat.native): the fallback when the extension is missing,
the refusal to fall back when it is required, and a whole byteplane round trip
and CRC with the extension disabled giving the native bytes.
"""

import hashlib
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from rbeformat import layout
from rbeformat import native as loader
from rbeformat.codecs.blob import planes
from rbeformat.spec import DTYPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def native():
    """The C extension; a skip where it is not built, a failure where it is required."""
    if loader.extension is None:
        message = f"C extension not loaded: {loader.missing_reason}"
        if loader.required():
            pytest.fail(message)
        pytest.skip(message)
    return loader.extension


@pytest.fixture(params=["native", "numpy"])
def path(request, monkeypatch):
    """Runs a test on the C path and again on the numpy fallback."""
    if request.param == "native":
        request.getfixturevalue("native")
    else:
        monkeypatch.setattr(planes, "kernels", None)
    return request.param


@pytest.mark.parametrize("width,rotate", [(w, r) for w in (1, 2, 4, 8) for r in (0, 1, 3, 7, 9, 63) if r < 8 * w])
@pytest.mark.parametrize("n", [0, 1, 7, 4099])
def test_split_and_join_match_reference(path, width, rotate, n):
    data = np.random.default_rng(width * 100 + n).integers(0, 256, n * width, dtype=np.uint8).tobytes()
    split = planes.split(data, width, rotate)
    reference = planes.split_reference(data, width, rotate)
    assert split.tobytes() == reference.tobytes()
    grid = tuple(split.reshape(width, n)) if n else tuple(np.empty(0, np.uint8) for _ in range(width))
    out, out_reference = bytearray(len(data)), bytearray(len(data))
    planes.join(grid, width, rotate, out)
    planes.join_reference(grid, width, rotate, out_reference)
    assert bytes(out) == bytes(out_reference) == data


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
def test_rotation_out_of_range_is_refused(path, width, rotate):
    data = bytes(24)
    with pytest.raises(ValueError, match="width must be 1, 2, 4 or 8|rotate must be in"):
        planes.split(data, width, rotate)
    with pytest.raises(ValueError, match="width must be 1, 2, 4 or 8 and rotate in"):
        planes.split_reference(data, width, rotate)


def _runs(grouped: np.ndarray, counts: np.ndarray) -> tuple:
    """The groups of a grouped plane, one per context value present."""
    bounds = np.cumsum(counts[counts > 0])
    return tuple(np.split(grouped, bounds[:-1])) if len(bounds) else ()


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_group_ungroup_match_reference(path, n):
    rng = np.random.default_rng(n)
    values = rng.integers(0, 256, n, dtype=np.uint8)
    context = rng.integers(120, 126, n, dtype=np.uint8)
    grouped = planes.group(values, context)
    assert grouped.tobytes() == planes.group_reference(values, context).tobytes()
    counts = planes.histogram(context)
    assert counts.dtype == np.int64 and counts.tolist() == np.bincount(context, minlength=256).tolist()
    runs = _runs(grouped, counts)
    assert planes.ungroup(runs, context).tobytes() == values.tobytes()
    assert planes.ungroup_reference(runs, context).tobytes() == values.tobytes()


@pytest.mark.parametrize(
    "runs",
    [
        (np.zeros(1, np.uint8), np.zeros(1, np.uint8)),  # too short
        (np.zeros(2, np.uint8),),  # one run missing
        (np.zeros(1, np.uint8), np.zeros(2, np.uint8)),  # right total, wrong split between values
    ],
)
def test_ungroup_rejects_runs_of_wrong_length(path, runs):
    context = np.array([1, 1, 2], np.uint8)
    with pytest.raises(ValueError):
        planes.ungroup(runs, context)
    with pytest.raises(ValueError, match="runs must hold"):
        planes.ungroup_reference(runs, context)


@pytest.mark.parametrize("low", range(1, 8))
@pytest.mark.parametrize("n", [0, 1, 8, 13, 64, 1001])
def test_split_and_join_fields_roundtrip(path, low, n):
    plane = np.random.default_rng(n * 10 + low).integers(0, 256, n, dtype=np.uint8)
    high, low_values = planes.split_fields(plane, low)
    assert (len(high), len(low_values)) == (-(-n * (8 - low) // 8), -(-n * low // 8))
    assert planes.join_fields(high.tobytes(), low_values.tobytes(), low, n).tobytes() == plane.tobytes()


@pytest.mark.parametrize("deposit", [False, True])
@pytest.mark.parametrize("low", range(1, 8))
@pytest.mark.parametrize("n", [0, 1, 8, 13, 64, 1001])
def test_join_fields_matches_reference_with_and_without_bit_deposit(native, deposit, low, n):
    rng = np.random.default_rng(n * 10 + low)
    plane = rng.integers(0, 256, n, dtype=np.uint8)
    high, low_values = planes.split_fields(plane, low)
    previous = native.set_bit_deposit(deposit)
    try:
        joined = planes.join_fields(high.tobytes(), low_values.tobytes(), low, n)
    finally:
        native.set_bit_deposit(previous)
    assert joined.tobytes() == planes.join_fields_reference(high, low_values, low, n).tobytes() == plane.tobytes()


_WRONG_FIELD_SIZES = [
    (bytes(2), bytes(1), 2),
    (bytes(3), bytes(2), 2),
    (bytes(3), bytes(1), 0),
    (bytes(4), bytes(0), 8),
]


def test_join_fields_refuses_wrong_sizes(path):
    assert planes.join_fields(bytes(3), bytes(1), 2, 4).tolist() == [0] * 4  # 4 x 6 bits, 4 x 2 bits
    for high, low_values, low in _WRONG_FIELD_SIZES:
        with pytest.raises(ValueError):
            planes.join_fields(high, low_values, low, 4)


def test_native_join_fields_checks_sizes_itself(native):
    for high, low_values, low in _WRONG_FIELD_SIZES[:2]:
        with pytest.raises(ValueError):
            native.join_fields(high, low_values, low, np.empty(4, np.uint8))


@pytest.mark.parametrize("n", [0, 1, 3, 5, 4099])
@pytest.mark.parametrize("count", [1, 3])
def test_ungroup_planes_matches_reference(path, n, count):
    rng = np.random.default_rng(n + 7 * count)
    context = rng.integers(120, 126, n, dtype=np.uint8)
    values = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(count)]
    segments = planes.segment_histograms(context)
    assert segments.shape == (planes.SEGMENTS, 256) and segments.dtype == np.int64
    assert segments.sum(axis=0).tolist() == np.bincount(context, minlength=256).tolist()
    step = -(-n // planes.SEGMENTS)
    assert segments[0].sum() == min(step, n)
    counts = segments.sum(axis=0)
    runs = [_runs(planes.group(v, context), counts) for v in values]
    out = planes.ungroup_planes(runs, context, segments)
    assert [o.tobytes() for o in out] == [v.tobytes() for v in values]


def test_ungroup_planes_rejects_wrong_runs_and_counts(path):
    context = np.array([1, 1, 2, 1, 2], np.uint8)
    segments = planes.segment_histograms(context)
    good = (np.zeros(3, np.uint8), np.zeros(2, np.uint8))
    for runs in [[(np.zeros(2, np.uint8), np.zeros(2, np.uint8))], [good[:1]], [good + (np.zeros(1, np.uint8),)]]:
        with pytest.raises(ValueError):
            planes.ungroup_planes(runs, context, segments)
    wrong = segments.copy()
    wrong[0, 1], wrong[1, 1] = wrong[0, 1] + 1, wrong[1, 1] - 1  # same totals, wrong split between segments
    with pytest.raises(ValueError, match="segment counts"):
        planes.ungroup_planes([good], context, wrong)
    negative = segments.copy()
    negative[0, 7] = -1
    with pytest.raises(ValueError, match="segment counts"):
        planes.ungroup_planes([good], context, negative)


@pytest.mark.parametrize("low", range(1, 8))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_split_fields_matches_reference(native, low, n):
    plane = np.random.default_rng(n + low).integers(0, 256, n, dtype=np.uint8)
    fast = planes.split_fields(plane, low)
    reference = planes.split_fields_reference(plane, low)
    assert [a.tobytes() for a in fast] == [b.tobytes() for b in reference]


def test_joint_histogram_matches_bincount(path):
    rng = np.random.default_rng(5)
    context, values = rng.integers(0, 256, 5000, dtype=np.uint8), rng.integers(0, 256, 5000, dtype=np.uint8)
    counts = planes.joint_histogram(context, values)
    assert counts.shape == (256, 256) and counts.sum() == 5000
    for i in range(0, 5000, 499):
        assert counts[context[i], values[i]] == np.sum((context == context[i]) & (values == values[i]))


def test_native_joint_histogram_checks_lengths(native):
    context, values = np.zeros(10, np.uint8), np.zeros(9, np.uint8)
    with pytest.raises(ValueError):
        native.joint_histogram(context, values, np.empty(65536, np.int64))


@pytest.mark.parametrize("clmul", [False, True])
def test_crc32_matches_zlib_on_both_native_paths(native, clmul):
    rng = np.random.default_rng(9)
    previous = native.set_clmul(clmul)
    try:
        for n in [*range(0, 130), 1000, 65535, 65536, 65536 * 3 + 17]:
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            for start in (0, 0xDEADBEEF, 0xFFFFFFFF):
                assert native.crc32(data, start) == zlib.crc32(data, start), (n, start)
        data = memoryview(bytes(range(256)) * 40)[3:-5]  # unaligned slices of a buffer
        assert native.crc32(data) == zlib.crc32(data)
    finally:
        native.set_clmul(previous)


def test_layout_crc32_uses_the_extension_when_loaded():
    assert (layout.native_crc32 is not None) == loader.available()
    assert layout.crc32(b"123456789") == 0xCBF43926  # the CRC-32/ISO-HDLC check value


# -- the loader, in fresh interpreters ---------------------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with the native variables set only as given."""
    clean = {k: v for k, v in os.environ.items() if k not in (loader.REQUIRE_VARIABLE, loader.DISABLE_VARIABLE)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


# Hides the extension from the import system, as a build without a compiler would.
_HIDE_EXTENSION = "import sys; sys.modules['rbeformat._planes'] = None\n"


def test_missing_extension_falls_back_and_says_why():
    run = _python(
        _HIDE_EXTENSION + "import rbeformat\nfrom rbeformat import native\n"
        "from rbeformat.codecs.blob import planes\n"
        "print(native.available(), planes.has_native(), native.missing_reason)"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("False False ModuleNotFoundError: import of rbeformat._planes halted")


def test_required_extension_that_is_missing_fails_the_import():
    run = _python(_HIDE_EXTENSION + "import rbeformat", RBE_REQUIRE_NATIVE="1")
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: RBE_REQUIRE_NATIVE=1 but the C extension rbeformat._planes"), run.stderr
    assert "import of rbeformat._planes halted" in last  # the original error is named


def test_disabling_wins_over_requiring():
    run = _python(
        "from rbeformat import native; print(native.available(), native.missing_reason)",
        RBE_REQUIRE_NATIVE="1",
        RBE_DISABLE_NATIVE="1",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False disabled by RBE_DISABLE_NATIVE=1"


def byteplane_and_crc_digests() -> dict:
    """Encoded chunks (params and bytes, by sha256), the plane methods they use, and CRC-32s.

    Both paths must give the same: the C functions produce the reference's bytes, and the
    encoder's choices depend only on those bytes and on histograms."""
    from rbeformat.codecs.blob.byteplane import Byteplane

    rng = np.random.default_rng(11)
    weights = (rng.standard_normal(40000) * 0.02).astype(np.float32)
    samples = {
        "F32": (Byteplane("rotl1", split_gain=0.0), weights.tobytes()),  # split planes
        "BF16": (Byteplane(), (weights.view(np.uint32) >> 16).astype(np.uint16).tobytes()),  # rotl, fields
        "F16": (Byteplane(split_gain=0.0), weights.astype(np.float16).tobytes()),
    }
    out: dict = {"methods": set()}
    for name, (codec, data) in samples.items():
        dtype = DTYPES[name]
        codec = codec.for_dtype(dtype)
        parts, params = codec.encode_chunk(memoryview(data), dtype)
        payload = b"".join(parts)
        decoded = bytearray(len(data))
        codec.decode_chunk(memoryview(payload), params, dtype, memoryview(decoded), name)
        assert bytes(decoded) == data, name
        out[name] = hashlib.sha256(json.dumps(params, sort_keys=True).encode() + payload).hexdigest()
        out["methods"] |= {method for method, _ in params["planes"]}
    out["methods"] = sorted(out["methods"])
    out["crc32"] = [layout.crc32(weights.tobytes()[:n]) for n in (0, 1, 63, 4096, 160000)]
    out["crc32_continued"] = layout.crc32(b"abc", 0x12345678)
    return out


def test_numpy_path_gives_the_native_bytes_in_a_fresh_interpreter(native):
    here = os.path.dirname(os.path.abspath(__file__))
    run = _python(
        f"import json, sys\nsys.path.insert(0, {here!r})\n"
        "from rbeformat import native\nassert not native.available()\n"
        "from test_planes import byteplane_and_crc_digests\n"
        "print(json.dumps(byteplane_and_crc_digests()))",
        RBE_DISABLE_NATIVE="1",
    )
    assert run.returncode == 0, run.stderr
    expected = byteplane_and_crc_digests()
    assert {"split", "fields", "zstd", "raw"} <= set(expected["methods"])  # every plane decoder ran
    assert json.loads(run.stdout) == expected
