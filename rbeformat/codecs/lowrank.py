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
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_int, require_keys
from .core.fields import boolean, integer, number, optional, setting
from .core.tensor import Encoded, PartSpec, TensorCodec
from .util.arrays import is_matrix, matrix_shape

# Rows of the product are computed this many at a time, so decoding a tall
# matrix never holds more than a block of float64 values besides the output.
ROW_BLOCK = 4096


@dataclass(frozen=True)
class LowRank(TensorCodec):
    """Truncated SVD, W ~ A @ B (+ R); see the module docstring."""

    name = "lowrank"
    chainable_parts = ("A", "B", "residual")

    rank: int | None = setting(None, optional(integer(1, 1 << 31)), "a fixed rank")
    energy: float | None = setting(
        None, optional(number(0, 1)), "the smallest rank keeping this fraction of sum(s_k^2)"
    )
    bits: float | None = setting(None, optional(number(0, 64)), "the largest rank within this many bits per weight")
    factor_bits: float | None = setting(None, optional(number(0, 64)), "bits per factor element, for bits")
    residual: bool = setting(False, boolean, "also store the exact remainder W - A B")

    def check_settings(self, where: str) -> None:
        present = [k for k in ("rank", "energy", "bits") if getattr(self, k) is not None]
        if len(present) != 1:
            raise FormatError(f"{where}: give exactly one of rank, energy, bits; found {present or 'none'}")
        if (self.factor_bits is None) != (self.bits is None):
            raise FormatError(f"{where}: factor_bits goes with bits and only with it")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return is_matrix(shape)

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
        affordable = math.floor(self.bits * m * n / ((m + n) * self.factor_bits))
        return max(1, min(full, affordable))

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        w = x
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

    def chainable(self) -> tuple[str, ...]:
        return ("A", "B", "residual") if self.residual else ("A", "B")

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """32 * (r*(m + n) + [m*n if residual]) bits stored raw."""
        m, n = matrix_shape(shape, where, "lowrank")
        require_keys(params, f"{where}.params", {"rank"})
        r = require_int(params["rank"], f"{where}.params.rank", 1, min(m, n))
        specs = {"A": PartSpec("F32", (m, r)), "B": PartSpec("F32", (r, n))}
        if self.residual:
            specs["residual"] = PartSpec("F32", (m, n))
        return specs

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        rows, cols = shape
        rank = self.part_specs(params, shape, self.name)["A"].shape[1]
        # B in float64, one block of rows of A and of the product in float64, the float32 result
        return 8 * rank * cols + 8 * min(rows, ROW_BLOCK) * (rank + cols) + 4 * rows * cols

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
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
