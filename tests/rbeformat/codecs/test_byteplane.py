"""byteplane is bit-exact for every dtype and refuses malformed chunks."""

import numpy as np
import pytest

from rbeformat import FormatError
from rbeformat.codecs.blob import planes
from rbeformat.codecs.blob.byteplane import Byteplane, decode_fields, encode_fields
from rbeformat.spec import DTYPES


def roundtrip(codec: Byteplane, data: bytes, dtype_name: str) -> tuple[bytes, dict]:
    dtype = DTYPES[dtype_name]
    codec = codec.for_dtype(dtype)
    parts, params = codec.encode_chunk(memoryview(data), dtype)
    out = bytearray(len(data))
    codec.decode_chunk(memoryview(b"".join(parts)), params, dtype, memoryview(out), "test")
    return bytes(out), params


def special_floats(dtype: str) -> bytes:
    np_dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype]
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 65504, 1.0, -2.5], np_dtype)
    odd_nan = values.view(np.uint8).copy()
    return odd_nan.tobytes() + np.frombuffer(b"\xff" * values.itemsize, np_dtype).tobytes()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("n", [0, 1, 3, 5000])
def test_random_bytes_roundtrip_every_dtype(dtype, n):
    data = np.random.default_rng(n).integers(0, 256, n * DTYPES[dtype].itemsize, dtype=np.uint8).tobytes()
    assert roundtrip(Byteplane(), data, dtype)[0] == data


@pytest.mark.parametrize("dtype", ["F32", "F16", "F64"])
def test_special_values_keep_their_bits(dtype):
    data = special_floats(dtype)
    assert roundtrip(Byteplane(), data, dtype)[0] == data


def gaussian(n: int, dtype: str, seed: int = 0) -> bytes:
    w = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    if dtype == "BF16":
        return (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return w.astype({"F32": np.float32, "F16": np.float16}[dtype]).tobytes()


def test_trained_like_weights_compress_with_a_rotation_chosen_per_chunk():
    w = gaussian(65536, "F32")
    out, params = roundtrip(Byteplane(), w, "F32")
    assert out == w
    assert params["rotate"] in range(8) and params["rotate"] != 0
    assert params["planes"][3][0] == "zstd"  # the exponent bits are entropy coded
    assert sum(length for _, length in params["planes"]) < 0.85 * len(w)


def test_rotation_lets_bf16_shed_its_constant_exponent_bits():
    w = gaussian(65536, "BF16")
    rotated = sum(n for _, n in roundtrip(Byteplane(), w, "BF16")[1]["planes"])
    fixed = sum(n for _, n in roundtrip(Byteplane("rotl1"), w, "BF16")[1]["planes"])
    params = roundtrip(Byteplane(), w, "BF16")[1]
    assert params["planes"][0][0] == "fields"  # high exponent bits rotated into plane 0, stored apart
    assert rotated < 0.995 * fixed


def test_split_is_taken_when_forced():
    w = gaussian(65536, "F32")
    out, params = roundtrip(Byteplane("rotl1", split_gain=0.0), w, "F32")
    assert out == w and "rotate" not in params  # rotl1 chunks carry no rotation
    methods = [m for m, _ in params["planes"]]
    assert methods[3] == "zstd" and "split" in methods  # mantissa conditioned on the exponent


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64", "F8_E4M3"])
def test_every_rotation_roundtrips(dtype):
    d = DTYPES[dtype]
    data = np.random.default_rng(3).integers(0, 256, 3001 * d.itemsize, dtype=np.uint8).tobytes()
    data = gaussian(3001, dtype) if dtype in ("F32", "BF16", "F16") else data
    codec = Byteplane().for_dtype(d)
    for r in range(8 * d.itemsize):
        parts, methods = codec._encode_rotated(memoryview(data), d.itemsize, r)
        out = bytearray(len(data))
        codec.decode_chunk(memoryview(b"".join(parts)), {"planes": methods, "rotate": r}, d, memoryview(out), "t")
        assert bytes(out) == data


@pytest.mark.parametrize("low", range(1, 8))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 4099])
def test_fields_roundtrip_matches_reference(low, n):
    rng = np.random.default_rng(low * 1000 + n)
    plane = ((rng.integers(0, 256, n) & ~((1 << low) - 1)) | (rng.random(n) < 0.01)).astype(np.uint8)
    stored = memoryview(encode_fields(plane, low, 0))
    assert stored[0] == low
    assert decode_fields(stored, n, "t").tobytes() == plane.tobytes()
    high, low_values = planes.split_fields(plane, low)
    assert planes.join_fields_reference(high, low_values, low, n).tobytes() == plane.tobytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:0],
        lambda b: bytes([0]) + b[1:],
        lambda b: bytes([8]) + b[1:],
        lambda b: b[:40],
        lambda b: b + b"x",
        lambda b: b[:-1],
    ],
)
def test_malformed_fields_plane_raises_format_error(damage):
    plane = np.full(1000, 0b01010101, np.uint8)
    plane[::7] = 0b11111101
    stored = encode_fields(plane, 2, 0)
    with pytest.raises(FormatError):
        decode_fields(memoryview(damage(stored)), 1000, "t")


def _encoded(n=8192):
    dtype = DTYPES["F32"]
    codec = Byteplane(split_gain=0.0).for_dtype(dtype)
    w = gaussian(n, "F32", seed=1)
    parts, params = codec.encode_chunk(memoryview(w), dtype)
    return codec, dtype, b"".join(parts), params, len(w)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: {**p, "planes": p["planes"][:3]},
        lambda p: {**p, "planes": [["lz4", n] for _, n in p["planes"]]},
        lambda p: {**p, "planes": [[m, n + 1] for m, n in p["planes"]]},
        lambda p: {**p, "planes": [[m, -1] for m, _ in p["planes"]]},
        lambda p: {**p, "planes": p["planes"][:3] + [["split", p["planes"][3][1]]]},
        lambda p: {**p, "planes": [["raw", n] for _, n in p["planes"]]},
        lambda p: {**p, "extra": 1},
        lambda p: {"planes": p["planes"]},
        lambda p: {**p, "rotate": -1},
        lambda p: {**p, "rotate": 32},
        lambda p: {**p, "rotate": "3"},
        lambda p: {**p, "rotate": 3.0},
        lambda p: [],
    ],
)
def test_bad_params_raise_format_error(mutate):
    codec, dtype, payload, params, size = _encoded()
    with pytest.raises(FormatError):
        codec.decode_chunk(memoryview(payload), mutate(params), dtype, memoryview(bytearray(size)), "test")


def _damage_magic(payload: bytes, params: dict, start: int) -> tuple[bytes, dict]:
    damaged = bytearray(payload)
    damaged[start] ^= 0x5A
    return bytes(damaged), params


def _truncate_frame(payload: bytes, params: dict, start: int) -> tuple[bytes, dict]:
    planes_ = [list(p) for p in params["planes"]]
    planes_[-1][1] -= 10  # the plane table stays consistent with the shorter section
    return payload[:-10], {**params, "planes": planes_}


@pytest.mark.parametrize(
    "damage,message",
    [
        (_damage_magic, "plane 3: not a zstd frame"),
        (_truncate_frame, "plane 3: corrupt zstd frame"),
    ],
)
def test_corrupt_payload_raises_format_error(damage, message):
    """Damage to an entropy-coded plane is caught by its decoder (raw planes cannot notice
    damage; the section checksum does)."""
    codec, dtype, payload, params, size = _encoded()
    assert [m for m, _ in params["planes"]][3] == "zstd"  # the top plane is the one damaged
    start = sum(n for _, n in params["planes"][:3])
    damaged, damaged_params = damage(payload, params, start)
    with pytest.raises(FormatError, match=message):
        codec.decode_chunk(memoryview(damaged), damaged_params, dtype, memoryview(bytearray(size)), "test")


def test_config_roundtrip():
    codec = Byteplane(chunk_items=1000).for_dtype(DTYPES["BF16"])
    again = Byteplane.from_config(codec.config(), "c")
    assert again.config() == codec.config() == {"transform": "rotl", "chunk_items": 1000}
    assert Byteplane.from_config({"transform": "rotl1", "chunk_items": 5}, "c").transform == "rotl1"
    assert Byteplane().for_dtype(DTYPES["I32"]).config()["transform"] == "none"
    with pytest.raises(FormatError):
        Byteplane.from_config({"transform": "rotl2", "chunk_items": 1}, "c")
    with pytest.raises(FormatError):
        Byteplane.from_config({"transform": "none", "chunk_items": 0}, "c")


def test_chunks_of_a_tensor_have_nearly_equal_sizes():
    dtype = DTYPES["BF16"]
    largest = 2 * 1024 * 1024
    assert Byteplane().for_dtype(dtype).chunk_items(dtype) == largest
    assert Byteplane().for_dtype(dtype, 1000).chunk_items(dtype) == 1000
    assert Byteplane().for_dtype(dtype, largest + 2).chunk_items(dtype) == largest // 2 + 1
    assert Byteplane(chunk_items=77).for_dtype(dtype, 10**6).chunk_items(dtype) == 77


def test_doctests():
    import doctest

    from rbeformat.codecs.blob import byteplane, zstd
    from rbeformat.codecs.util import bitpack

    for module in (byteplane, bitpack, zstd):
        assert doctest.testmod(module).failed == 0, module.__name__
