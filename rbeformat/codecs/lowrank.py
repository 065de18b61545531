"""The ``lowrank`` tensor codec: a matrix as the product of two thin factors.

A 2-D tensor W (m x n) is replaced by its truncated singular value
decomposition W ~ U_r S_r V_r^T, split evenly between two factors

    A = U_r * sqrt(S_r)          (m x r)
    B = sqrt(S_r)[:, None] * V_r^T  (r x n)

so that both factors have the same scale (each column of A and row of B has
squared norm s_k), which suits quantizing them with the same chained codec.
With ``residual`` the exact remainder R = W - A @ B is stored too, usually
through a sparse or low-bit codec of a chain.

Decode, with A, B and R read as float32:

    P[i, j] = round_to_float32( sum_k float64(A[i, k]) * float64(B[k, j]) )
    W^[i, j] = P[i, j] + R[i, j]        (float32 addition; R absent: W^ = P)

The rank is chosen per tensor from the configuration: a fixed ``rank``, the
smallest rank keeping a fraction ``energy`` of sum(s_k^2), or the largest rank
whose factors fit ``bits`` bits per weight of W when each factor element costs
``factor_bits`` bits.

>>> w = np.outer(np.arange(1, 5), np.arange(1, 4)).astype(np.float32)
>>> codec = LowRank(rank=1)
>>> enc = codec.encode(w)
>>> enc.params, enc.parts["A"].shape, enc.parts["B"].shape
({'rank': 1}, (4, 1), (1, 3))
>>> bool(np.allclose(codec.decode(enc.parts, enc.params, w.shape, "w"), w, rtol=1e-6))
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import FormatError
from ..spec import DTYPES
from .base import require_int, require_keys
from .tensor import Encoded, PartSpec, TensorCodec

# Rows of the product are computed this many at a time, so decoding a tall
# matrix never holds more than a block of float64 values besides the output.
ROW_BLOCK = 4096


def number_in_range(value: Any, low: float, high: float, low_open: bool = True) -> float | None:
    """``value`` as a float if it is an int or float (not bool) in (low, high] or [low, high], else None."""
    if type(value) not in (int, float):
        return None
    try:
        number = float(value)  # an int too large for a float overflows here
    except OverflowError:
        return None
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        return None
    return number


def require_number(value: Any, where: str, low: float, high: float, low_open: bool = True) -> float:
    """A manifest number in (low, high] or [low, high]; FormatError otherwise."""
    number = number_in_range(value, low, high, low_open)
    if number is None:
        bracket = "(" if low_open else "["
        raise FormatError(f"{where}: expected a finite number in {bracket}{low}, {high}], found {value!r:.80}")
    return number


def check_parts(parts: dict[str, np.ndarray], specs: dict[str, PartSpec], where: str) -> None:
    """The parts must be exactly those of ``specs``, with their dtypes and shapes."""
    if not isinstance(parts, dict) or set(parts) != set(specs):
        found = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
        raise FormatError(f"{where}: expected parts {sorted(specs)}, found {found}")
    for name, spec in specs.items():
        part = parts[name]
        expected = np.dtype(DTYPES[spec.dtype].numpy_storage)
        if not isinstance(part, np.ndarray) or part.dtype != expected or part.shape != spec.shape:
            got = (part.dtype, part.shape) if isinstance(part, np.ndarray) else type(part).__name__
            raise FormatError(f"{where}: part {name!r} should be {spec.dtype} {spec.shape}, found {got}")


def spec_bits(specs: dict[str, PartSpec]) -> int:
    """Bits of all parts stored raw."""
    return sum(8 * DTYPES[s.dtype].itemsize * math.prod(s.shape) for s in specs.values())


def _matrix_shape(shape: tuple[int, ...], where: str) -> tuple[int, int]:
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise FormatError(f"{where}: lowrank needs a non-empty 2-D tensor, found shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


class LowRank(TensorCodec):
    """Truncated SVD, W ~ A @ B (+ R); see the module docstring."""

    name = "lowrank"
    chainable_parts = ("A", "B", "residual")

    def __init__(self, rank: int | None = None, energy: float | None = None, bits: float | None = None,
                 factor_bits: float | None = None, residual: bool = False):
        targets = [t for t in (rank, energy, bits) if t is not None]
        if len(targets) != 1:
            raise ValueError("give exactly one of rank, energy, bits")
        if rank is not None and (type(rank) is not int or rank < 1):
            raise ValueError("rank must be a positive integer")
        if energy is not None and number_in_range(energy, 0, 1) is None:
            raise ValueError("energy must be a number in (0, 1]")
        if bits is not None and (number_in_range(bits, 0, 64) is None or number_in_range(factor_bits, 0, 64) is None):
            raise ValueError("bits needs bits and factor_bits, numbers in (0, 64]")
        if bits is None and factor_bits is not None:
            raise ValueError("factor_bits only goes with bits")
        if not isinstance(residual, bool):
            raise ValueError("residual must be true or false")
        self.rank, self.energy, self.bits_target, self.factor_bits = rank, energy, bits, factor_bits
        self.residual = residual

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowRank) and self.config() == other.config()

    def config(self) -> dict[str, Any]:
        if self.rank is not None:
            target: dict[str, Any] = {"rank": self.rank}
        elif self.energy is not None:
            target = {"energy": self.energy}
        else:
            target = {"bits": self.bits_target, "factor_bits": self.factor_bits}
        return {**target, "residual": self.residual}

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> "LowRank":
        require_keys(config, where, {"residual"}, {"rank", "energy", "bits", "factor_bits"})
        if not isinstance(config["residual"], bool):
            raise FormatError(f"{where}.residual: expected true or false")
        present = [k for k in ("rank", "energy", "bits") if k in config]
        if len(present) != 1:
            raise FormatError(f"{where}: expected exactly one of rank, energy, bits; found {present}")
        if ("factor_bits" in config) != ("bits" in config):
            raise FormatError(f"{where}: factor_bits goes with bits and only with it")
        kwargs: dict[str, Any] = {"residual": config["residual"]}
        if "rank" in config:
            kwargs["rank"] = require_int(config["rank"], f"{where}.rank", 1, 1 << 31)
        elif "energy" in config:
            kwargs["energy"] = require_number(config["energy"], f"{where}.energy", 0.0, 1.0)
        else:
            kwargs["bits"] = require_number(config["bits"], f"{where}.bits", 0.0, 64.0)
            kwargs["factor_bits"] = require_number(config["factor_bits"], f"{where}.factor_bits", 0.0, 64.0)
        return cls(**kwargs)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[0] >= 1 and shape[1] >= 1

    def choose_rank(self, singular_values: np.ndarray, m: int, n: int) -> int:
        """The rank the configuration asks for, in [1, min(m, n)]."""
        full = min(m, n)
        if self.rank is not None:
            return min(self.rank, full)
        if self.energy is not None:
            cumulative = np.cumsum(singular_values.astype(np.float64) ** 2)
            if cumulative[-1] == 0:
                return 1
            return min(full, int(np.searchsorted(cumulative, self.energy * cumulative[-1])) + 1)
        # Each rank adds (m + n) factor elements of factor_bits bits.
        affordable = math.floor(self.bits_target * m * n / ((m + n) * self.factor_bits))
        return max(1, min(full, affordable))

    def encode(self, x: np.ndarray, refs: dict[str, np.ndarray] | None = None) -> Encoded:
        if x.ndim != 2 or 0 in x.shape:
            raise ValueError(f"lowrank encodes non-empty 2-D tensors, not shape {x.shape}")
        w = np.asarray(x, dtype=np.float32)
        if not np.isfinite(w).all():
            raise ValueError("lowrank cannot encode NaN or infinite values")
        m, n = w.shape
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        r = self.choose_rank(s, m, n)
        u, s, vt = u[:, :r], s[:r], vt[:r]
        # The SVD fixes each singular pair only up to sign; make the largest
        # entry of each row of V^T positive so the output does not depend on it.
        flip = np.sign(vt[np.arange(r), np.abs(vt).argmax(axis=1)])
        flip[flip == 0] = 1
        root = np.sqrt(s) * flip
        a = (u * root).astype(np.float32)
        b = (root[:, None] * vt).astype(np.float32)
        parts = {"A": a, "B": b}
        if self.residual:
            parts["residual"] = w - product(a, b)
        return Encoded(parts, {"rank": r})

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        m, n = _matrix_shape(shape, where)
        require_keys(params, f"{where}.params", {"rank"})
        r = require_int(params["rank"], f"{where}.params.rank", 1, min(m, n))
        specs = {"A": PartSpec("F32", (m, r)), "B": PartSpec("F32", (r, n))}
        if self.residual:
            specs["residual"] = PartSpec("F32", (m, n))
        return specs

    def bits(self, params: Any, shape: tuple[int, ...]) -> int:
        """32 * (r*(m + n) + [m*n if residual])."""
        return spec_bits(self.part_specs(params, shape, "lowrank"))

    def decode(self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str,
               refs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        check_parts(parts, self.part_specs(params, shape, where), where)
        # Stored values may overflow float32 here; that is data, not an error.
        with np.errstate(over="ignore", invalid="ignore"):
            out = product(parts["A"], parts["B"])
            if self.residual:
                out += parts["residual"]
        return out


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32(A @ B) with the sum taken in float64 (products of float32 are exact there)."""
    b64 = b.astype(np.float64)
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    for start in range(0, a.shape[0], ROW_BLOCK):
        stop = start + ROW_BLOCK
        out[start:stop] = a[start:stop].astype(np.float64) @ b64
    return out
