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

from ...errors import FormatError


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits."""
    return (count * bits + 7) // 8


_BLOCK = 1 << 20  # values per step of the generic path, to bound its memory


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs non-negative integers below 2**bits (1 <= bits <= 32) into uint8."""
    if not 1 <= bits <= 32:
        raise ValueError("bits must be in [1, 32]")
    v = np.ascontiguousarray(values).reshape(-1)
    if v.size and (int(v.min()) < 0 or int(v.max()) >> bits):
        raise ValueError(f"a value does not fit in {bits} bits")
    if bits in (8, 16, 32):
        return v.astype(f"<u{bits // 8}").view(np.uint8)
    if bits < 8:
        return _pack_small(v.astype(np.uint64), bits)
    return (
        np.concatenate([_pack_generic(v[i : i + _BLOCK], bits) for i in range(0, max(v.size, 1), _BLOCK)])
        if v.size > _BLOCK
        else _pack_generic(v, bits)
    )


def _pack_small(v: np.ndarray, bits: int) -> np.ndarray:
    # Eight values of b bits fill exactly b bytes: build them as one 64-bit word.
    n = v.size
    groups = np.zeros((-(-n // 8), 8), np.uint64)
    groups.reshape(-1)[:n] = v
    word = np.zeros(len(groups), np.uint64)
    for j in range(8):
        word |= groups[:, j] << np.uint64(j * bits)
    return word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)[: packed_size(n, bits)].copy()


def _pack_generic(v: np.ndarray, bits: int) -> np.ndarray:
    # Expand every value to its bits (LSB first), then let numpy pack the stream.
    # _BLOCK is a multiple of 8, so blocks end on byte boundaries.
    stream = ((v.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int, where: str = "packed values") -> np.ndarray:
    """The inverse of ``pack``; ``data`` must hold exactly packed_size(count, bits) bytes."""
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if data.size != packed_size(count, bits):
        raise FormatError(
            f"{where}: {data.size} bytes, expected {packed_size(count, bits)} for {count} values of {bits} bits"
        )
    if bits in (8, 16, 32):
        return data.view(f"<u{bits // 8}").astype(np.uint32)
    if bits < 8:
        return _unpack_small(data, bits, count)
    step = _BLOCK * bits // 8
    pieces = [_unpack_generic(data[i : i + step], bits) for i in range(0, max(data.size, 1), step)]
    return np.concatenate(pieces)[:count] if pieces else np.empty(0, np.uint32)


def _unpack_small(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    groups = -(-count // 8)
    padded = np.zeros(groups * bits, np.uint8)
    padded[: data.size] = data
    rows = np.zeros((groups, 8), np.uint8)
    rows[:, :bits] = padded.reshape(groups, bits)
    word = rows.view("<u8").reshape(-1)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((groups, 8), np.uint32)
    for j in range(8):
        out[:, j] = (word >> np.uint64(j * bits)) & mask
    return out.reshape(-1)[:count]


def _unpack_generic(data: np.ndarray, bits: int) -> np.ndarray:
    stream = np.unpackbits(data, bitorder="little")
    whole = stream.size // bits
    stream = stream[: whole * bits].reshape(whole, bits).astype(np.uint32)
    return (stream << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
