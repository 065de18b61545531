"""Permanent codec names.

A name, once published, always means the same transform.  A retired codec keeps
its name reserved here so that it is never reused for something else.

Blob codecs are listed here by hand.  Tensor codecs register themselves when
their class is defined (``TensorCodec.__init_subclass__``), and this module
imports every plain module of the ``rbeformat.codecs`` package, so a new codec is
one new file there.  An import that fails fails loudly: a codec never silently
vanishes from a reader.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..errors import FormatError, UnsupportedError
from .blob.byteplane import Byteplane
from .blob.raw import Raw
from .blob.zstd import Zstd
from .core.base import Codec, require_keys
from .core.tensor import REGISTERED, TensorCodec

CODECS: dict[str, type[Codec]] = {cls.name: cls for cls in (Byteplane, Raw, Zstd)}
# Names of retired codecs, in either registry: never reused, refused when read.
RESERVED_NAMES: frozenset[str] = frozenset()


def _import_codec_modules() -> None:
    package = importlib.import_module(__package__)
    # Tensor codecs are the plain modules of the package; its sub-packages hold the contracts
    # (core), the helpers (util, encoders) and the blob codecs, listed above by hand.
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg):
        if not module.startswith("_") and module != "registry":
            importlib.import_module(f"{__package__}.{module}")


def _tensor_codecs() -> dict[str, type[TensorCodec]]:
    _import_codec_modules()
    clashes = (set(REGISTERED) | set(CODECS)) & RESERVED_NAMES
    if clashes or set(REGISTERED) & set(CODECS):
        raise RuntimeError(f"codec names reused or reserved: {sorted(clashes | (set(REGISTERED) & set(CODECS)))}")
    return dict(sorted(REGISTERED.items()))


TENSOR_CODECS: dict[str, type[TensorCodec]] = _tensor_codecs()


def _known(record: Any, where: str, registry: dict[str, type]) -> type:
    require_keys(record, where, {"name", "must_understand", "config"})
    name = record["name"]
    if not isinstance(name, str):
        raise FormatError(f"{where}.name: expected a string, found {type(name).__name__}")
    if not isinstance(record["must_understand"], bool):
        raise FormatError(f"{where}.must_understand: expected true or false")
    if not isinstance(record["config"], dict):
        raise FormatError(f"{where}.config: expected an object")
    if name in RESERVED_NAMES:
        raise UnsupportedError(f"{where}: codec {name!r:.40} is retired; no current rbe reads it")
    cls = registry.get(name)
    if cls is None:
        kind = "tensor codec" if registry is TENSOR_CODECS else "codec"
        raise UnsupportedError(
            f"{where}: {kind} {name!r:.40} is not known to this reader "
            f"(known: {sorted(registry)}); upgrade rbe to read this tensor"
        )
    return cls


def tensor_codec_from_record(record: Any, where: str) -> TensorCodec:
    """Builds a tensor codec from its manifest record; unknown names are refused."""
    cls = _known(record, where, TENSOR_CODECS)
    return cls.from_config(record["config"], f"{where}.config")


def codec_from_record(record: Any, where: str) -> Codec:
    """Builds a codec from its manifest record ``{name, must_understand, config}``."""
    cls = _known(record, where, CODECS)
    return cls.from_config(record["config"], f"{where}.config")
