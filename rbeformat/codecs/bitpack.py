"""Sub-byte packing of unsigned integers, as every packed codec part uses it.

Value i of bit width b occupies bits [i*b, (i+1)*b) of a little-endian bit
stream, least significant bit first, where stream bit j is bit (j mod 8) of
byte floor(j / 8).  The last byte is padded with zero bits.

>>> pack(np.array([1, 2, 3], np.uint8), 2).tobytes()
b'9'
>>> unpack(pack(np.array([1, 2, 3], np.uint8), 2), 2, 3).tolist()
[1, 2, 3]
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs non-negative integers below 2**bits (1 <= bits <= 32) into uint8."""
    if not 1 <= bits <= 32:
        raise ValueError("bits must be in [1, 32]")
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if v.size and int(v.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    if bits == 8:
        return v.astype(np.uint8)
    # Expand every value to its bits (LSB first), then let numpy pack the stream.
    stream = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int, where: str = "packed values") -> np.ndarray:
    """The inverse of ``pack``; ``data`` must hold exactly packed_size(count, bits) bytes."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size != packed_size(count, bits):
        raise FormatError(f"{where}: {data.size} bytes, expected {packed_size(count, bits)} for "
                          f"{count} values of {bits} bits")
    if bits == 8:
        return data.astype(np.uint32)
    stream = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits).astype(np.uint32)
    return (stream << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
