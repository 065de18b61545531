"""byteplane is bit-exact for every dtype and refuses malformed chunks."""

import numpy as np
import pytest

from rbeformat import FormatError
from rbeformat.codecs.byteplane import Byteplane
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


def test_trained_like_weights_compress_and_split_when_forced():
    w = (np.random.default_rng(0).standard_normal(65536) * 0.02).astype(np.float32).tobytes()
    out, params = roundtrip(Byteplane(split_gain=0.0), w, "F32")
    assert out == w
    methods = [m for m, _ in params["planes"]]
    assert methods[3] == "zstd" and "split" in methods  # exponent coded, mantissa conditioned on it
    assert sum(length for _, length in params["planes"]) < 0.85 * len(w)


def _encoded(n=8192):
    dtype = DTYPES["F32"]
    codec = Byteplane(split_gain=0.0).for_dtype(dtype)
    w = (np.random.default_rng(1).standard_normal(n) * 0.02).astype(np.float32).tobytes()
    parts, params = codec.encode_chunk(memoryview(w), dtype)
    return codec, dtype, b"".join(parts), params, len(w)


@pytest.mark.parametrize("mutate", [
    lambda p: {"planes": p["planes"][:3]},
    lambda p: {"planes": [["lz4", n] for _, n in p["planes"]]},
    lambda p: {"planes": [[m, n + 1] for m, n in p["planes"]]},
    lambda p: {"planes": [[m, -1] for m, _ in p["planes"]]},
    lambda p: {"planes": p["planes"][:3] + [["split", p["planes"][3][1]]]},
    lambda p: {"planes": [["raw", n] for _, n in p["planes"]]},
    lambda p: {"planes": p["planes"], "extra": 1},
    lambda p: [],
])
def test_bad_params_raise_format_error(mutate):
    codec, dtype, payload, params, size = _encoded()
    with pytest.raises(FormatError):
        codec.decode_chunk(memoryview(payload), mutate(params), dtype, memoryview(bytearray(size)), "test")


def test_corrupt_payload_raises_format_error():
    codec, dtype, payload, params, size = _encoded()
    damaged = bytearray(payload)
    for i in range(0, len(damaged), 97):
        damaged[i] ^= 0x5A
    try:
        codec.decode_chunk(memoryview(bytes(damaged)), params, dtype, memoryview(bytearray(size)), "test")
    except FormatError:
        pass  # raw planes cannot notice damage; the section checksum does


def test_config_roundtrip():
    codec = Byteplane(chunk_items=1000).for_dtype(DTYPES["BF16"])
    again = Byteplane.from_config(codec.config(), "c")
    assert again.config() == codec.config() == {"transform": "rotl1", "chunk_items": 1000}
    assert Byteplane().for_dtype(DTYPES["I32"]).config()["transform"] == "none"
    with pytest.raises(FormatError):
        Byteplane.from_config({"transform": "rotl2", "chunk_items": 1}, "c")
    with pytest.raises(FormatError):
        Byteplane.from_config({"transform": "none", "chunk_items": 0}, "c")
