"""The fixed-size header and footer of an rbe file (spec sections 2 and 5).

Both are 64 bytes and end with a CRC-32 of their first 60 bytes.  Reserved bytes
must be zero so that every byte of a file is covered by a check.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from . import native
from .errors import ChecksumError, FormatError, UnsupportedError
from .spec import FOOTER_MAGIC, FOOTER_SIZE, FORMAT_MAJOR, FORMAT_MINOR, HEADER_SIZE, MAGIC

_HEADER = struct.Struct("<8sHHI44x")  # magic, major, minor, flags, reserved
_FOOTER = struct.Struct("<8sQQIHHB27x")  # magic, manifest offset, length, crc32, major, minor, encoding
# How the manifest bytes are stored (footer byte 32).
MANIFEST_JSON = 0  # UTF-8 JSON as is
MANIFEST_ZSTD = 1  # one zstd frame (declaring its decoded size) holding the JSON


# The C extension computes the same CRC about three times faster (carry-less multiplication).
native_crc32 = native.extension.crc32 if native.available() else None


def crc32(data, crc: int = 0) -> int:
    """CRC-32 (ISO-HDLC, as zlib and PNG compute it), continued from ``crc``."""
    if native_crc32 is not None:
        return native_crc32(data, crc)
    return zlib.crc32(data, crc) & 0xFFFFFFFF


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32(body))


def _check_seal(block: bytes, what: str) -> None:
    (stored,) = struct.unpack("<I", block[60:64])
    if crc32(block[:60]) != stored:
        raise ChecksumError(f"{what}: checksum mismatch (stored {stored:08x}, computed {crc32(block[:60]):08x})")


def _check_version(major: int, minor: int, what: str) -> None:
    if major != FORMAT_MAJOR:
        raise UnsupportedError(
            f"{what}: format version {major}.{minor} is not readable by this reader (reads {FORMAT_MAJOR}.x)"
        )


def pack_header() -> bytes:
    return _seal(_HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0))


def unpack_header(block: bytes) -> tuple[int, int]:
    """Validates the header; returns (major, minor)."""
    if len(block) < HEADER_SIZE:
        raise FormatError(f"header: expected {HEADER_SIZE} bytes, got {len(block)}; the file is truncated")
    if block[:8] != MAGIC:
        raise FormatError(f"header: not an rbe file (magic {bytes(block[:8])!r}, expected {MAGIC!r})")
    _check_seal(block[:HEADER_SIZE], "header")
    magic, major, minor, flags = _HEADER.unpack(block[:60])
    _check_version(major, minor, "header")
    if flags != 0 or any(block[16:60]):
        raise FormatError("header: reserved bytes must be zero")
    return major, minor


@dataclass(frozen=True)
class Footer:
    manifest_offset: int
    manifest_length: int
    manifest_crc32: int
    major: int
    minor: int
    manifest_encoding: int = MANIFEST_JSON


def pack_footer(offset: int, length: int, manifest_crc: int, encoding: int = MANIFEST_JSON) -> bytes:
    return _seal(_FOOTER.pack(FOOTER_MAGIC, offset, length, manifest_crc, FORMAT_MAJOR, FORMAT_MINOR, encoding))


def unpack_footer(block: bytes) -> Footer:
    if len(block) != FOOTER_SIZE:
        raise FormatError(f"footer: expected {FOOTER_SIZE} bytes, got {len(block)}; the file is truncated")
    if block[:8] != FOOTER_MAGIC:
        raise FormatError("footer: magic not found at the end of the file; the file is truncated or not rbe")
    _check_seal(block, "footer")
    magic, offset, length, manifest_crc, major, minor, encoding = _FOOTER.unpack(block[:60])
    _check_version(major, minor, "footer")
    if encoding not in (MANIFEST_JSON, MANIFEST_ZSTD):
        raise FormatError(f"footer: unknown manifest encoding {encoding} (known: 0 JSON, 1 zstd)")
    if any(block[33:60]):
        raise FormatError("footer: reserved bytes must be zero")
    return Footer(offset, length, manifest_crc, major, minor, encoding)
