"""Byte-plane transforms: the numpy reference and the C fast path.

``split`` turns n little-endian words of ``width`` bytes into ``width`` planes of
n bytes (plane k holds byte k of every word), after rotating every word left by
``rotate`` bits (0 <= rotate < 8 * width); ``join`` is its inverse.  ``group`` is a stable counting
sort of a byte plane by a context plane; ``ungroup`` undoes it from the groups
(one buffer per context value present).  ``join_fields`` rebuilds a plane from
its high and low bit fields, each packed as in ``bitpack``.  The numpy
functions define the results; the C versions in ``rbeformat._planes`` must give
the same bytes and are used when ``rbeformat.native`` loaded them.
"""

from __future__ import annotations

import numpy as np

# The C extension as rbeformat.native loaded it; None on the numpy reference path.
from ...native import extension as kernels
from ..util import bitpack

_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def has_native() -> bool:
    """Whether the C fast path is in use."""
    return kernels is not None


def _check_rotation(width: int, rotate: int) -> None:
    if width not in _WORD or not 0 <= rotate < 8 * width:
        raise ValueError("width must be 1, 2, 4 or 8 and rotate in [0, 8 * width)")


def _rotl(words: np.ndarray, width: int, r: int) -> np.ndarray:
    if r == 0:
        return words
    word = _WORD[width]
    return (words << word(r)) | (words >> word(8 * width - r))


def split_reference(data, width: int, rotate: int) -> np.ndarray:
    _check_rotation(width, rotate)
    words = _rotl(np.frombuffer(data, dtype=_WORD[width]), width, rotate)
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, width).T).reshape(-1)


def join_reference(planes, width: int, rotate: int, out) -> None:
    _check_rotation(width, rotate)
    grid = np.stack([np.frombuffer(p, dtype=np.uint8) for p in planes])
    words = np.ascontiguousarray(grid.T).view(_WORD[width]).reshape(-1)
    words = _rotl(words, width, (8 * width - rotate) % (8 * width))
    np.frombuffer(out, dtype=np.uint8)[:] = words.view(np.uint8)


def group_reference(values: np.ndarray, context: np.ndarray) -> np.ndarray:
    return values[np.argsort(context, kind="stable")]


def ungroup_reference(runs: tuple, context: np.ndarray) -> np.ndarray:
    arrays = [np.frombuffer(r, dtype=np.uint8) for r in runs]
    counts = np.bincount(context, minlength=256)
    if [a.size for a in arrays] != counts[counts > 0].tolist():
        raise ValueError("runs must hold one buffer per context value present, of that value's count")
    grouped = np.concatenate(arrays or [np.empty(0, np.uint8)])
    out = np.empty_like(context)
    out[np.argsort(context, kind="stable")] = grouped
    return out


def split(data, width: int, rotate: int) -> np.ndarray:
    """The planes of ``data`` back to back: plane k is bytes [k*n, (k+1)*n)."""
    if kernels is None:
        return split_reference(data, width, rotate)
    out = np.empty(len(memoryview(data).cast("B")), dtype=np.uint8)
    kernels.split(data, width, rotate, out)
    return out


def join(planes: tuple, width: int, rotate: int, out) -> None:
    """Writes the words rebuilt from ``planes`` (a tuple of buffers) into ``out``."""
    if kernels is None:
        join_reference(planes, width, rotate, out)
    else:
        kernels.join(planes, width, rotate, out)


def histogram(context: np.ndarray) -> np.ndarray:
    """How many times each byte value 0..255 occurs in ``context`` (int64)."""
    if kernels is None:
        return np.bincount(context, minlength=256).astype(np.int64)
    out = np.empty(256, dtype=np.int64)
    kernels.histogram(context, out)
    return out


def group(values: np.ndarray, context: np.ndarray) -> np.ndarray:
    """``values`` reordered stably by ascending ``context`` byte."""
    if kernels is None:
        return group_reference(values, context)
    out = np.empty_like(values)
    kernels.group(values, context, out)
    return out


def ungroup(runs: tuple, context: np.ndarray) -> np.ndarray:
    """The inverse of ``group``: ``runs`` are the groups, in ascending context order."""
    return ungroup_planes([runs], context, segment_histograms(context))[0]


def split_fields_reference(plane: np.ndarray, low: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.uint8((1 << low) - 1)
    return bitpack.pack(plane >> np.uint8(low), 8 - low), bitpack.pack(plane & mask, low)


def split_fields(plane: np.ndarray, low: int) -> tuple[np.ndarray, np.ndarray]:
    """The high ``8 - low`` and the low ``low`` bits of every byte, each packed."""
    if kernels is None:
        return split_fields_reference(plane, low)
    high = np.empty(bitpack.packed_size(len(plane), 8 - low), np.uint8)
    low_values = np.empty(bitpack.packed_size(len(plane), low), np.uint8)
    kernels.split_fields(np.ascontiguousarray(plane, np.uint8), low, high, low_values)
    return high, low_values


def joint_histogram(context: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts (256 x 256, int64) of each (context byte, value byte) pair."""
    if kernels is None:
        return np.bincount(context.astype(np.int64) * 256 + values, minlength=65536).reshape(256, 256)
    out = np.empty(65536, np.int64)
    kernels.joint_histogram(context, values, out)
    return out.reshape(256, 256)


def join_fields_reference(high, low_stream, low: int, n: int) -> np.ndarray:
    h = bitpack.unpack(np.frombuffer(high, np.uint8), 8 - low, n).astype(np.uint8)
    lo = bitpack.unpack(np.frombuffer(low_stream, np.uint8), low, n).astype(np.uint8)
    return (h << np.uint8(low)) | lo


def join_fields(high, low_stream, low: int, n: int) -> np.ndarray:
    """The inverse of ``split_fields`` for a plane of ``n`` bytes; the sizes must be exact."""
    if not 1 <= low <= 7:
        raise ValueError("low must be in [1, 7]")
    if len(high) != bitpack.packed_size(n, 8 - low) or len(low_stream) != bitpack.packed_size(n, low):
        raise ValueError("high and low_stream must hold exactly the packed sizes of n values")
    if kernels is None:
        return join_fields_reference(high, low_stream, low, n)
    out = np.empty(n, dtype=np.uint8)
    kernels.join_fields(high, low_stream, low, out)
    return out


SEGMENTS = 4  # contiguous parts of a context that ungroup_planes walks side by side


def segment_histograms(context: np.ndarray) -> np.ndarray:
    """Byte counts (SEGMENTS x 256, int64) of SEGMENTS contiguous parts of ``context``,
    part s being [s * L, (s + 1) * L) with L = ceil(n / SEGMENTS)."""
    if kernels is not None:
        out = np.empty((SEGMENTS, 256), dtype=np.int64)
        kernels.segment_histograms(context, out)
        return out
    step = -(-len(context) // SEGMENTS)
    return np.stack([np.bincount(context[s * step : (s + 1) * step], minlength=256) for s in range(SEGMENTS)]).astype(
        np.int64
    )


def ungroup_planes(runs: list[tuple], context: np.ndarray, segment_counts: np.ndarray) -> list[np.ndarray]:
    """``ungroup`` for several planes grouped by the same context, in one pass."""
    if kernels is None:  # the counts only speed up the C pass, but both paths refuse wrong ones
        if not np.array_equal(segment_counts, segment_histograms(context)):
            raise ValueError("segment counts do not match the context")
        return [ungroup_reference(r, context) for r in runs]
    outs = [np.empty_like(context) for _ in runs]
    kernels.ungroup_planes(tuple(runs), context, segment_counts, tuple(outs))
    return outs
