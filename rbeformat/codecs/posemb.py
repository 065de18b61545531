"""Position-table codecs: ``posdct`` (learned tables) and ``sinusoid`` (formula tables).

A learned absolute position table P (positions x hidden) varies smoothly
along the position axis, so ``posdct`` keeps only its first K coefficients of
the orthonormal DCT-II along that axis (part ``coeffs``, K x hidden).  With
N positions, the basis is

    C[k, p] = s_k * cos(pi * ((2p + 1) * k mod 4N) / (2N)),
    s_0 = sqrt(1 / N), s_k = sqrt(2 / N) for k > 0        (all in float64)

(reducing the integer (2p + 1) * k modulo 4N first keeps the cosine argument
small and exact).  Encode: coeffs = C[:K] @ P.  Decode (the inverse DCT, a
DCT-III, with coefficients K.. taken as zero), in float64 and rounded once:

    P^[p, h] = float32( sum_{k<K} C[k, p] * float64(coeffs[k, h]) )

``sinusoid`` stores nothing but parameters: a table equal (within
``tolerance``) to the Transformer's formula, with d = hidden, i < d/2 and
angle(p, i) = p * base**(-2i / d) in float64,

    interleaved: P[p, 2i] = sin(angle), P[p, 2i + 1] = cos(angle)
    halves:      P[p, i]  = sin(angle), P[p, d/2 + i] = cos(angle)

each rounded to float32.  Its ``encode`` raises ``NotSinusoidal`` (a
ValueError) when the table does not match, so a recipe can fall back.

>>> table = Sinusoidal().table(8, 6, 10000.0, "interleaved")
>>> Sinusoidal().encode(table).params
{'base': 10000.0, 'layout': 'interleaved'}
>>> smooth = np.cos(np.outer(np.arange(64) / 64, [1.0, 2.0, 3.0])).astype(np.float32)
>>> codec = PositionDCT(keep=8)
>>> enc = codec.encode(smooth)
>>> enc.parts["coeffs"].shape, enc.params
((8, 3), {'keep': 8})
>>> float(np.abs(codec.decode(enc.parts, enc.params, smooth.shape, "x") - smooth).max()) < 0.05
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_int, require_keys
from .core.fields import integer, number, optional, setting
from .core.tensor import Encoded, PartSpec, TensorCodec
from .util.arrays import is_matrix, matrix_shape

# Basis rows are built this many at a time when encoding, to bound memory.
BASIS_BLOCK = 1024
LAYOUTS = ("interleaved", "halves")
MAX_BASE = 1e12
# A position table holds max_positions x hidden values: a few million in real
# models (8192 x 4096 is 2**25).  Both codecs refuse tables past this many
# elements (512 MiB of float32) when a file is opened, because neither stores
# anything that grows with the table (sinusoid stores no parts at all; posdct
# may keep a single coefficient row), so the file's size cannot bound them.
MAX_TABLE_ELEMENTS = 1 << 27
# The formula table is computed in blocks of whole positions holding about
# this many values (float64 angles, sines and cosines of one block), so that
# decoding holds little beyond the float32 result.
TABLE_BLOCK = 1 << 20


def check_table_size(shape: tuple[int, ...], where: str, codec: str) -> None:
    if math.prod(shape) > MAX_TABLE_ELEMENTS:
        raise FormatError(
            f"{where.removesuffix('.params')}: a {codec} position table of shape {list(shape)} holds "
            f"{math.prod(shape)} values, more than the {MAX_TABLE_ELEMENTS} a position table may hold"
        )


def dct_basis(n: int, rows: range) -> np.ndarray:
    """Rows ``rows`` of the orthonormal DCT-II matrix of size n, float64 (len(rows) x n)."""
    k = np.arange(rows.start, rows.stop, dtype=np.int64)[:, None]
    p = np.arange(n, dtype=np.int64)[None, :]
    basis = np.cos(np.pi * ((2 * p + 1) * k % (4 * n)) / (2 * n))
    scale = np.where(k == 0, math.sqrt(1 / n), math.sqrt(2 / n))
    return scale * basis


@dataclass(frozen=True)
class PositionDCT(TensorCodec):
    """The first K DCT-II coefficients along the position axis; see the module docstring."""

    name = "posdct"
    chainable_parts = ("coeffs",)

    keep: int | None = setting(None, optional(integer(1, 1 << 31)), "DCT coefficients kept along the positions")
    energy: float | None = setting(
        None, optional(number(0, 1)), "keep the fewest coefficients holding this fraction of the energy"
    )

    def check_settings(self, where: str) -> None:
        if (self.keep is None) == (self.energy is None):
            raise FormatError(f"{where}: give exactly one of keep, energy")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return is_matrix(shape)

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        n = x.shape[0]
        table = np.asarray(x, dtype=np.float64)
        coeffs = np.concatenate(
            [dct_basis(n, range(s, min(n, s + BASIS_BLOCK))) @ table for s in range(0, n, BASIS_BLOCK)]
        )
        if self.keep is not None:
            keep = min(self.keep, n)
        else:
            # Orthonormal: the kept energy fraction is 1 - (relative error)**2.
            cumulative = np.cumsum((coeffs**2).sum(axis=1))
            if cumulative[-1] == 0:
                keep = 1
            else:
                keep = min(n, int(np.searchsorted(cumulative, self.energy * cumulative[-1])) + 1)
        return Encoded({"coeffs": coeffs[:keep].astype(np.float32)}, {"keep": keep})

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        n, hidden = matrix_shape(shape, where, "posdct (positions x hidden)")
        check_table_size(shape, where, "posdct")
        require_keys(params, f"{where}.params", {"keep"})
        keep = require_int(params["keep"], f"{where}.params.keep", 1, n)
        return {"coeffs": PartSpec("F32", (keep, hidden))}

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        coeffs = parts["coeffs"].astype(np.float64)
        basis = dct_basis(shape[0], range(coeffs.shape[0]))
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the data's
            return (basis.T @ coeffs).astype(np.float32)

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        keep = params["keep"] if isinstance(params, dict) and isinstance(params.get("keep"), int) else shape[0]
        # the basis (keep x positions) and the product in float64, then the float32 result
        return 8 * keep * (shape[0] + shape[1]) + 8 * math.prod(shape) + 4 * math.prod(shape)


class NotSinusoidal(ValueError):
    """The table is not the sinusoidal formula within the tolerance."""


@dataclass(frozen=True)
class Sinusoidal(TensorCodec):
    """A formula position table, stored as its parameters only; see the module docstring.

    Both settings only guide the encoder (the params carry the base decoding
    uses); files of format 1.1 / 1.2 record them in the config.
    """

    name = "sinusoid"
    finite_only = False  # a table that is not the formula is refused with NotSinusoidal instead

    tolerance: float = setting(
        1e-6, number(0, 1e300, False), "largest |error| accepted against the formula", "recorded"
    )
    base: float = setting(10000.0, number(1, MAX_BASE, False), "the formula's base tried first", "recorded")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[0] >= 1 and shape[1] >= 2 and shape[1] % 2 == 0

    @staticmethod
    def table(positions: int, hidden: int, base: float, layout: str) -> np.ndarray:
        """The formula table, float32 (positions x hidden), computed a block of positions at a time."""
        half = hidden // 2
        inv_freq = np.power(float(base), -(2.0 * np.arange(half)) / hidden)
        out = np.empty((positions, hidden), np.float32)
        sin, cos = (out[:, 0::2], out[:, 1::2]) if layout == "interleaved" else (out[:, :half], out[:, half:])
        step = max(1, TABLE_BLOCK // max(hidden, 1))
        for start in range(0, positions, step):
            stop = min(positions, start + step)
            angle = np.arange(start, stop, dtype=np.float64)[:, None] * inv_freq[None, :]
            sin[start:stop], cos[start:stop] = np.sin(angle), np.cos(angle)
        return out

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        # the result, and one block's angles, sines and cosines in float64
        step = max(1, TABLE_BLOCK // max(shape[1], 1))
        return 4 * math.prod(shape) + 3 * 8 * min(shape[0], step) * (shape[1] // 2 + 1)

    def _candidate_bases(self, x: np.ndarray) -> list[float]:
        """The configured base, then the integer nearest to the base the table's second frequency implies."""
        bases = [self.base]
        positions, hidden = x.shape
        if positions >= 2 and hidden >= 4:
            for column in (2, 1):  # interleaved, halves: sin(1 * base**(-2/d))
                s = float(x[1, column])
                if not 0 < s < 1:
                    continue
                log_base = -hidden / 2 * math.log(math.asin(s))
                if 0 <= log_base <= math.log(MAX_BASE):
                    estimate = float(round(math.exp(log_base)))
                    if estimate >= 1 and estimate not in bases:
                        bases.append(estimate)
        return bases

    def encode(self, x: np.ndarray, refs: dict[str, np.ndarray] | None = None, calibration=None) -> Encoded:
        if not self.accepts(np.shape(x)):
            raise NotSinusoidal(f"sinusoid needs a 2-D table with an even hidden size, not shape {np.shape(x)}")
        return super().encode(x, refs, calibration)

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        with np.errstate(over="ignore"):
            for base in self._candidate_bases(x):
                for layout in LAYOUTS:
                    error = np.abs(self.table(*x.shape, base, layout) - x).max()
                    if error <= self.tolerance:  # False for NaN
                        return Encoded({}, {"base": base, "layout": layout})
        raise NotSinusoidal(f"table is not sinusoidal within {self.tolerance:g}")

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        matrix_shape(shape, where, "sinusoid (positions x hidden)")
        check_table_size(shape, where, "sinusoid")
        if shape[1] % 2:
            raise FormatError(f"{where}: sinusoid needs an even hidden size, found {shape[1]}")
        require_keys(params, f"{where}.params", {"base", "layout"})
        number(1, MAX_BASE, False)(params["base"], f"{where}.params.base")
        if params["layout"] not in LAYOUTS:
            raise FormatError(f"{where}.params.layout: expected one of {LAYOUTS}, found {params['layout']!r:.40}")
        return {}

    def formula(self, params: Any) -> str:
        return f"sinusoid.{params['layout']}"

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        return self.table(shape[0], shape[1], float(params["base"]), params["layout"])
