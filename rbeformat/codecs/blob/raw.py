"""The ``raw`` codec: elements stored as they are, little-endian.

A raw tensor is one chunk, aligned in the file, so a reader can hand out a
read-only view of the memory-mapped file without copying or decoding.
"""

from __future__ import annotations

from typing import Any

from ...errors import FormatError
from ...spec import MAX_TENSOR_ELEMENTS, DType
from ..core.base import Codec, require_keys


class Raw(Codec):
    """Lossless and uncompressed; the only codec whose tensors can be mmapped."""

    name = "raw"
    lossless = True

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> Raw:
        require_keys(config, where, set())
        return cls()

    def chunk_items(self, dtype: DType) -> int:
        return MAX_TENSOR_ELEMENTS

    def encode_chunk(self, data: memoryview, dtype: DType) -> tuple[list[bytes], dict[str, Any]]:
        return [bytes(data)], {}

    def decode_chunk(self, payload: memoryview, params: Any, dtype: DType, out: memoryview, where: str) -> None:
        require_keys(params, f"{where}.params", set())
        if len(payload) != len(out):
            raise FormatError(f"{where}: raw chunk holds {len(payload)} bytes, expected {len(out)}")
        out[:] = payload
