"""Helpers that build damaged and hostile rbe files for the robustness tests.

A file is taken apart into its data area (header and sections, everything
before the manifest) and its manifest; a test changes either and puts the file
back together with fresh manifest and footer checksums, so that the reader gets
past the outer checks and meets the damage itself.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import zstandard

from rbeformat import Writer
from rbeformat.codecs.blob.byteplane import Byteplane
from rbeformat.codecs.blob.raw import Raw
from rbeformat.layout import crc32, pack_footer
from rbeformat.spec import FOOTER_SIZE, HEADER_SIZE, align_up


class RawJson:
    """A manifest value that serialise() writes as the given JSON text, verbatim.

    For what json.dumps cannot write, such as nesting deeper than its recursion limit.
    """

    def __init__(self, text: str):
        self.text = text


def grid_bf16(n: int, seed: int) -> np.ndarray:
    """bf16 words of normal values on a 1/8 grid: byteplane stores them with a split plane."""
    values = (np.round(np.random.RandomState(seed).standard_normal(n) * 8) / 8).astype("<f4")
    return (values.view("<u4") >> 16).astype("<u2")


def write_sample(path) -> None:
    """A few-KB file with multi-chunk, alias, raw, empty, split and fields tensors and an embedded file."""
    rng = np.random.RandomState(7)
    weights = rng.standard_normal(300).astype("<f4")
    with Writer(path, force=True, codec=Byteplane(chunk_items=128), threads=1) as w:
        w.add_array("a.f32", weights)
        w.add_array("b.alias", weights.copy())
        w.add_array("c.grid", grid_bf16(4096, 8), dtype="BF16", codec=Byteplane("rotl1", chunk_items=4096))
        w.add_array("d.ids", np.arange(-10, 10, dtype="<i8").reshape(4, 5))
        w.add_array("e.raw", np.arange(16, dtype="<f4"), codec=Raw())
        w.add_array("f.empty", np.zeros((0, 3), "<f4"))
        w.add_file("config.json", b'{"hidden_size": 16, "layers": 2}\n' * 4)
        w.add_file("sub/notes.txt", b"n" * 40)
        bf16 = ((np.abs(rng.standard_normal(1024)) * 0.02).astype("<f4").view("<u4") >> 16).astype("<u2")
        w.add_array("g.rotated", bf16, dtype="BF16", codec=Byteplane())
        w.set_metadata({"origin": "rbe tests"})


def split_file(data: bytes) -> tuple[bytes, dict]:
    """(everything before the manifest, the manifest as a dict)."""
    offset, length = struct.unpack("<QQ", data[-FOOTER_SIZE + 8 : -FOOTER_SIZE + 24])
    stored = data[offset : offset + length]
    if data[-FOOTER_SIZE + 32] == 1:  # the writer stored the manifest zstd-compressed
        stored = zstandard.ZstdDecompressor().decompress(stored)
    return data[:offset], json.loads(stored)


def serialise(manifest) -> bytes:
    """Manifest bytes; a dict may hold RawJson values, bytes are taken as they are."""
    if isinstance(manifest, (bytes, bytearray)):
        return bytes(manifest)
    raws: list[str] = []

    def placeholder(obj):
        if not isinstance(obj, RawJson):
            raise TypeError(f"cannot serialise {type(obj).__name__}")
        raws.append(obj.text)
        return f"\x00raw{len(raws) - 1}\x00"

    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000raw{i}\\u0000"', raw, 1)
    return text.encode("ascii")


def assemble(area: bytes, manifest, *, manifest_crc: int | None = None) -> bytes:
    """A complete file: ``area``, then the manifest at the next aligned offset, then the footer."""
    body = serialise(manifest)
    offset = align_up(len(area))
    out = bytearray(area) + bytes(offset - len(area)) + body
    out += bytes(align_up(len(out)) - len(out))
    crc = crc32(body) if manifest_crc is None else manifest_crc
    return bytes(out + pack_footer(offset, len(body), crc))


def reseal(block: bytes, changes: dict[int, bytes]) -> bytes:
    """A 64-byte header or footer with bytes replaced and its CRC-32 recomputed."""
    body = bytearray(block[:60])
    for at, value in changes.items():
        body[at : at + len(value)] = value
    return bytes(body) + struct.pack("<I", crc32(bytes(body)))


def patch_header(data: bytes, changes: dict[int, bytes]) -> bytes:
    return reseal(data[:HEADER_SIZE], changes) + data[HEADER_SIZE:]


def patch_footer(data: bytes, changes: dict[int, bytes]) -> bytes:
    return data[:-FOOTER_SIZE] + reseal(data[-FOOTER_SIZE:], changes)


def tensor(manifest: dict, name: str) -> dict:
    return next(t for t in manifest["tensors"] if t["name"] == name)


def file_entry(manifest: dict, path: str) -> dict:
    return next(f for f in manifest["files"] if f["path"] == path)


def replace_payload(area: bytes, chunk: dict, payload: bytes) -> bytes:
    """Overwrites a chunk's section in place (same length) and updates its CRC in the manifest."""
    assert len(payload) == chunk["length"]
    start = chunk["offset"]
    chunk["crc32"] = crc32(payload)
    return area[:start] + payload + area[start + len(payload) :]


def append_section(area: bytes, payload: bytes) -> tuple[bytes, int]:
    """The area with ``payload`` appended at the next aligned offset, and that offset."""
    offset = align_up(len(area))
    return area + bytes(offset - len(area)) + payload, offset


def zstd_frame(declared: int, body: bytes, single_segment: bool = True, window: int = 0) -> bytes:
    """A hand-made zstd frame: any declared content size, then one raw block holding ``body``."""
    descriptor = 0xC0 | (0x20 if single_segment else 0)  # an 8-byte content size field
    header = struct.pack("<IB", 0xFD2FB528, descriptor) + (b"" if single_segment else bytes([window]))
    block = struct.pack("<I", (len(body) << 3) | 1)[:3]  # the last block, stored raw
    return header + struct.pack("<Q", declared % 2**64) + block + body
