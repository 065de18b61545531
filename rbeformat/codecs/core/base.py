"""The contract every codec follows.

A codec turns a run of tensor elements (a chunk) into bytes and back.  The
container stores those bytes as one checksummed section per chunk and keeps the
codec's small per-chunk parameters in the manifest; it knows nothing else of the
codec.  Codecs are immutable: their configuration is fixed at construction and
round-trips through JSON as ``{"name", "must_understand", "config"}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ...errors import FormatError
from ...spec import DType


class Codec(ABC):
    """Encodes chunks of elements to bytes, and decodes them back."""

    name: ClassVar[str]
    lossless: ClassVar[bool]
    # A reader that does not know the codec must refuse the tensor.
    must_understand: ClassVar[bool] = True

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The JSON-able configuration a decoder needs."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any], where: str) -> Codec:
        """Builds the codec from a manifest configuration, validating every field."""

    def for_dtype(self, dtype: DType, items: int | None = None) -> Codec:
        """The codec as configured for a tensor of ``dtype`` and ``items`` elements
        (None: unknown); most codecs return themselves."""
        return self

    @abstractmethod
    def chunk_items(self, dtype: DType) -> int:
        """How many elements go into one chunk (the last chunk may hold fewer)."""

    @abstractmethod
    def encode_chunk(self, data: memoryview, dtype: DType) -> tuple[list[bytes], dict[str, Any]]:
        """Encodes the little-endian bytes of some elements.

        Returns the payload (a list of byte strings written back to back) and the
        chunk's parameters for the manifest.
        """

    @abstractmethod
    def decode_chunk(self, payload: memoryview, params: Any, dtype: DType, out: memoryview, where: str) -> None:
        """Decodes one chunk into ``out`` (exactly items * itemsize bytes).

        Must validate ``params`` against ``payload`` before trusting either and
        raise FormatError, never anything else, on bad data.
        """

    def describe(self) -> dict[str, Any]:
        """The codec's manifest record."""
        return {"name": self.name, "must_understand": self.must_understand, "config": self.config()}


def require_int(value: Any, where: str, low: int, high: int) -> int:
    """Checks that a manifest value is an int in [low, high]."""
    if type(value) is not int or not low <= value <= high:
        raise FormatError(f"{where}: expected an integer in [{low}, {high}], found {value!r:.80}")
    return value


def require_keys(obj: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    """Checks that a manifest value is an object with exactly these keys."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected an object, found {type(obj).__name__}")
    missing = required - obj.keys()
    if missing:
        raise FormatError(f"{where}: missing key(s) {sorted(missing)}")
    extra = obj.keys() - required - optional
    if extra:
        raise FormatError(f"{where}: unexpected key(s) {sorted(extra)[:5]}")
    return obj
