"""Sparsity codecs: ``sparse`` (unstructured) and ``nm24`` (2:4 structured).

``sparse`` keeps the fraction ``density`` of the elements with the largest
magnitude and stores their values (part ``values``, float32, in row-major
order) plus where they are, as whichever of two index structures is smaller:

* ``mask``: one bit per element (bit i set: element i is kept), packed
  LSB-first as in ``bitpack`` with width 1.
* ``deltas``: the gaps between kept flat indices as fixed-width codes of
  ``width`` bits, with escapes.  With E = 2**width - 1, kept index j is
  preceded by gap g_j = i_j - i_{j-1} - 1 (g_0 = i_0), written as
  floor(g_j / E) codes equal to E ("skip E elements") followed by the code
  g_j mod E.  Decoding walks the codes with a position p = 0: a code E adds E
  to p; any other code c keeps element p + c and sets p to p + c + 1.

Decode: zeros everywhere, then out[i_j] = values[j].

``nm24`` keeps, in every group of 4 consecutive elements along the last axis,
the 2 of largest magnitude.  A group's pattern is one of the six pairs
(0,1) (0,2) (0,3) (1,2) (1,3) (2,3), numbered 0..5; five consecutive groups
form one base-6 number, group 5t + d contributing pattern * 6**d, stored in 13
bits (6**5 = 7776 <= 8192): 2.6 bits per group.  The kept values (2 per group,
lower position first) form part ``values`` of shape (..., last / 2).

>>> x = np.array([[0.1, -3.0, 0.0, 2.0, 5.0, 0.0, 0.0, -1.0]], np.float32)
>>> enc = NM24().encode(x)
>>> enc.parts["values"].tolist()
[[-3.0, 2.0, 5.0, -1.0]]
>>> NM24().decode(enc.parts, enc.params, x.shape, "x").tolist()
[[0.0, -3.0, 0.0, 2.0, 5.0, 0.0, 0.0, -1.0]]
>>> enc = Sparse(density=0.25).encode(x)
>>> enc.params, Sparse(density=0.25).decode(enc.parts, enc.params, x.shape, "x").tolist()
({'count': 2, 'index': 'mask'}, [[0.0, -3.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_int, require_keys
from .core.fields import number, setting
from .core.tensor import Calibration, Encoded, PartSpec, TensorCodec
from .util import bitpack

# ---------------------------------------------------------------- sparse


def _flat_size(shape: tuple[int, ...], where: str) -> int:
    n = math.prod(shape)
    if n < 1:
        raise FormatError(f"{where}: sparse needs a non-empty tensor, found shape {tuple(shape)}")
    return n


def _max_width(n: int) -> int:
    # A gap is below n, so codes wider than n's bit length never help.
    return min(32, max(1, n.bit_length()))


def top_magnitude(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the k largest |x|; among equal magnitudes the lowest indices win."""
    n = flat.size
    if k <= 0:
        return np.zeros(0, np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    mag = np.abs(flat)
    threshold = np.partition(mag, n - k)[n - k]
    keep = mag > threshold
    ties = np.flatnonzero(mag == threshold)[: k - int(keep.sum())]
    keep[ties] = True
    return np.flatnonzero(keep)


def delta_codes(indices: np.ndarray, width: int) -> np.ndarray:
    """The escape-coded gap stream of sorted indices (see the module docstring)."""
    escape = (1 << width) - 1
    gaps = np.diff(indices, prepend=-1) - 1
    per_index = gaps // escape + 1
    codes = np.full(int(per_index.sum()), escape, np.uint32)
    codes[np.cumsum(per_index) - 1] = gaps % escape
    return codes


def _delta_code_count(gaps: np.ndarray, width: int) -> int:
    return int(gaps.size + (gaps // ((1 << width) - 1)).sum())


@dataclass(frozen=True)
class Sparse(TensorCodec):
    """Unstructured magnitude sparsity; see the module docstring."""

    name = "sparse"
    chainable_parts = ("values",)
    calibrations = ("wanda",)
    finite_only = False  # infinities are kept values like any other; NaN has no magnitude order

    density: float = setting(0.1, number(0, 1), "fraction of the elements kept, the largest in magnitude")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return math.prod(shape) >= 1

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        flat = x.reshape(-1)
        if np.isnan(flat).any():
            raise ValueError("sparse cannot encode NaN values")
        n = flat.size
        # At least one value, so the (chainable) values part is never empty.
        k = max(1, min(n, math.floor(self.density * n + 0.5)))
        return self._encode_kept(flat, top_magnitude(flat, k))

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """Wanda: in each row keep the weights of largest |w_ij| * sqrt(E[x_j^2]), the same count per row."""
        if np.isnan(x).any():
            raise ValueError("sparse cannot encode NaN values")
        rows = x.reshape(-1, x.shape[-1])
        score = np.abs(rows) * _input_norms(calibration, rows.shape[1])
        per_row = max(1, min(rows.shape[1], math.floor(self.density * rows.shape[1] + 0.5)))
        kept = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :per_row], axis=1)
        indices = (kept + np.arange(len(rows))[:, None] * rows.shape[1]).reshape(-1)
        return self._encode_kept(x.reshape(-1), indices)

    def _encode_kept(self, flat: np.ndarray, indices: np.ndarray) -> Encoded:
        """The values at the sorted flat ``indices``, with the smaller of the two index structures."""
        n, k = flat.size, indices.size
        gaps = np.diff(indices, prepend=-1) - 1
        # Smallest index structure wins; on a tie the mask, then the narrower code.
        best: tuple[int, dict[str, Any]] = (bitpack.packed_size(n, 1), {"index": "mask"})
        for width in range(1, _max_width(n) + 1):
            codes = _delta_code_count(gaps, width)
            size = bitpack.packed_size(codes, width)
            if size < best[0]:
                best = (size, {"index": "deltas", "width": width, "codes": codes})
        params = {"count": k, **best[1]}
        if params["index"] == "mask":
            mask = np.zeros(n, np.uint8)
            mask[indices] = 1
            # Equal to bitpack.pack(mask, 1) without its 8-bytes-per-bit intermediate.
            index_part = np.packbits(mask, bitorder="little")
        else:
            index_part = bitpack.pack(delta_codes(indices, params["width"]), params["width"])
        return Encoded({"values": flat[indices], params["index"]: index_part}, params)

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """Stored raw: 32*count + 8*ceil(n/8) (mask) or 8*ceil(codes*width/8) (deltas) bits."""
        n = _flat_size(shape, where)
        p = f"{where}.params"
        if not isinstance(params, dict) or params.get("index") not in ("mask", "deltas"):
            raise FormatError(f'{p}.index: expected "mask" or "deltas"')
        if params["index"] == "mask":
            require_keys(params, p, {"count", "index"})
            k = require_int(params["count"], f"{p}.count", 0, n)
            return {"values": PartSpec("F32", (k,)), "mask": PartSpec("U8", (bitpack.packed_size(n, 1),))}
        require_keys(params, p, {"count", "index", "width", "codes"})
        k = require_int(params["count"], f"{p}.count", 0, n)
        width = require_int(params["width"], f"{p}.width", 1, _max_width(n))
        # Every code advances the position by at least one and ends below n.
        codes = require_int(params["codes"], f"{p}.codes", k, n)
        return {"values": PartSpec("F32", (k,)), "deltas": PartSpec("U8", (bitpack.packed_size(codes, width),))}

    def formula(self, params: Any) -> str:
        return f"sparse.{params['index']}"

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        kept = math.prod(self.part_specs(params, shape, self.name)["values"].shape)
        count = params["codes"] if params.get("index") != "mask" else 0
        # the mask as one byte per element (or the delta stream's int64 temporaries), the indices, the result
        return (n if count == 0 else 40 * count) + 16 * kept + 4 * n

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        n = math.prod(shape)
        if params["index"] == "mask":
            indices = mask_indices(parts["mask"], n, where)
        else:
            indices = delta_indices(parts["deltas"], params["width"], params["codes"], n, where)
        values = parts["values"]
        if indices.size != values.size:
            raise FormatError(f"{where}: index structure names {indices.size} elements, values holds {values.size}")
        out = np.zeros(n, np.float32)
        out[indices] = values
        return out.reshape(shape)


def mask_indices(mask: np.ndarray, n: int, where: str) -> np.ndarray:
    bits = np.unpackbits(mask, bitorder="little")
    if bits[n:].any():
        raise FormatError(f"{where}: mask padding bits past element {n} must be zero")
    return np.flatnonzero(bits[:n])


def delta_indices(data: np.ndarray, width: int, count: int, n: int, where: str) -> np.ndarray:
    codes = bitpack.unpack(data, width, count, f"{where} deltas").astype(np.int64)
    escape = (1 << width) - 1
    if count and codes[-1] == escape:
        raise FormatError(f"{where}: delta stream ends with an escape")
    kept = codes != escape
    advance = np.where(kept, codes + 1, escape)
    # Checked in float64 first so the int64 running sum below cannot overflow.
    if float(advance.sum(dtype=np.float64)) > n:
        raise FormatError(f"{where}: delta stream runs past element {n}")
    end = np.cumsum(advance)
    if count and end[-1] > n:
        raise FormatError(f"{where}: delta stream runs past element {n}")
    return end[kept] - 1


def _input_norms(calibration: Calibration, columns: int) -> np.ndarray:
    norms = calibration.input_norms
    if norms.shape != (columns,):
        raise ValueError(f"calibration for {norms.shape[0]} inputs does not fit a last axis of {columns}")
    return norms


# ---------------------------------------------------------------- nm24

# Pattern number -> the two kept positions of a group of four.
PAIRS = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], np.int64)
PATTERN_OF_MASK = {int((1 << i) | (1 << j)): p for p, (i, j) in enumerate(PAIRS)}
GROUPS_PER_CODE = 5
CODE_BITS = 13
CODE_LIMIT = 6**GROUPS_PER_CODE  # 7776
DIGIT_WEIGHTS = 6 ** np.arange(GROUPS_PER_CODE, dtype=np.int64)


def _groups(shape: tuple[int, ...], where: str) -> int:
    if len(shape) < 1 or shape[-1] < 4 or shape[-1] % 4 or math.prod(shape) < 1:
        raise FormatError(
            f"{where}: nm24 needs a last axis that is a positive multiple of 4, found shape {tuple(shape)}"
        )
    return math.prod(shape) // 4


def two_of_four(groups: np.ndarray) -> np.ndarray:
    """Boolean (G, 4): the 2 largest |x| of each group; on ties the lower position wins."""
    mag = np.abs(groups)
    beaten = np.zeros(groups.shape, np.int8)
    for i in range(4):
        for j in range(4):
            if i != j:
                # Position i loses to j if j is larger, or equal and earlier.
                beaten[:, i] += (mag[:, j] > mag[:, i]) | ((mag[:, j] == mag[:, i]) & (j < i))
    return beaten < 2


@dataclass(frozen=True)
class NM24(TensorCodec):
    """2:4 structured sparsity with 13-bit codes for 5 groups; see the module docstring."""

    name = "nm24"
    chainable_parts = ("values",)
    calibrations = ("wanda",)
    finite_only = False  # as sparse: infinities are values, NaN is refused

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1 and shape[-1] >= 4 and shape[-1] % 4 == 0 and math.prod(shape) >= 1

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        if np.isnan(x).any():
            raise ValueError("nm24 cannot encode NaN values")
        return self._encode_kept(x, two_of_four(x.reshape(-1, 4)))

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """Wanda for 2:4: in each group keep the 2 of largest |w_ij| * sqrt(E[x_j^2])."""
        if np.isnan(x).any():
            raise ValueError("nm24 cannot encode NaN values")
        score = np.abs(x.reshape(-1, x.shape[-1])) * _input_norms(calibration, x.shape[-1])
        return self._encode_kept(x, two_of_four(score.reshape(-1, 4)))

    def _encode_kept(self, x: np.ndarray, keep: np.ndarray) -> Encoded:
        """Patterns and values of the kept positions (boolean, one row of 4 per group)."""
        groups = x.reshape(-1, 4)
        bitmask = (keep * np.array([1, 2, 4, 8], np.uint8)).sum(axis=1)
        lookup = np.zeros(16, np.int64)
        for mask, pattern in PATTERN_OF_MASK.items():
            lookup[mask] = pattern
        patterns = lookup[bitmask]
        blocks = -(-patterns.size // GROUPS_PER_CODE)
        padded = np.zeros(blocks * GROUPS_PER_CODE, np.int64)
        padded[: patterns.size] = patterns
        codes = padded.reshape(blocks, GROUPS_PER_CODE) @ DIGIT_WEIGHTS
        values = groups[keep].reshape(*x.shape[:-1], x.shape[-1] // 2)
        return Encoded({"patterns": bitpack.pack(codes, CODE_BITS), "values": values}, {})

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """Stored raw: 8*ceil(13*ceil(G/5)/8) + 32*2G bits for G = size/4 groups."""
        require_keys(params, f"{where}.params", set())
        groups = _groups(shape, where)
        blocks = -(-groups // GROUPS_PER_CODE)
        return {
            "patterns": PartSpec("U8", (bitpack.packed_size(blocks, CODE_BITS),)),
            "values": PartSpec("F32", (*shape[:-1], shape[-1] // 2)),
        }

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        # int64 pattern digits (two temporaries) and element pairs per group of 4, the result
        return 8 * (n // 4) * 5 + 4 * n

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        groups = _groups(shape, where)
        blocks = -(-groups // GROUPS_PER_CODE)
        codes = bitpack.unpack(parts["patterns"], CODE_BITS, blocks, f"{where} patterns").astype(np.int64)
        if codes.size and int(codes.max()) >= CODE_LIMIT:
            raise FormatError(f"{where}: pattern code {int(codes.max())} is not below 6**5 = {CODE_LIMIT}")
        digits = (codes[:, None] // DIGIT_WEIGHTS % 6).reshape(-1)
        if digits[groups:].any():
            raise FormatError(f"{where}: padding groups of the last pattern code must have pattern 0")
        out = np.zeros((groups, 4), np.float32)
        np.put_along_axis(out, PAIRS[digits[:groups]], parts["values"].reshape(groups, 2), axis=1)
        return out.reshape(shape)
