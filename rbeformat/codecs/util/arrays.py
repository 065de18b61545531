"""Array helpers that several tensor codecs share: shapes, float parts, packed codes, indices.

>>> float_part(np.array([1e6, -1.5]), "F16").tolist()
[65504.0, -1.5]
>>> unpack_codes(pack_codes(np.array([3, 0, 1], np.uint8), 2), 2, 3, "codes").tolist()
[3, 0, 1]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import FormatError
from ...spec import MAX_NDIM, MAX_TENSOR_ELEMENTS
from . import bitpack

# Float dtypes a codec may store its scales, codebooks or offsets in.
FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32}
# Values packed or unpacked at a time (a multiple of 8), to bound temporary memory.
PACK_BLOCK = 1 << 20


def check_shape(shape: Any, where: str) -> tuple[int, ...]:
    """A shape (tuple or list) of 0 to MAX_NDIM non-negative ints and at most MAX_TENSOR_ELEMENTS, as a tuple."""
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise FormatError(f"{where}: expected a shape of at most {MAX_NDIM} dimensions, found {shape!r:.80}")
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise FormatError(f"{where}: shape {shape} has more than {MAX_TENSOR_ELEMENTS} elements")
    return shape


def is_matrix(shape: tuple[int, ...]) -> bool:
    """A non-empty 2-D shape."""
    return len(shape) == 2 and shape[0] >= 1 and shape[1] >= 1


def matrix_shape(shape: tuple[int, ...], where: str, what: str) -> tuple[int, int]:
    """(rows, columns) of a non-empty 2-D shape; FormatError naming ``what`` needs it otherwise."""
    if not is_matrix(tuple(shape)):
        raise FormatError(f"{where}: {what} needs a non-empty 2-D tensor, found shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def float_part(x: np.ndarray, dtype: str) -> np.ndarray:
    """Casts to a stored float dtype ("F16" or "F32"), clamping to its finite range."""
    limit = np.finfo(FLOAT_DTYPES[dtype]).max
    return np.clip(x, -limit, limit).astype(FLOAT_DTYPES[dtype])


def finite_floats(part: np.ndarray, where: str) -> np.ndarray:
    """A stored float part as float32, refusing NaN and infinities (for parts where they are not data)."""
    values = np.asarray(part).astype(np.float32)
    if not np.isfinite(values).all():
        raise FormatError(f"{where}: holds NaN or infinite values")
    return values


def check_index_range(values: np.ndarray, limit: int, where: str) -> None:
    """Indices read from a file must lie in [0, limit) before they index anything."""
    if values.size and int(values.max()) >= limit:
        raise FormatError(f"{where}: index {int(values.max())} out of range [0, {limit})")


def pack_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """bitpack.pack, a block at a time: its temporaries take tens of bytes per value.

    Blocks hold a multiple of 8 values, so each ends on a byte boundary and the
    concatenation is exactly the packed stream of all the values.
    """
    flat = values.reshape(-1)
    if flat.size <= PACK_BLOCK:
        return bitpack.pack(flat, bits)
    return np.concatenate([bitpack.pack(flat[i : i + PACK_BLOCK], bits) for i in range(0, flat.size, PACK_BLOCK)])


def unpack_codes(data: np.ndarray, bits: int, count: int, where: str) -> np.ndarray:
    """bitpack.unpack, a block at a time (see pack_codes); uint8 values for widths up to 8."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size != bitpack.packed_size(count, bits):
        raise FormatError(
            f"{where}: {data.size} bytes, expected {bitpack.packed_size(count, bits)} for {count} values of {bits} bits"
        )
    out = np.empty(count, np.uint8 if bits <= 8 else np.uint32)
    step = PACK_BLOCK * bits // 8
    for i in range(0, count, PACK_BLOCK):
        n = min(PACK_BLOCK, count - i)
        out[i : i + n] = bitpack.unpack(data[i // PACK_BLOCK * step :][: bitpack.packed_size(n, bits)], bits, n, where)
    return out
