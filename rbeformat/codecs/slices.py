"""Structured sparsity by whole slices: ``slices``.

A tensor whose slices along one axis (``axis``) are partly all zero, as after
pruning whole rows, columns or attention heads, is stored as which slices are
kept and the kept slices themselves:

* ``mask``: bit i set when slice i along ``axis`` is kept, packed LSB-first
  as in ``bitpack`` with width 1; the padding bits of the last byte are zero.
* ``values``: the kept slices in order, float32, of the tensor's shape with
  ``shape[axis]`` replaced by their number ``count`` (a param).  A chain may
  encode it further (for example quantize it).

Decode: zeros of the tensor's shape, then the kept slices filled in from
``values`` along ``axis``.  The pruning decision is made before encoding:
the encoder keeps exactly the slices that are not all zero.

>>> x = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, -4.0]], np.float32)
>>> enc = Slices(axis=1).encode(x)
>>> enc.params, enc.parts["mask"].tolist(), enc.parts["values"].tolist()
({'count': 2}, [5], [[1.0, 2.0], [3.0, -4.0]])
>>> Slices(axis=1).decode(enc.parts, enc.params, x.shape, "x").tolist()
[[1.0, 0.0, 2.0], [3.0, 0.0, -4.0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from ..spec import MAX_NDIM
from .core.base import require_int, require_keys
from .core.fields import integer, setting
from .core.tensor import Calibration, Encoded, PartSpec, TensorCodec
from .util import bitpack


def kept_slices(x: np.ndarray, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` with at least one element that is not zero (NaN counts)."""
    others = tuple(a for a in range(x.ndim) if a != axis)
    return np.flatnonzero((x != 0).any(axis=others))


def mask_indices(mask: np.ndarray, n: int, where: str) -> np.ndarray:
    """The kept slice indices a packed mask of ``n`` bits names; set padding bits are a FormatError."""
    bits = np.unpackbits(mask, bitorder="little")
    if bits[n:].any():
        raise FormatError(f"{where}: mask padding bits past slice {n} must be zero")
    return np.flatnonzero(bits[:n])


def _index(ndim: int, axis: int, kept: np.ndarray) -> tuple:
    """The numpy index that selects slices ``kept`` along ``axis``."""
    index: list[Any] = [slice(None)] * ndim
    index[axis] = kept
    return tuple(index)


@dataclass(frozen=True)
class Slices(TensorCodec):
    """Whole slices along one axis kept or dropped; see the module docstring."""

    name = "slices"
    chainable_parts = ("values",)
    # Not lossless: a dropped slice of -0.0 decodes as +0.0 (every other value is exact).
    # It chooses nothing itself; calibration is handed on to the chain of ``values``.
    calibrations = ("gptq", "wanda")
    finite_only = False  # values are copied; NaN and infinities are kept like any non-zero value

    axis: int = setting(0, integer(0, MAX_NDIM - 1), "the axis along which whole slices are kept or dropped")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) > self.axis and math.prod(shape) >= 1

    def _slice_count(self, shape: tuple[int, ...], where: str) -> int:
        if not self.accepts(shape):
            raise FormatError(
                f"{where}: slices(axis={self.axis}) needs a non-empty tensor of more than "
                f"{self.axis} dimensions, found shape {tuple(shape)}"
            )
        return shape[self.axis]

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """Stored raw: 8*ceil(n/8) + 32*count*(size/n) bits, n = shape[axis]."""
        n = self._slice_count(shape, where)
        require_keys(params, f"{where}.params", {"count"})
        k = require_int(params["count"], f"{where}.params.count", 0, n)
        values = shape[: self.axis] + (k,) + shape[self.axis + 1 :]
        return {"mask": PartSpec("U8", (bitpack.packed_size(n, 1),)), "values": PartSpec("F32", values)}

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        kept = kept_slices(x, self.axis)
        if kept.size == 0:  # keep one slice so that the chainable values part is never empty
            kept = np.zeros(1, np.int64)
        bits = np.zeros(x.shape[self.axis], np.uint8)
        bits[kept] = 1
        values = np.ascontiguousarray(x[_index(x.ndim, self.axis, kept)])
        return Encoded({"mask": np.packbits(bits, bitorder="little"), "values": values}, {"count": int(kept.size)})

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """The same parts: which slices are kept was decided before encoding.

        The calibration only has to fit, since part_calibration hands it on.
        """
        h = calibration.hessian
        if x.ndim == 2 and h.shape != (x.shape[1], x.shape[1]):
            raise ValueError(f"calibration of shape {h.shape} does not fit a matrix of {x.shape[1]} inputs")
        return self.encode_array(x, refs)

    def part_calibration(self, part: str, calibration: Calibration, encoded: Encoded) -> Calibration | None:
        """For the values of a Linear weight (out, in): the input Hessian of the kept inputs.

        Dropping rows (axis 0) leaves every input, so the Hessian is unchanged;
        dropping input columns (axis 1) leaves the kept inputs' block of it.
        """
        values = encoded.parts.get("values")
        if part != "values" or values is None or values.ndim != 2 or self.axis > 1:
            return None
        if self.axis == 0:
            return calibration
        n = calibration.hessian.shape[0]
        mask = encoded.parts["mask"]
        if mask.size != bitpack.packed_size(n, 1):
            raise ValueError(f"calibration for {n} inputs does not fit a mask of {mask.size} bytes")
        kept = mask_indices(mask, n, "calibration")
        if calibration.hessian.shape != (n, n) or kept.size != values.shape[1]:
            raise ValueError(f"calibration for {n} inputs does not fit the {values.shape[1]} kept columns")
        return Calibration(calibration.method, calibration.hessian[np.ix_(kept, kept)])

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        # the mask's bits and kept indices, the result
        return 9 * shape[self.axis] + 4 * math.prod(shape)

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        kept = mask_indices(parts["mask"], shape[self.axis], where)
        if kept.size != params["count"]:
            raise FormatError(f"{where}: mask keeps {kept.size} slices, params.count says {params['count']}")
        out = np.zeros(shape, np.float32)
        out[_index(len(shape), self.axis, kept)] = parts["values"]
        return out
