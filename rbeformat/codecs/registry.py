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
from .tensor import TensorCodec
from .zstd import Zstd

CODECS: dict[str, type[Codec]] = {cls.name: cls for cls in (Byteplane, Raw, Zstd)}
RESERVED_NAMES: frozenset[str] = frozenset()


def _tensor_codecs() -> dict[str, type[TensorCodec]]:
    from .gquant import GroupQuant
    from .lowrank import LowRank
    from .normdelta import NormDelta
    from .posemb import PositionDCT, Sinusoidal
    from .sparse import NM24, Sparse

    classes = [GroupQuant, LowRank, NormDelta, PositionDCT, Sinusoidal, Sparse, NM24]
    for module, cls_name in (("palette", "Palette"), ("vq", "VectorCodebook"), ("seed", "SeedCodec")):
        try:
            classes.append(getattr(__import__(f"rbeformat.codecs.{module}", fromlist=[cls_name]), cls_name))
        except (ImportError, AttributeError):
            pass
    return {cls.name: cls for cls in classes}


TENSOR_CODECS: dict[str, type[TensorCodec]] = _tensor_codecs()


def tensor_codec_from_record(record: Any, where: str) -> TensorCodec:
    """Builds a tensor codec from its manifest record; unknown names are refused."""
    require_keys(record, where, {"name", "must_understand", "config"})
    name = record["name"]
    if not isinstance(name, str) or not isinstance(record["config"], dict):
        raise FormatError(f"{where}: expected a codec name and a config object")
    if not isinstance(record["must_understand"], bool):
        raise FormatError(f"{where}.must_understand: expected true or false")
    cls = TENSOR_CODECS.get(name)
    if cls is None:
        raise UnsupportedError(f"{where}: tensor codec {name!r:.40} is not known to this reader "
                               f"(known: {sorted(TENSOR_CODECS)}); upgrade rbe to read this tensor")
    try:
        return cls.from_config(record["config"], f"{where}.config")
    except FormatError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise FormatError(f"{where}.config: invalid ({type(exc).__name__}: {exc})") from None


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
