"""Settings of tensor codecs: one declaration and one validator per field.

A tensor codec is a frozen dataclass whose fields are declared with
``setting``.  Each field names the validator that checks it, a short
description that error messages quote, and its role:

* ``stored`` (the default): part of the codec's config in the manifest; a
  decoder needs it, and a reader validates it when it opens the file.
* ``encoder``: guides only the encoder (a search grid, a sample size).  It is
  never stored, so no reader can refuse a file over it.
* ``recorded``: an encoder setting that files of format 1.1 / 1.2 carry in
  the config (the spec lists them).  The writer still records it there so
  that earlier readers open the file; a reader accepts any value and never
  lets it affect decoding.

A validator is ``check(value, where) -> value`` raising ``FormatError`` with
``where`` (e.g. ``tensors[3].codec.config.bits``) in its message.  The same
validator serves both directions: ``TensorCodec.from_config`` lets the
``FormatError`` through when reading a file; building a codec from user
input (``GroupQuant(bits=9)``, a chain on the command line) turns it into a
``ValueError`` that names the parameter.

>>> check = integer(2, 8)
>>> check(4, "gquant.bits")
4
>>> check(True, "gquant.bits")
Traceback (most recent call last):
...
rbeformat.errors.FormatError: gquant.bits: expected an integer in [2, 8], found True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ...errors import FormatError
from ...spec import MAX_NAME_BYTES

Check = Callable[[Any, str], Any]
ROLES = ("stored", "encoder", "recorded")


def setting(default: Any, check: Check, doc: str, role: str = "stored") -> Any:
    """A dataclass field of a tensor codec with its validator, description and role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc, "role": role})


def integer(low: int, high: int) -> Check:
    """An int (not a bool) in [low, high]."""

    def check(value: Any, where: str) -> int:
        if type(value) is not int or not low <= value <= high:
            raise FormatError(f"{where}: expected an integer in [{low}, {high}], found {value!r:.80}")
        return value

    return check


def number(low: float, high: float, low_open: bool = True) -> Check:
    """A finite int or float (not a bool) in (low, high] or [low, high], as a float."""
    bracket = "(" if low_open else "["

    def check(value: Any, where: str) -> float:
        found = as_number(value)
        if found is None or found > high or found < low or (low_open and found == low):
            raise FormatError(f"{where}: expected a finite number in {bracket}{low:g}, {high:g}], found {value!r:.80}")
        return found

    return check


def as_number(value: Any) -> float | None:
    """``value`` as a finite float if it is an int or float (never a bool), else None."""
    if type(value) not in (int, float):
        return None
    try:
        found = float(value)  # an int too large for a float overflows here
    except OverflowError:
        return None
    return found if math.isfinite(found) else None


def choice(*allowed: Any) -> Check:
    """One of a few fixed values (strings, usually)."""

    def check(value: Any, where: str) -> Any:
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise FormatError(f"{where}: expected one of {', '.join(map(repr, allowed))}, found {value!r:.40}")
        return value

    return check


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise FormatError(f"{where}: expected true or false, found {value!r:.40}")
    return value


def tensor_name(value: Any, where: str) -> str:
    """The name of another tensor of the same file."""
    if not isinstance(value, str) or not value or len(value.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        raise FormatError(f"{where}: expected a tensor name of 1 to {MAX_NAME_BYTES} bytes, found {value!r:.80}")
    return value


def optional(inner: Check) -> Check:
    """None (the setting is absent) or what ``inner`` accepts."""

    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)

    return check


def fraction_tuple(low: float, high: float, low_open: bool) -> Check:
    """A non-empty tuple (or list) of numbers in (low, high] / [low, high], as a tuple of floats."""
    item = number(low, high, low_open)

    def check(value: Any, where: str) -> tuple[float, ...]:
        if not isinstance(value, (tuple, list)) or not value:
            raise FormatError(f"{where}: expected a non-empty list of numbers, found {value!r:.80}")
        return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

    return check


def fields_by_role(cls: type, *roles: str) -> list[dataclasses.Field]:
    """The codec's declared settings with one of ``roles``, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("role") in roles]


def describe_settings(cls: type) -> str:
    """``bits (code bits), group (values per scale), ...``: what a user may set, for error messages."""
    return ", ".join(f"{f.name} ({f.metadata['doc']})" for f in fields_by_role(cls, *ROLES))
