"""Float conversions shared by the writer and the reader, and error statistics."""

from __future__ import annotations

import math

import numpy as np

from .spec import DTYPES


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """The values of a float tensor (bf16 given as its uint16 bits) as float32."""
    if dtype == "BF16":
        bits = np.asarray(array).astype(np.uint32)
        bits <<= 16  # in place: one temporary-free array of the result's size
        return bits.view(np.float32)
    return np.asarray(array, dtype=np.float32)


# bf16 rounding works on blocks of this many values, so that its uint32
# temporaries stay small beside the result.
CONVERT_BLOCK = 1 << 20


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in the storage of ``dtype`` (bf16 rounded to nearest even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "BF16":
        out = np.empty(x.shape, np.uint16)
        source, target = x.reshape(-1), out.reshape(-1)
        for start in range(0, source.size, CONVERT_BLOCK):
            block = source[start : start + CONVERT_BLOCK]
            bits = block.view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
            target[start : start + CONVERT_BLOCK] = np.where(np.isnan(block), (bits >> 16) | 0x40, rounded)
        return out
    return x.astype(np.dtype(DTYPES[dtype].numpy_storage), copy=False)  # float32 itself: no copy


def error_stats(x: np.ndarray, y: np.ndarray) -> dict:
    """How far the decoded y is from x: relative Frobenius error, SNR in dB, max |error|."""
    x64, err = x.astype(np.float64), (y.astype(np.float64) - x.astype(np.float64))
    if not (np.isfinite(x64).all() and np.isfinite(err).all()):
        return _no_stats()
    signal, noise = float(np.sqrt((x64 * x64).sum())), float(np.sqrt((err * err).sum()))
    return _stats(signal, noise, float(np.abs(err).max()) if err.size else 0.0)


def as_stored(decoded: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a reader of a ``dtype`` tensor sees them (rounded to bf16 or fp16), rounded in
    ``decoded``'s own memory block by block where it may be written (no second copy of a large tensor)."""
    if dtype == "F32":
        return decoded
    out = decoded if decoded.flags.writeable and decoded.flags.c_contiguous else decoded.copy()
    flat = out.reshape(-1)
    for start in range(0, flat.size, CONVERT_BLOCK):
        block = flat[start : start + CONVERT_BLOCK]
        block[...] = to_float32(from_float32(block, dtype), dtype)
    return out


# error_stats of larger tensors works on blocks of this many values, so that its float64
# temporaries stay small beside a large tensor (an output head of 150 M values).
STATS_BLOCK = 1 << 24


def stored_error_stats(reference: np.ndarray, decoded: np.ndarray, dtype: str) -> dict:
    """``error_stats`` of ``reference`` (in the storage of ``dtype``) against ``decoded`` (float32) as a
    reader sees it, rounded to ``dtype``; a large tensor block by block, in bounded memory."""
    if reference.size <= STATS_BLOCK:
        return error_stats(to_float32(reference, dtype), to_float32(from_float32(decoded, dtype), dtype))
    flat_reference, flat_decoded = reference.reshape(-1), decoded.reshape(-1)
    signal = noise = peak = 0.0
    for start in range(0, flat_reference.size, STATS_BLOCK):
        part = slice(start, start + STATS_BLOCK)
        x = to_float32(flat_reference[part], dtype).astype(np.float64)
        err = to_float32(from_float32(flat_decoded[part], dtype), dtype).astype(np.float64) - x
        if not (np.isfinite(x).all() and np.isfinite(err).all()):
            return _no_stats()
        signal, noise = signal + float((x * x).sum()), noise + float((err * err).sum())
        peak = max(peak, float(np.abs(err).max()))
    return _stats(math.sqrt(signal), math.sqrt(noise), peak)


def _stats(signal: float, noise: float, peak: float) -> dict:
    rel = noise / signal if signal else (0.0 if noise == 0 else None)
    snr = None if noise == 0 or signal == 0 else 20 * math.log10(signal / noise)
    return {"rel_error": rel, "snr_db": snr, "max_abs_error": peak}


def _no_stats() -> dict:
    return {"rel_error": None, "snr_db": None, "max_abs_error": None}  # JSON has no inf/NaN
