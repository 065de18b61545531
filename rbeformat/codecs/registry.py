"""Permanent codec names.

A name, once published, always means the same transform.  A retired codec keeps
its name reserved here so that it is never reused for something else.
"""

from __future__ import annotations

from typing import Any

from ..errors import FormatError, UnsupportedError
from .base import Codec, require_keys
from .byteplane import Byteplane
from .raw import Raw
from .zstd import Zstd

CODECS: dict[str, type[Codec]] = {cls.name: cls for cls in (Byteplane, Raw, Zstd)}
RESERVED_NAMES: frozenset[str] = frozenset()


def codec_from_record(record: Any, where: str) -> Codec:
    """Builds a codec from its manifest record ``{name, must_understand, config}``."""
    require_keys(record, where, {"name", "must_understand", "config"})
    name = record["name"]
    if not isinstance(name, str):
        raise FormatError(f"{where}.name: expected a string, found {type(name).__name__}")
    if not isinstance(record["must_understand"], bool):
        raise FormatError(f"{where}.must_understand: expected true or false")
    cls = CODECS.get(name)
    if cls is None:
        raise UnsupportedError(
            f"{where}: codec {name!r:.40} is not known to this reader (known: {sorted(CODECS)});"
            " upgrade rbe to read this tensor"
        )
    if not isinstance(record["config"], dict):
        raise FormatError(f"{where}.config: expected an object")
    return cls.from_config(record["config"], f"{where}.config")
