"""Stored runs: raw when not smaller, otherwise one zstd frame of the declared size."""

import pytest
import zstandard

from rbeformat import FormatError
from rbeformat.codecs.blob.zstd import PLANES, pack, unpack


def test_pack_keeps_incompressible_data_raw():
    data = bytes(range(256))
    assert pack(data, 19) == data
    assert bytes(unpack(memoryview(data), 256, "x")) == data


@pytest.mark.parametrize("level", [PLANES, 1, 19])
def test_pack_unpack_roundtrip(level):
    data = b"abc" * 1000
    stored = pack(data, level)
    assert len(stored) < len(data)
    assert bytes(unpack(memoryview(stored), len(data), "x")) == data


def test_frame_declaring_more_than_expected_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    with pytest.raises(FormatError, match="declares 10000000"):
        unpack(memoryview(bomb), 1000, "x")


def test_longer_than_decoded_size_and_garbage_are_refused():
    with pytest.raises(FormatError, match="longer"):
        unpack(memoryview(b"12345"), 4, "x")
    with pytest.raises(FormatError):
        unpack(memoryview(b"123"), 4, "x")


def test_trailing_bytes_after_the_frame_are_refused():
    frame = zstandard.ZstdCompressor().compress(b"a" * 1000)
    with pytest.raises(FormatError):
        unpack(memoryview(frame + b"\0"), 1000, "x")
