"""Which codec chain each tensor gets: ``--codec SPEC`` or a ``--recipe FILE``.

A recipe is a TOML file of rules tried in order; the first rule whose pattern
matches a tensor's name (shell-style, ``fnmatch``) and whose optional ``ndim``
matches decides the chain.  Tensors no rule matches stay lossless, as do
integer tensors and tensors the chosen codec cannot take (``accepts``)::

    [[rule]]
    match = "*.embed_tokens.weight"
    codec = "vq(dim=4, bits=8)"

    [[rule]]
    match = "*.weight"
    ndim = 2
    codec = "gquant(bits=4, group=32)"

    [[rule]]
    match = "*norm*.weight"
    codec = "normdelta(mode=bits)"
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass

from rbeformat import UsageError
from rbeformat.chain import Chain, parse_chain
from rbeformat.codecs.registry import TENSOR_CODECS
from rbeformat.spec import DTYPES


@dataclass
class Rule:
    pattern: str
    chain: Chain
    ndim: int | None = None

    def matches(self, name: str, shape: tuple[int, ...]) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern) and (self.ndim is None or len(shape) == self.ndim)


@dataclass
class Policy:
    """Maps a tensor to its chain (None: lossless)."""

    rules: list[Rule]

    def choose(self, name: str, dtype: str, shape: tuple[int, ...]) -> Chain | None:
        if not DTYPES[dtype].is_float or dtype.startswith("F8") or dtype == "F64":
            return None
        for rule in self.rules:
            if rule.matches(name, shape):
                if rule.chain.lossless or not rule.chain.codec.accepts(tuple(shape)):
                    return None
                return rule.chain
        return None

    @property
    def lossless(self) -> bool:
        return all(r.chain.lossless for r in self.rules)


def lossless_policy() -> Policy:
    return Policy([])


def policy_from_codec(spec: str) -> Policy:
    """``--codec SPEC``: the chain for every 2-D floating-point tensor."""
    return Policy([Rule("*", parse_chain(spec, TENSOR_CODECS), ndim=2)])


def policy_from_recipe(path: str) -> Policy:
    """``--recipe FILE``: rules from a TOML file."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    rules = []
    for i, raw in enumerate(doc.get("rule", [])):
        where = f"{path}: rule {i + 1}"
        if not isinstance(raw, dict) or not isinstance(raw.get("match"), str) or not isinstance(raw.get("codec"), str):
            raise UsageError(f"{where}: needs string keys 'match' and 'codec'")
        unknown = set(raw) - {"match", "codec", "ndim"}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
        ndim = raw.get("ndim")
        if ndim is not None and (type(ndim) is not int or ndim < 0):
            raise UsageError(f"{where}: 'ndim' must be a non-negative integer")
        rules.append(Rule(raw["match"], parse_chain(raw["codec"], TENSOR_CODECS), ndim))
    unknown = set(doc) - {"rule"}
    if unknown:
        raise UsageError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    return Policy(rules)
