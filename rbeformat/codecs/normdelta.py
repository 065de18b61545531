"""The ``normdelta`` tensor codec: a vector stored as its difference from a shared base.

The LayerNorm/RMSNorm weights of the layers of a model resemble one another.
One base vector (an ordinary tensor of the same file, named by ``base``) is
stored once and each layer stores only its delta from it:

* ``mode: "bits"`` (lossless): the delta of the float32 bit patterns, as
  32-bit two's complement integers with wrap-around,
  ``delta = int32(uint32(x) - uint32(base))``; decode
  ``x = float32(uint32(base) + uint32(delta))`` (mod 2**32).  Every value,
  NaN payloads and -0.0 included, comes back bit for bit.
* ``mode: "float"``: ``delta = x - base`` in float32, a chainable part a chain
  can quantize far more finely than x itself (the delta is small).  Decode:
  ``x^ = base + delta`` in float32.

The codec declares the base in ``references()``; the container decodes the
base first and passes it in ``refs``.  ``shared_base`` picks a base for a set
of vectors.

>>> base = np.array([1.0, 0.5, -2.0], np.float32)
>>> x = np.array([1.0, 0.5000001, -2.5], np.float32)
>>> codec = NormDelta("ln.base", "bits")
>>> enc = codec.encode(x, {"ln.base": base})
>>> enc.parts["delta"].tolist()
[0, 2, 2097152]
>>> codec.decode(enc.parts, enc.params, x.shape, "x", {"ln.base": base}).tobytes() == x.tobytes()
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_keys
from .core.fields import choice, setting, tensor_name
from .core.tensor import Encoded, PartSpec, TensorCodec

MODES = ("bits", "float")
# Internal tensors holding shared bases are named rbe:base/<dtype>/<shape>.
BASE_PREFIX = "rbe:base/"


def shared_base(vectors: list[np.ndarray], statistic: str = "median") -> np.ndarray:
    """A base for ``vectors`` (all of one shape), element by element.

    ``"median"`` (the default, best for mode "bits") takes the lower median, a
    value one of the vectors actually holds, so that vector's delta is exactly
    0 there and the others' are small.  ``"mean"`` minimises the squared float
    deltas, for mode "float".
    """
    stack = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
    if statistic == "mean":
        return stack.mean(axis=0, dtype=np.float64).astype(np.float32)
    if statistic != "median":
        raise ValueError("statistic must be 'median' or 'mean'")
    return np.sort(stack, axis=0)[(len(stack) - 1) // 2]


@dataclass(frozen=True)
class NormDelta(TensorCodec):
    """x = base + delta, exactly on the bit patterns or approximately in float32."""

    name = "normdelta"
    # The parts that may be chained in some mode (for parsers that look at the
    # class); chainable() narrows this to () in mode "bits".
    chainable_parts = ("delta",)
    finite_only = False  # mode bits keeps every bit pattern, NaN payloads included

    # In a recipe the base is not known yet: the converter computes it and names it.
    PENDING_BASE = "rbe:base/pending"

    base: str = setting(PENDING_BASE, tensor_name, "the internal tensor holding the shared base")
    mode: str = setting("bits", choice(*MODES), "bits: exact delta of the bit patterns; float: x - base")

    def is_lossless(self) -> bool:
        return self.mode == "bits"

    def chainable(self) -> tuple[str, ...]:
        return ("delta",) if self.mode == "float" else ()

    def formula(self, params: Any) -> str:
        return f"normdelta.{self.mode}"

    def references(self) -> list[str]:
        return [self.base]

    # Norm vectors of one dtype and shape share one base, whatever their mode.
    def shared_group(self, dtype: str, shape: tuple[int, ...]) -> tuple:
        return (dtype, tuple(shape))

    def build_shared(self, members: list[np.ndarray], dtype: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {f"{BASE_PREFIX}{dtype}/{'x'.join(map(str, shape))}": shared_base(members)}

    def bind_shared(self, names: list[str]) -> NormDelta:
        (base,) = names
        return self.with_settings(base=base)

    def _base(self, refs: dict[str, np.ndarray] | None, shape: tuple[int, ...], where: str) -> np.ndarray:
        base = (refs or {}).get(self.base)
        if base is None:
            raise FormatError(f"{where}: base tensor {self.base!r} was not provided")
        base = np.asarray(base)
        if base.shape != tuple(shape):
            raise FormatError(f"{where}: base {self.base!r} has shape {base.shape}, the tensor {tuple(shape)}")
        if base.dtype != np.float32:
            raise FormatError(f"{where}: base {self.base!r} must decode to float32, found {base.dtype}")
        return np.require(base, requirements="C")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return True

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        x = np.require(x, np.float32, "C")  # (ascontiguousarray would make 0-d arrays 1-d)
        base = self._base(refs, x.shape, "normdelta")
        if self.mode == "bits":
            delta = (x.view(np.uint32) - base.view(np.uint32)).view(np.int32)  # wraps mod 2**32
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                delta = x - base
        return Encoded({"delta": np.asarray(delta).reshape(x.shape)}, {})

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """32 bits per element (the base is a tensor of its own and counted there)."""
        require_keys(params, f"{where}.params", set())
        return {"delta": PartSpec("I32" if self.mode == "bits" else "F32", tuple(shape))}

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        return 4 * math.prod(shape)  # base + delta (the base itself is a reference the reader decodes)

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        base = self._base(refs, shape, where)
        delta = np.require(parts["delta"], requirements="C")
        if self.mode == "bits":
            out = (base.view(np.uint32) + delta.view(np.uint32)).view(np.float32)
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # inf - inf etc. are the data's
                out = base + delta
        return np.asarray(out).reshape(shape)  # 0-d arithmetic gives numpy scalars
