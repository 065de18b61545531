"""The ``zstd`` codec: bytes compressed as independent zstd frames.

Used for embedded files (configs, tokenizers, safetensors headers) and as the
entropy stage of other codecs.  A stored run is either one zstd frame that
declares its decoded size, or the bytes themselves when compression does not
pay; the stored length tells which (equal to the decoded size: raw; smaller:
a frame).  The declared size is checked before decompressing, so a hostile
frame cannot make the reader allocate more than the manifest allows.

>>> from rbeformat.spec import DTYPES
>>> stored = pack(b"abc" * 100, DEFAULT_LEVEL)
>>> len(stored) < 300
True
>>> out = bytearray(300)
>>> Zstd().decode_chunk(memoryview(stored), {}, DTYPES["U8"], memoryview(out), "x")
>>> bytes(out[:6])
b'abcabc'
"""

from __future__ import annotations

import threading
from typing import Any

import zstandard

from ...errors import FormatError
from ...spec import DType
from ..core.base import Codec, require_int, require_keys

DEFAULT_LEVEL = 19
FILE_CHUNK_BYTES = 4 * 1024 * 1024
# Level 0 selects a preset for byte planes: zstd's optimal parser (the part of
# levels 16+ that matters for exponent bytes) with a tiny match search, which on
# trained weights matches level 19's size at about ten times its speed.
PLANES = 0

_local = threading.local()


def _params(level: int) -> zstandard.ZstdCompressionParameters:
    if level == PLANES:
        return zstandard.ZstdCompressionParameters(
            window_log=17,
            chain_log=6,
            hash_log=6,
            search_log=1,
            min_match=6,
            target_length=8,
            strategy=zstandard.STRATEGY_BTULTRA,
            write_content_size=1,
        )
    return zstandard.ZstdCompressionParameters.from_level(level, write_content_size=1)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(compression_params=_params(level))
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def pack(data, level: int) -> bytes:
    """A zstd frame of ``data``, or ``data`` itself when the frame is not smaller."""
    raw = bytes(data)
    frame = _compressor(level).compress(raw)
    return frame if len(frame) < len(raw) else raw


def unpack(stored: memoryview, size: int, where: str) -> memoryview:
    """Reverses ``pack`` for a run that decodes to exactly ``size`` bytes."""
    if len(stored) == size:
        return stored
    if len(stored) > size:
        raise FormatError(f"{where}: stored run of {len(stored)} bytes is longer than its decoded size {size}")
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where}: not a zstd frame ({exc})") from None
    if declared != size:
        raise FormatError(f"{where}: zstd frame declares {declared} decoded bytes, expected {size}")
    try:
        out = _decompressor().decompress(stored, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where}: corrupt zstd frame ({exc})") from None
    if len(out) != size:
        raise FormatError(f"{where}: zstd frame decoded to {len(out)} bytes, expected {size}")
    return memoryview(out)


class Zstd(Codec):
    """Lossless: every chunk is one zstd frame (or stored when that is smaller)."""

    name = "zstd"
    lossless = True

    def __init__(self, chunk_bytes: int = FILE_CHUNK_BYTES, level: int = DEFAULT_LEVEL):
        self.chunk_bytes = chunk_bytes
        self.level = level

    def config(self) -> dict[str, Any]:
        return {"chunk_items": self.chunk_bytes}

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> Zstd:
        require_keys(config, where, {"chunk_items"})
        from ...spec import MAX_CHUNK_DECODED_BYTES

        return cls(require_int(config["chunk_items"], f"{where}.chunk_items", 1, MAX_CHUNK_DECODED_BYTES))

    def chunk_items(self, dtype: DType) -> int:
        return max(1, self.chunk_bytes // dtype.itemsize)

    def encode_chunk(self, data: memoryview, dtype: DType) -> tuple[list[bytes], dict[str, Any]]:
        return [pack(data, self.level)], {}

    def decode_chunk(self, payload: memoryview, params: Any, dtype: DType, out: memoryview, where: str) -> None:
        require_keys(params, f"{where}.params", set())
        out[:] = unpack(payload, len(out), where)
