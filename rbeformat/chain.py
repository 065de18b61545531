"""Codec chains written as text, e.g. on the command line.

A chain names a tensor codec, its settings, and, for the parts the codec lets
another codec take over, the chain that encodes that part::

    gquant(bits=4, group=32)
    lowrank(rank=64, A=gquant(bits=4, group=64), B=gquant(bits=4, group=64),
            residual=nm24(values=gquant(bits=8, group=0)))
    lossless

Grammar: ``chain := NAME [ "(" [ item ("," item)* ] ")" ]``, ``item := KEY "=" value``,
``value := chain | NUMBER | WORD | "quoted string" | true | false``.  ``lossless``
(byteplane) is the chain of every part not named.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from .codecs.tensor import TensorCodec
from .errors import InputError

LOSSLESS = "lossless"
_TOKEN = re.compile(r'\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)'
                    r'|(?P<str>"[^"]*")|(?P<punct>[(),=]))')


@dataclass
class Chain:
    """A tensor codec and the chains of its parts (None codec = lossless)."""

    codec: TensorCodec | None
    parts: dict[str, "Chain"] = field(default_factory=dict)

    @property
    def lossless(self) -> bool:
        return self.codec is None

    def text(self) -> str:
        if self.codec is None:
            return LOSSLESS
        items = [f"{k}={_format(v)}" for k, v in sorted(self.codec.config().items()) if k not in self.parts]
        items += [f"{k}={c.text()}" for k, c in sorted(self.parts.items())]
        return f"{self.codec.name}({', '.join(items)})"


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", value):
        return f'"{value}"'
    return str(value)


def _tokens(text: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise InputError(f"codec chain {text!r}: cannot read from column {pos + 1}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse_chain(text: str, registry: dict[str, type[TensorCodec]]) -> Chain:
    """Parses chain text against the tensor codecs in ``registry``."""
    tokens = _tokens(text)
    chain, pos = _parse(tokens, 0, registry, text)
    if pos != len(tokens):
        raise InputError(f"codec chain {text!r}: unexpected {tokens[pos][1]!r}")
    return chain


def _parse(tokens, pos, registry, text) -> tuple[Chain, int]:
    if pos >= len(tokens) or tokens[pos][0] != "name":
        raise InputError(f"codec chain {text!r}: expected a codec name")
    name = tokens[pos][1]
    pos += 1
    if name == LOSSLESS:
        return Chain(None), pos
    cls = registry.get(name)
    if cls is None:
        raise InputError(f"codec chain {text!r}: unknown codec {name!r} (known: {LOSSLESS}, {', '.join(sorted(registry))})")
    settings: dict[str, Any] = {}
    parts: dict[str, Chain] = {}
    if pos < len(tokens) and tokens[pos][1] == "(":
        pos += 1
        while pos < len(tokens) and tokens[pos][1] != ")":
            if tokens[pos][0] != "name" or pos + 2 >= len(tokens) or tokens[pos + 1][1] != "=":
                raise InputError(f"codec chain {text!r}: expected key=value inside {name}(...)")
            key = tokens[pos][1]
            pos += 2
            if key in cls.chainable_parts:
                parts[key], pos = _parse(tokens, pos, registry, text)
            else:
                settings[key], pos = _value(tokens, pos, text)
            if pos < len(tokens) and tokens[pos][1] == ",":
                pos += 1
        if pos >= len(tokens):
            raise InputError(f"codec chain {text!r}: missing ')'")
        pos += 1
    for key in parts:  # a chain for an optional part (lowrank's residual) switches the part on
        if key not in settings and key in inspect.signature(cls.__init__).parameters:
            settings[key] = True
    try:
        codec = cls(**settings)
    except (TypeError, ValueError) as exc:
        raise InputError(f"codec chain {text!r}: {name}: {exc}") from None
    return Chain(codec, parts), pos


def _value(tokens, pos, text) -> tuple[Any, int]:
    kind, raw = tokens[pos]
    if kind == "num":
        return (float(raw) if any(c in raw for c in ".eE") else int(raw)), pos + 1
    if kind == "str":
        return raw[1:-1], pos + 1
    if kind == "name":
        return {"true": True, "false": False}.get(raw, raw), pos + 1
    raise InputError(f"codec chain {text!r}: unexpected {raw!r}")
