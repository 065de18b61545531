"""How much memory a file may make rbe allocate.

Every allocation whose size a file's numbers decide (a decoded tensor, a
codec's intermediates, an embedded file read into memory, the parsed
manifest, a config.json) is checked with ``check`` before it is made, so that a
few hostile bytes fail with one clear error instead of exhausting the machine.

The limit, in order of precedence:

1. an explicit one: ``Reader(..., max_memory=N)``, or ``set_limit(N)`` for the
   whole process (the command line's ``--max-memory SIZE``);
2. otherwise ``default_limit()``: ``DEFAULT_SHARE`` of the memory available to
   this process now (MemAvailable, capped by a cgroup limit and RLIMIT_AS);
3. and, for a container opened without an explicit limit, also at most
   ``max(FILE_FLOOR, FILE_RATIO * file size)`` (``container_limit``): a
   legitimate file's largest decode is a small multiple of the file, so a tiny
   file never gets gigabytes; parsing its manifest at most
   ``max(MANIFEST_FLOOR, MANIFEST_RATIO * file size)`` (``manifest_limit``).

>>> parse_size("2G"), parse_size("500M"), parse_size("4096")
(2147483648, 524288000, 4096)
>>> check(1 << 20, "tensor 'w'", limit=1 << 30)
>>> check(1 << 31, "tensor 'w'", limit=1 << 30)
Traceback (most recent call last):
...
rbeformat.budget.MemoryLimitError: tensor 'w': needs 2.00 GiB (2147483648 bytes), over the memory limit of 1.00 GiB (1073741824 bytes); --max-memory to change
"""

from __future__ import annotations

import os
import re

from .errors import RbeError, UsageError

DEFAULT_SHARE = 0.5  # of the available memory
FILE_FLOOR = 1 << 30  # the file-size tie never refuses this much
FILE_RATIO = 256  # ... nor this many times the file's size
MIN_DEFAULT = 256 << 20  # a default never below this, however busy the machine
# Parsing a container's manifest gets, by default, at most
# max(MANIFEST_FLOOR, MANIFEST_RATIO * file size): a real manifest costs about
# 18 bytes of memory per byte of JSON and is either stored plain (the file is
# larger than it) or belongs to a model whose weights dwarf it.
MANIFEST_FLOOR = 256 << 20
MANIFEST_RATIO = 32

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)

_configured: int | None = None


class MemoryLimitError(RbeError):
    """Decoding would need more memory than the limit allows (exit 3 on the command line)."""


def parse_size(text: str) -> int:
    """``"2G"``, ``"500M"``, ``"1.5g"``, ``"64KiB"``, ``"4096"`` -> bytes (binary units); UsageError otherwise."""
    match = _SIZE.fullmatch(str(text))
    if match is None:
        raise UsageError(f"invalid size {text!r}: expected bytes or a number with K, M, G or T (e.g. 2G, 500M)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise UsageError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def format_size(n: int) -> str:
    """Bytes in binary units, e.g. ``1.00 GiB``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def available_memory() -> int | None:
    """Bytes this process could still allocate, as far as the system tells; None when it does not."""
    candidates = []
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    cgroup = _cgroup_room()
    if cgroup is not None:
        candidates.append(cgroup)
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            candidates.append(max(0, soft - _address_space_used()))
    except (ImportError, OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when it has a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            text = fh.read().strip()
        if text == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as fh:
            return max(0, int(text) - int(fh.read().strip()))
    except (OSError, ValueError):
        return None


def _address_space_used() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_limit() -> int:
    """``DEFAULT_SHARE`` of the available memory (at least ``MIN_DEFAULT``; 4 GiB when unknown)."""
    available = available_memory()
    if available is None:
        return 4 << 30
    return max(MIN_DEFAULT, int(available * DEFAULT_SHARE))


def set_limit(nbytes: int | None) -> None:
    """Sets the limit for this whole process (``--max-memory``); None returns to the default."""
    global _configured
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 1):
        raise UsageError(f"memory limit must be a positive number of bytes, not {nbytes!r}")
    _configured = nbytes


def configured_limit() -> int | None:
    """The limit ``set_limit`` set, or None."""
    return _configured


def current_limit(explicit: int | None = None) -> int:
    """The limit in force: ``explicit``, else the configured one, else ``default_limit()``."""
    if explicit is not None:
        return explicit
    return _configured if _configured is not None else default_limit()


def container_limit(file_size: int, explicit: int | None = None) -> int:
    """The limit for decoding a container of ``file_size`` bytes.

    An explicit or configured limit is used as given; the default is also
    capped at ``max(FILE_FLOOR, FILE_RATIO * file_size)``.
    """
    if explicit is not None or _configured is not None:
        return current_limit(explicit)
    return min(default_limit(), max(FILE_FLOOR, FILE_RATIO * file_size))


def manifest_limit(file_size: int, explicit: int | None = None) -> int:
    """The limit for parsing the manifest of a container of ``file_size`` bytes (see ``container_limit``)."""
    if explicit is not None or _configured is not None:
        return current_limit(explicit)
    return min(container_limit(file_size), max(MANIFEST_FLOOR, MANIFEST_RATIO * file_size))


def container_reason(file_size: int, explicit: int | None = None) -> str | None:
    """Why ``container_limit`` is what it is, when the file's size decided it (for error messages)."""
    if explicit is not None or _configured is not None:
        return None
    tie = max(FILE_FLOOR, FILE_RATIO * file_size)
    return f"the default for a {file_size}-byte file" if tie < default_limit() else None


def check(nbytes: int, what: str, limit: int | None = None, reason: str | None = None) -> None:
    """Raises MemoryLimitError (one line: what, how much, the limit) when ``nbytes`` exceeds the limit."""
    allowed = current_limit(limit)
    if nbytes > allowed:
        why = f", {reason}" if reason else ""
        raise MemoryLimitError(
            f"{what}: needs {format_size(nbytes)} ({nbytes} bytes), over the memory limit of "
            f"{format_size(allowed)} ({allowed} bytes{why}); --max-memory to change"
        )
