"""Codec chains written as text, e.g. on the command line.

A chain names a tensor codec, its settings, and, for the parts the codec lets
another codec take over, the chain that encodes that part::

    gquant(bits=4, group=32)
    lowrank(rank=64, A=gquant(bits=4, group=64), B=gquant(bits=4, group=64),
            residual=nm24(values=gquant(bits=8, group=0)))
    lossless

Grammar: ``chain := NAME [ "(" [ item ("," item)* ] ")" ]``, ``item := KEY "=" value``,
``value := chain | NUMBER | WORD | "quoted string" | true | false``.  ``lossless``
(byteplane) is the chain of every part not named.  A chain is checked
whole when it is built (``Chain.validate``), before anything is encoded.

>>> from rbeformat.codecs.registry import TENSOR_CODECS
>>> parse_chain("gquant(bits=4, group=64)", TENSOR_CODECS).text()
'gquant(bits=4, group=64, mode=sym, scale_dtype=F16)'
>>> parse_chain("gquant(bits=4, grop=64)", TENSOR_CODECS)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rbeformat.errors.UsageError: codec chain 'gquant(bits=4, grop=64)': gquant has no setting 'grop'; valid: bits (code bits per value), group ...
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .codecs.core.tensor import TensorCodec
from .errors import UsageError

LOSSLESS = "lossless"
_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)"
    r'|(?P<str>"[^"]*")|(?P<punct>[(),=]))'
)


@dataclass
class Chain:
    """A tensor codec and the chains of its parts (None codec = lossless)."""

    codec: TensorCodec | None
    parts: dict[str, Chain] = field(default_factory=dict)

    @property
    def lossless(self) -> bool:
        return self.codec is None

    def text(self) -> str:
        if self.codec is None:
            return LOSSLESS
        items = [f"{k}={_format(v)}" for k, v in sorted(_given_settings(self.codec).items()) if k not in self.parts]
        items += [f"{k}={c.text()}" for k, c in sorted(self.parts.items())]
        return f"{self.codec.name}({', '.join(items)})"

    def validate(self, where: str = "codec chain", top: bool = True) -> Chain:
        """Checks the whole chain before any encoding: parts exist and may be chained,
        and codecs that share state across tensors stand only at the top."""
        if self.codec is None:
            if self.parts:
                raise UsageError(f"{where}: {LOSSLESS} has no parts to chain")
            return self
        codec = self.codec
        if not top and codec.shares_state():
            raise UsageError(f"{where}: {codec.name} shares state across tensors and cannot encode a part")
        extra = set(self.parts) - set(codec.chainable())
        if extra:
            allowed = ", ".join(codec.chainable()) or "none"
            raise UsageError(
                f"{where}: {codec.name} cannot chain part(s) {sorted(extra)} in this configuration "
                f"(chainable: {allowed})"
            )
        for name, sub in self.parts.items():
            sub.validate(f"{where} part {name}", top=False)
        return self


def _given_settings(codec: TensorCodec) -> dict[str, Any]:
    """The stored config plus encoder settings that differ from their defaults."""
    out = codec.config()
    for f in dataclasses.fields(codec):
        value = getattr(codec, f.name)
        if f.name not in out and value is not None and value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(_format, value)) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", value):
        return f'"{value}"'
    return str(value)


def _tokens(text: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise UsageError(f"codec chain {text!r}: cannot read from column {pos + 1}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse_chain(text: str, registry: dict[str, type[TensorCodec]]) -> Chain:
    """Parses chain text against the tensor codecs in ``registry``; UsageError on any mistake."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"codec chain {text!r}: empty; name a codec, e.g. 'gquant(bits=4, group=64)', or '{LOSSLESS}'")
    tokens = _tokens(text)
    chain, pos = _parse(tokens, 0, registry, text)
    if pos != len(tokens):
        raise UsageError(f"codec chain {text!r}: unexpected {tokens[pos][1]!r}")
    return chain.validate(f"codec chain {text!r}")


def _parse(tokens, pos, registry, text) -> tuple[Chain, int]:
    if pos >= len(tokens) or tokens[pos][0] != "name":
        raise UsageError(f"codec chain {text!r}: expected a codec name")
    name = tokens[pos][1]
    pos += 1
    if name == LOSSLESS:
        return Chain(None), pos
    cls = registry.get(name)
    if cls is None:
        raise UsageError(
            f"codec chain {text!r}: unknown codec {name!r} (known: {LOSSLESS}, {', '.join(sorted(registry))})"
        )
    settings: dict[str, Any] = {}
    parts: dict[str, Chain] = {}
    if pos < len(tokens) and tokens[pos][1] == "(":
        pos += 1
        while pos < len(tokens) and tokens[pos][1] != ")":
            if tokens[pos][0] != "name" or pos + 2 >= len(tokens) or tokens[pos + 1][1] != "=":
                raise UsageError(f"codec chain {text!r}: expected key=value inside {name}(...)")
            key = tokens[pos][1]
            pos += 2
            _check_key(cls, key, settings, parts, text)
            if key in cls.chainable_parts and tokens[pos][1] not in ("true", "false"):
                parts[key], pos = _parse(tokens, pos, registry, text)
            else:
                settings[key], pos = _value(tokens, pos, text)
            if pos < len(tokens) and tokens[pos][1] == ",":
                pos += 1
        if pos >= len(tokens):
            raise UsageError(f"codec chain {text!r}: missing ')'")
        pos += 1
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in parts:  # a chain for an optional part (lowrank's residual) switches the part on
        if key not in settings and key in names and names[key].type in (bool, "bool"):
            settings[key] = True
    try:
        codec = cls(**settings)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"codec chain {text!r}: {exc}") from None
    return Chain(codec, parts), pos


def _check_key(cls: type[TensorCodec], key: str, settings: dict, parts: dict, text: str) -> None:
    """Refuses unknown and repeated keys, listing what the codec takes."""
    valid = {f.name for f in dataclasses.fields(cls)} | set(cls.chainable_parts)
    if key not in valid:
        raise UsageError(
            f"codec chain {text!r}: {cls.name} has no setting {key!r}; valid: {cls.settings_help()}"
            f"; parts: {', '.join(cls.chainable_parts) or 'none'}"
        )
    if key in settings or key in parts:
        raise UsageError(f"codec chain {text!r}: {cls.name}: {key!r} is given twice")


def _value(tokens, pos, text) -> tuple[Any, int]:
    kind, raw = tokens[pos]
    if kind == "num":
        return (float(raw) if any(c in raw for c in ".eE") else int(raw)), pos + 1
    if kind == "str":
        return raw[1:-1], pos + 1
    if kind == "name":
        return {"true": True, "false": False}.get(raw, raw), pos + 1
    raise UsageError(f"codec chain {text!r}: unexpected {raw!r}")
