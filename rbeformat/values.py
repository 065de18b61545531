"""Float conversions shared by the writer and the reader, and error statistics."""

from __future__ import annotations

import math

import numpy as np

from .spec import DTYPES


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """The values of a float tensor (bf16 given as its uint16 bits) as float32."""
    if dtype == "BF16":
        return (np.asarray(array).astype(np.uint32) << 16).view(np.float32)
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
        return {"rel_error": None, "snr_db": None, "max_abs_error": None}  # JSON has no inf/NaN
    signal, noise = float(np.sqrt((x64 * x64).sum())), float(np.sqrt((err * err).sum()))
    rel = noise / signal if signal else (0.0 if noise == 0 else None)
    snr = None if noise == 0 or signal == 0 else 20 * math.log10(signal / noise)
    return {"rel_error": rel, "snr_db": snr, "max_abs_error": float(np.abs(err).max()) if err.size else 0.0}
