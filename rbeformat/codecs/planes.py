"""Byte-plane transforms: the numpy reference and the C fast path.

``split`` turns n little-endian words of ``width`` bytes into ``width`` planes of
n bytes (plane k holds byte k of every word), after optionally rotating every
word left by one bit; ``join`` is its inverse.  ``group`` is a stable counting
sort of a byte plane by a context plane; ``ungroup`` undoes it from the groups
(one buffer per context value present).  The numpy
functions define the results; the C versions in ``rbeformat._planes`` must give
the same bytes and are used when they were built.
"""

from __future__ import annotations

import numpy as np

try:  # The extension is optional: a build without a compiler still works.
    from .. import _planes as _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def has_native() -> bool:
    """Whether the C fast path is in use."""
    return _native is not None


def split_reference(data, width: int, rotate: bool) -> np.ndarray:
    words = np.frombuffer(data, dtype=_WORD[width])
    if rotate:
        bits = _WORD[width](8 * width - 1)
        words = (words << _WORD[width](1)) | (words >> bits)
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, width).T).reshape(-1)


def join_reference(planes, width: int, rotate: bool, out) -> None:
    grid = np.stack([np.frombuffer(p, dtype=np.uint8) for p in planes])
    words = np.ascontiguousarray(grid.T).view(_WORD[width]).reshape(-1)
    if rotate:
        bits = _WORD[width](8 * width - 1)
        words = (words >> _WORD[width](1)) | (words << bits)
    np.frombuffer(out, dtype=np.uint8)[:] = words.view(np.uint8)


def group_reference(values: np.ndarray, context: np.ndarray) -> np.ndarray:
    return values[np.argsort(context, kind="stable")]


def ungroup_reference(runs: tuple, context: np.ndarray) -> np.ndarray:
    grouped = np.concatenate([np.frombuffer(r, dtype=np.uint8) for r in runs] or [np.empty(0, np.uint8)])
    out = np.empty_like(context)
    out[np.argsort(context, kind="stable")] = grouped
    return out


def split(data, width: int, rotate: bool) -> np.ndarray:
    """The planes of ``data`` back to back: plane k is bytes [k*n, (k+1)*n)."""
    if _native is None:
        return split_reference(data, width, rotate)
    out = np.empty(len(memoryview(data).cast("B")), dtype=np.uint8)
    _native.split(data, width, rotate, out)
    return out


def join(planes: tuple, width: int, rotate: bool, out) -> None:
    """Writes the words rebuilt from ``planes`` (a tuple of buffers) into ``out``."""
    if _native is None:
        join_reference(planes, width, rotate, out)
    else:
        _native.join(planes, width, rotate, out)


def histogram(context: np.ndarray) -> np.ndarray:
    """How many times each byte value 0..255 occurs in ``context`` (int64)."""
    if _native is None:
        return np.bincount(context, minlength=256).astype(np.int64)
    out = np.empty(256, dtype=np.int64)
    _native.histogram(context, out)
    return out


def group(values: np.ndarray, context: np.ndarray) -> np.ndarray:
    """``values`` reordered stably by ascending ``context`` byte."""
    if _native is None:
        return group_reference(values, context)
    out = np.empty_like(values)
    _native.group(values, context, out)
    return out


def ungroup(runs: tuple, context: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """The inverse of ``group``: ``runs`` are the groups, in ascending context order.

    ``counts`` is ``histogram(context)`` when the caller already has it.
    """
    if _native is None:
        return ungroup_reference(runs, context)
    out = np.empty_like(context)
    _native.ungroup(runs, context, histogram(context) if counts is None else counts, out)
    return out
