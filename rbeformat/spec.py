"""Constants of the rbe v1 container, as stated in spec/rbe-v1.md.

This module is pure data: the byte layout's fixed numbers, the limits a reader
enforces, and the dtype table.  tests/rbeformat/test_spec_constants.py checks that the
specification document states the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAGIC = b"\x89RBE\r\n\x1a\n"
FOOTER_MAGIC = b"RBEINDEX"
FORMAT_MAJOR = 1
FORMAT_MINOR = 2

HEADER_SIZE = 64
FOOTER_SIZE = 64
ALIGNMENT = 64

# Limits a reader enforces before allocating anything.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_CHUNK_DECODED_BYTES = 64 * 1024 * 1024
MAX_NDIM = 8
MAX_TENSOR_ELEMENTS = 1 << 40
MAX_FILE_BYTES = 1 << 40
MAX_NAME_BYTES = 1024
MAX_ENTRIES = 1_000_000


@dataclass(frozen=True)
class DType:
    """A tensor element type: its safetensors name, size, and how rbe treats it."""

    name: str
    itemsize: int
    is_float: bool
    numpy_storage: str  # numpy dtype holding the bytes; bf16/fp8 use unsigned ints


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, True, "<f8"),
        DType("F32", 4, True, "<f4"),
        DType("F16", 2, True, "<f2"),
        DType("BF16", 2, True, "<u2"),
        DType("F8_E4M3", 1, True, "u1"),
        DType("F8_E5M2", 1, True, "u1"),
        DType("I64", 8, False, "<i8"),
        DType("I32", 4, False, "<i4"),
        DType("I16", 2, False, "<i2"),
        DType("I8", 1, False, "i1"),
        DType("U64", 8, False, "<u8"),
        DType("U32", 4, False, "<u4"),
        DType("U16", 2, False, "<u2"),
        DType("U8", 1, False, "u1"),
        DType("BOOL", 1, False, "?"),
    )
}

_NUMPY_TO_DTYPE = {
    np.dtype("<f8"): "F64",
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
    np.dtype("<i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64",
    np.dtype("<u4"): "U32",
    np.dtype("<u2"): "U16",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}


def dtype_of_numpy(dtype: np.dtype) -> str | None:
    """The rbe dtype name for a numpy dtype, or None when there is none."""
    return _NUMPY_TO_DTYPE.get(np.dtype(dtype))


def align_up(offset: int) -> int:
    """The first multiple of ALIGNMENT at or after offset."""
    return -(-offset // ALIGNMENT) * ALIGNMENT
