"""The contract of tensor codecs: lossy (or structural) transforms of a whole tensor.

A tensor codec turns a float32 tensor into named *parts* (small numpy arrays:
packed codes, scales, factors, indices) plus a few JSON parameters, and back.
Each part is stored by the container like a tensor of its own: losslessly by
default, or by another tensor codec named in the chain (for example the
factors of a low-rank codec quantized to 4 bits).  This module knows nothing
of the container; the container knows nothing of codec math.

A codec must be able to say, from its parameters and the tensor's shape alone,
exactly which parts it expects (``part_specs``); the reader checks the stored
parts against that before decoding, so a hostile file cannot make ``decode``
index out of bounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import FormatError


@dataclass(frozen=True)
class PartSpec:
    """The dtype (an rbe dtype name such as "U8", "F16", "F32") and shape of a part."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class Encoded:
    """What ``encode`` returns: the parts and the per-tensor parameters."""

    parts: dict[str, np.ndarray]
    params: dict[str, Any]


class TensorCodec(ABC):
    """float32 tensor -> parts + params -> float32 tensor."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    must_understand: ClassVar[bool] = True
    # Parts that may be handed to another codec in a chain (the rest stay lossless).
    chainable_parts: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The JSON-able configuration (everything but the per-tensor params)."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any], where: str) -> "TensorCodec":
        """Builds the codec from a manifest configuration, validating every field."""

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether this codec can encode a tensor of this shape (recipes skip others)."""
        return True

    def references(self) -> list[str]:
        """Names of other tensors this codec reads (e.g. a shared base vector)."""
        return []

    @abstractmethod
    def encode(self, x: np.ndarray, refs: dict[str, np.ndarray] | None = None) -> Encoded:
        """Encodes a float32 array; ``refs`` holds the decoded referenced tensors."""

    @abstractmethod
    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """Validates ``params`` for a tensor of ``shape``; returns the parts decode needs."""

    @abstractmethod
    def decode(self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str,
               refs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Rebuilds the float32 tensor from parts already checked against part_specs.

        Must raise FormatError (never another exception) when the values in the
        parts are inconsistent, e.g. an index past the end of a codebook.
        """

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "must_understand": self.must_understand, "config": self.config()}


def check_index_range(values: np.ndarray, limit: int, where: str) -> None:
    """Indices read from a file must lie in [0, limit) before they index anything."""
    if values.size and int(values.max()) >= limit:
        raise FormatError(f"{where}: index {int(values.max())} out of range [0, {limit})")
