"""What every rewriter shares: the weight's view through the table, and the rewrite it returns.

Each weight's initializers are named ``rbe:<weight>:<part>`` (``rbe:`` is reserved: no
initializer of a converted model uses it); the nodes reading them, one set per
consuming node, are named and connected through ``rbe:<node output>:<step>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rbeformat import Reader
from rbeformat.manifest import Transform

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LookThrough:
    """A table row for a codec that only rearranges a part: the weight is that part's codec, read so."""

    part: str  # the part whose own codec is looked up in the table
    transposed: bool  # the tensor is the part transposed


@dataclass(frozen=True)
class CodecView:
    """The transform of a weight's mapped codec: the tensor's own, or a part's through a ``LookThrough``."""

    transform: Transform
    prefix: str  # "" for the tensor's own transform, else "<part>." (as ``Reader.get_part`` names parts)
    transposed: bool  # the tensor is the transform's output transposed
    formula: str  # the decode formula the transform's codec declares (the table's key)


# (reader, tensor name) -> the tensor's view when the same rewriter maps it, else None
Peers = Callable[[Reader, str], "CodecView | None"]


@dataclass
class Rewrite:
    """What replaces one weight: new initializers, and per consuming node the nodes replacing it."""

    form: str
    initializers: list
    nodes: dict[int, list]  # position of the consuming node -> its replacement
    shared: list = field(default_factory=list)  # initializers other weights may read too, reported apart


def formula_of(transform: Transform) -> str:
    """The decode formula the transform's codec declares for its params (``TensorCodec.formula``)."""
    return transform.codec.formula(transform.params)


def part_shape(r: Reader, name: str, prefix: str) -> tuple[int, int]:
    """The shape of what ``prefix`` ("" or "<part>.") reaches in tensor ``name``."""
    entry = r.stored_entry(name)
    if not prefix:
        return tuple(entry.shape)
    return tuple(entry.transform.parts[prefix.rstrip(".")].shape)
