"""A table of specific malformed files, each with the error it must raise.

Each row damages the sample file (tests/rbe_craft.py) in one way and names the
stage that must refuse it ("open": Reader() itself; "read": get_tensor or
read_file), the exception class, and a fragment of the message, so that the
messages stay specific enough for a user to act on.  Manifest edits are
re-sealed with fresh checksums, so each row reaches the check it is about.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard
from rbe_craft import (
    append_section,
    assemble,
    file_entry,
    patch_footer,
    patch_header,
    replace_payload,
    split_file,
    tensor,
    write_sample,
    zstd_frame,
)

from rbeformat import ChecksumError, FormatError, RbeError, Reader, UnsupportedError, Writer
from rbeformat.codecs.blob.byteplane import Byteplane
from rbeformat.codecs.blob.zstd import Zstd
from rbeformat.layout import crc32
from rbeformat.spec import FOOTER_SIZE, FORMAT_MINOR, MAX_MANIFEST_BYTES

OPEN, READ = "open", "read"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("sample") / "sample.rbe"
    write_sample(path)
    return path.read_bytes()


# -- how rows build their files --------------------------------------------------------


def edit_manifest(apply):
    """A row builder from ``apply(manifest)``."""

    def build(sample: bytes) -> bytes:
        area, manifest = split_file(sample)
        apply(manifest)
        return assemble(area, manifest)

    return build


def edit_area(apply):
    """A row builder from ``apply(area, manifest) -> area`` (sections and manifest)."""

    def build(sample: bytes) -> bytes:
        area, manifest = split_file(sample)
        return assemble(apply(area, manifest), manifest)

    return build


def put(get, key, value):
    """A row builder that sets ``get(manifest)[key] = value``."""

    def apply(manifest):
        get(manifest)[key] = value

    return edit_manifest(apply)


def drop(get, key):
    return edit_manifest(lambda m: get(m).pop(key))


def flip(offset_of):
    """A row builder that inverts one byte, without re-sealing anything."""

    def build(sample: bytes) -> bytes:
        data = bytearray(sample)
        data[offset_of(sample)] ^= 0xFF
        return bytes(data)

    return build


def new_manifest(body: bytes):
    return lambda sample: assemble(split_file(sample)[0], body)


def t(name):
    return lambda m: tensor(m, name)


def f(path):
    return lambda m: file_entry(m, path)


def chunk(name, i=0):
    return lambda m: tensor(m, name)["chunks"][i]


def file_chunk(path):
    return lambda m: file_entry(m, path)["chunks"][0]


def _manifest_offset(data: bytes) -> int:
    return struct.unpack("<Q", data[-FOOTER_SIZE + 8 : -FOOTER_SIZE + 16])[0]


def _footer_field(data: bytes, at: int) -> int:
    return struct.unpack("<Q", data[-FOOTER_SIZE + at : -FOOTER_SIZE + at + 8])[0]


def patch_footer_u64(at: int, change):
    """A row builder that rewrites a footer u64 field (offset: 8, length: 16) and re-seals."""
    return lambda s: patch_footer(s, {at: struct.pack("<Q", change(_footer_field(s, at)))})


def _alias_loop(m):
    a, b = tensor(m, "a.f32"), tensor(m, "b.alias")
    for key in ("digest", "codec", "chunks"):
        a.pop(key)
    a["alias_of"], b["alias_of"] = "b.alias", "a.f32"


def _zero_length_bomb(m):
    """64 GiB claimed by 1024 empty chunks: nothing to decode, everything to allocate."""
    n = 1 << 26
    t_ = tensor(m, "d.ids")
    t_.update(dtype="U8", shape=[1024 * n])
    t_["codec"]["config"]["chunk_items"] = n
    t_["chunks"] = [{"offset": 64, "length": 0, "crc32": 0, "items": n, "params": {"planes": [["zstd", 0]]}}] * 1024


def planes(change):
    """A row builder that replaces the plane list of tensor a.f32's first chunk (128 items)."""

    def apply(m):
        params = chunk("a.f32")(m)["params"]
        params["planes"] = change(params["planes"])

    return edit_manifest(apply)


def _payload_edit(get, transform):
    """Rewrites a chunk's bytes (same length) and its CRC, so that only the decoder can object."""

    def apply(area, m):
        c = get(m)
        return replace_payload(area, c, transform(bytearray(area[c["offset"] : c["offset"] + c["length"]])))

    return edit_area(apply)


def _bad_split_table(payload: bytearray) -> bytes:
    (first,) = struct.unpack("<I", payload[:4])
    payload[:4] = struct.pack("<I", first + 1)
    return bytes(payload)


def _bad_fields_count(payload: bytearray) -> bytes:
    payload[0] = 8  # the fields plane comes first; its low bit count must be 1 to 7
    return bytes(payload)


def _short_fields_plane(area, m):
    """A fields plane of 3 bytes: too short for the packed high bits of 1024 bytes."""
    c = chunk("g.rotated")(m)
    (_, fields_len), (top_method, top_len) = c["params"]["planes"]
    top = area[c["offset"] + fields_len : c["offset"] + fields_len + top_len]
    payload = area[c["offset"] : c["offset"] + 3] + top
    area, offset = append_section(area, payload)
    c.update(
        offset=offset,
        length=len(payload),
        crc32=crc32(payload),
        params={**c["params"], "planes": [["fields", 3], [top_method, top_len]]},
    )
    return area


def _new_file_payload(payload: bytes):
    """Gives config.json one new section holding ``payload``."""

    def apply(area, m):
        area, offset = append_section(area, payload)
        file_chunk("config.json")(m).update(offset=offset, length=len(payload), crc32=crc32(payload))
        return area

    return edit_area(apply)


def _short_split_plane(area, m):
    """A split plane of 3 bytes: too short for its table of run lengths."""
    c = chunk("c.grid")(m)
    (_, split_len), (_, top_len) = c["params"]["planes"]
    top = area[c["offset"] + split_len : c["offset"] + split_len + top_len]
    payload = b"\x00\x00\x00" + top
    area, offset = append_section(area, payload)
    c.update(
        offset=offset, length=len(payload), crc32=crc32(payload), params={"planes": [["split", 3], ["zstd", top_len]]}
    )
    return area


CASES = [
    # -- header, footer and layout --
    pytest.param(lambda s: b"NOT-RBE!" + s[8:], OPEN, FormatError, "not an rbe file", id="bad magic"),
    pytest.param(lambda s: b"", OPEN, FormatError, "too short for an rbe file", id="empty file"),
    pytest.param(lambda s: s[: len(s) // 2 + 5], OPEN, FormatError, "footer: magic not found", id="truncated"),
    pytest.param(lambda s: s[:-FOOTER_SIZE], OPEN, FormatError, "footer: magic not found", id="footer cut off"),
    pytest.param(
        lambda s: s[:-FOOTER_SIZE] + b"\0" + s[-FOOTER_SIZE:],
        OPEN,
        FormatError,
        "is not a multiple of 64",
        id="unaligned size",
    ),
    pytest.param(
        lambda s: patch_header(s, {8: struct.pack("<H", 2)}),
        OPEN,
        UnsupportedError,
        f"header: format version 2.{FORMAT_MINOR}",
        id="header version major",
    ),
    pytest.param(
        lambda s: patch_footer(s, {28: struct.pack("<H", 2)}),
        OPEN,
        UnsupportedError,
        f"footer: format version 2.{FORMAT_MINOR}",
        id="footer version major",
    ),
    pytest.param(
        lambda s: patch_header(s, {12: b"\x01"}),
        OPEN,
        FormatError,
        "header: reserved bytes must be zero",
        id="header flags",
    ),
    pytest.param(
        lambda s: patch_header(s, {59: b"\x01"}),
        OPEN,
        FormatError,
        "header: reserved bytes must be zero",
        id="header reserved",
    ),
    pytest.param(
        lambda s: patch_footer(s, {40: b"\x01"}),
        OPEN,
        FormatError,
        "footer: reserved bytes must be zero",
        id="footer reserved",
    ),
    pytest.param(flip(lambda s: 20), OPEN, ChecksumError, "header: checksum mismatch", id="header crc"),
    pytest.param(flip(lambda s: len(s) - 30), OPEN, ChecksumError, "footer: checksum mismatch", id="footer crc"),
    pytest.param(
        flip(lambda s: _manifest_offset(s) + 10), OPEN, ChecksumError, "manifest: checksum mismatch", id="manifest crc"
    ),
    pytest.param(
        patch_footer_u64(16, lambda n: MAX_MANIFEST_BYTES + 1),
        OPEN,
        FormatError,
        f"exceeds the {MAX_MANIFEST_BYTES}-byte limit",
        id="manifest too large",
    ),
    pytest.param(
        patch_footer_u64(16, lambda n: n + 64), OPEN, FormatError, "runs past the footer", id="manifest past footer"
    ),
    pytest.param(
        patch_footer_u64(8, lambda o: o + 1),
        OPEN,
        FormatError,
        "misaligned or outside",
        id="manifest offset misaligned",
    ),
    pytest.param(
        patch_footer_u64(8, lambda o: 0), OPEN, FormatError, "misaligned or outside", id="manifest offset in header"
    ),
    pytest.param(
        patch_footer_u64(8, lambda o: 2**64 - 64),
        OPEN,
        FormatError,
        "misaligned or outside",
        id="manifest offset 2**64",
    ),
    pytest.param(
        lambda s: s[:-FOOTER_SIZE] + bytes(64) + s[-FOOTER_SIZE:],
        OPEN,
        FormatError,
        "unexplained bytes between the manifest and the footer",
        id="gap before footer",
    ),
    # -- the manifest as JSON --
    pytest.param(new_manifest(b"\xff\xfe{}"), OPEN, FormatError, "not valid UTF-8 JSON", id="manifest not utf-8"),
    pytest.param(new_manifest(b'{"format": "rbe",'), OPEN, FormatError, "not valid UTF-8 JSON", id="manifest not json"),
    pytest.param(
        new_manifest(b"[]"), OPEN, FormatError, "manifest: expected an object, found list", id="manifest is a list"
    ),
    pytest.param(
        new_manifest(b"[" * 100_000 + b"]" * 100_000),
        OPEN,
        FormatError,
        "nested more than 64 levels",
        id="deep nesting",
    ),
    pytest.param(
        new_manifest(b'{"format":' * 50_000 + b"1" + b"}" * 50_000),
        OPEN,
        FormatError,
        "nested more than 64 levels",
        id="deep object nesting",
    ),
    pytest.param(drop(lambda m: m, "files"), OPEN, FormatError, "manifest: missing key(s) ['files']", id="missing key"),
    pytest.param(
        put(lambda m: m, "extra", 1), OPEN, FormatError, "manifest: unexpected key(s) ['extra']", id="unexpected key"
    ),
    pytest.param(
        put(lambda m: m, "format", "safetensors"),
        OPEN,
        FormatError,
        "manifest.format: expected 'rbe'",
        id="wrong format",
    ),
    pytest.param(put(lambda m: m, "version", "1.0"), OPEN, FormatError, "manifest.version", id="version string"),
    pytest.param(
        put(lambda m: m, "metadata", {"k": 1}), OPEN, FormatError, "manifest.metadata", id="metadata not strings"
    ),
    pytest.param(
        put(lambda m: m, "tensors", {}), OPEN, FormatError, "manifest.tensors: expected a list", id="tensors not a list"
    ),
    pytest.param(
        drop(t("a.f32"), "digest"), OPEN, FormatError, "tensors[0]: missing key(s) ['digest']", id="tensor missing key"
    ),
    pytest.param(drop(chunk("a.f32"), "crc32"), OPEN, FormatError, "missing key(s) ['crc32']", id="chunk missing key"),
    # -- sizes, shapes and numbers --
    pytest.param(
        put(t("a.f32"), "shape", [301]),
        OPEN,
        FormatError,
        "chunks hold 300 items, expected 301",
        id="shape product mismatch",
    ),
    pytest.param(
        put(chunk("a.f32", 2), "items", 43),
        OPEN,
        FormatError,
        "chunks hold 299 items, expected 300",
        id="chunk items mismatch",
    ),
    pytest.param(put(t("a.f32"), "shape", [1] * 9), OPEN, FormatError, "at most 8 dimensions", id="too many dims"),
    pytest.param(
        put(t("a.f32"), "shape", [-300]), OPEN, FormatError, "shape[0]: expected an integer in", id="negative dim"
    ),
    pytest.param(
        put(t("a.f32"), "shape", [True]), OPEN, FormatError, "shape[0]: expected an integer in", id="bool as dim"
    ),
    pytest.param(
        put(t("a.f32"), "shape", [300.0]), OPEN, FormatError, "shape[0]: expected an integer in", id="float as dim"
    ),
    pytest.param(
        put(t("a.f32"), "shape", [2**20, 2**21]), OPEN, FormatError, "exceed the limit", id="too many elements"
    ),
    pytest.param(
        put(f("config.json"), "size", 2**63),
        OPEN,
        FormatError,
        "files[0].size: expected an integer in",
        id="file size 2**63",
    ),
    pytest.param(
        put(chunk("a.f32"), "length", -1), OPEN, FormatError, "length: expected an integer in", id="negative length"
    ),
    pytest.param(
        put(chunk("a.f32"), "offset", 2**63), OPEN, FormatError, "offset: expected an integer in", id="offset 2**63"
    ),
    pytest.param(
        put(chunk("a.f32"), "crc32", 2**32), OPEN, FormatError, "crc32: expected an integer in", id="crc32 too large"
    ),
    pytest.param(
        put(chunk("a.f32"), "offset", 65), OPEN, FormatError, "is not a multiple of 64", id="misaligned chunk"
    ),
    pytest.param(put(chunk("a.f32", 1), "offset", 64), OPEN, FormatError, "overlaps", id="chunk overlap"),
    pytest.param(
        put(chunk("a.f32"), "offset", 0), OPEN, FormatError, "lie outside the data area", id="chunk in header"
    ),
    pytest.param(
        put(chunk("a.f32"), "length", 1 << 20), OPEN, FormatError, "lie outside the data area", id="chunk past the end"
    ),
    pytest.param(
        put(chunk("e.raw"), "length", 60),
        OPEN,
        FormatError,
        "raw chunk of 16 items must store 64 bytes",
        id="raw chunk length",
    ),
    pytest.param(
        edit_manifest(
            lambda m: (
                t("a.f32")(m).update(shape=[2**25]),
                chunk("a.f32")(m).update(items=2**25),
                t("a.f32")(m)["chunks"].__delitem__(slice(1, None)),
            )
        ),
        OPEN,
        FormatError,
        "over the 67108864 limit",
        id="chunk over 64 MiB",
    ),
    pytest.param(edit_manifest(_zero_length_bomb), OPEN, FormatError, "cannot decode to", id="zero-length chunks"),
    pytest.param(
        edit_manifest(
            lambda m: (f("config.json")(m).update(size=1 << 26), file_chunk("config.json")(m).update(items=1 << 26))
        ),
        OPEN,
        FormatError,
        "stored bytes cannot decode to 67108864 bytes",
        id="zstd expansion",
    ),
    # -- dtypes, codecs, names, paths, aliases --
    pytest.param(put(t("a.f32"), "dtype", "F128"), OPEN, FormatError, "unknown dtype 'F128'", id="unknown dtype"),
    pytest.param(put(t("a.f32"), "dtype", ["F32"]), OPEN, FormatError, "unknown dtype", id="dtype is a list"),
    pytest.param(
        put(t("a.f32"), "codec", {"name": "future", "must_understand": True, "config": {}}),
        OPEN,
        UnsupportedError,
        "codec 'future' is not known to this reader",
        id="unknown codec must understand",
    ),
    pytest.param(
        put(t("a.f32"), "codec", {"name": "future", "must_understand": "yes", "config": {}}),
        OPEN,
        FormatError,
        "must_understand: expected true or false",
        id="must_understand not bool",
    ),
    pytest.param(
        put(t("a.f32"), "codec", {"name": "byteplane", "must_understand": True, "config": []}),
        OPEN,
        FormatError,
        "codec.config: expected an object",
        id="codec config not object",
    ),
    pytest.param(
        put(lambda m: t("a.f32")(m)["codec"], "config", {"transform": "rotl1", "chunk_items": 0}),
        OPEN,
        FormatError,
        "chunk_items: expected an integer in [1,",
        id="byteplane chunk_items 0",
    ),
    pytest.param(
        put(lambda m: t("a.f32")(m)["codec"], "config", {"transform": "rotl9", "chunk_items": 128}),
        OPEN,
        FormatError,
        "transform: expected one of",
        id="byteplane transform",
    ),
    pytest.param(
        put(t("b.alias"), "alias_of", "missing"),
        OPEN,
        FormatError,
        "alias_of names no stored tensor",
        id="alias to missing",
    ),
    pytest.param(
        put(t("b.alias"), "alias_of", "b.alias"),
        OPEN,
        FormatError,
        "alias_of names no stored tensor",
        id="alias to itself",
    ),
    pytest.param(edit_manifest(_alias_loop), OPEN, FormatError, "alias_of names no stored tensor", id="alias loop"),
    pytest.param(put(t("b.alias"), "shape", [3, 100]), OPEN, FormatError, "alias dtype/shape differ", id="alias shape"),
    pytest.param(
        put(t("b.alias"), "digest", "sha256:" + "0" * 64),
        OPEN,
        FormatError,
        "unexpected key(s) ['digest']",
        id="alias with data keys",
    ),
    pytest.param(put(t("d.ids"), "name", "a.f32"), OPEN, FormatError, "duplicate tensor name", id="duplicate name"),
    pytest.param(
        put(f("sub/notes.txt"), "path", "config.json"), OPEN, FormatError, "duplicate path", id="duplicate path"
    ),
    pytest.param(put(t("a.f32"), "name", "x" * 1025), OPEN, FormatError, "longer than 1024 bytes", id="long name"),
    pytest.param(put(t("a.f32"), "name", "a\x00b"), OPEN, FormatError, "containing NUL", id="NUL in name"),
    pytest.param(put(t("a.f32"), "name", ""), OPEN, FormatError, "expected a non-empty string", id="empty name"),
    pytest.param(
        put(f("config.json"), "path", "../evil.json"), OPEN, FormatError, "must not contain", id="path with .."
    ),
    pytest.param(
        put(f("config.json"), "path", "sub/../../evil"),
        OPEN,
        FormatError,
        "must not contain",
        id="path escaping through a subdir",
    ),
    pytest.param(
        put(f("config.json"), "path", "/etc/passwd"),
        OPEN,
        FormatError,
        "must be a relative POSIX path",
        id="absolute path",
    ),
    pytest.param(
        put(f("config.json"), "path", "sub\\evil"), OPEN, FormatError, "must be a relative POSIX path", id="backslash"
    ),
    pytest.param(
        put(f("config.json"), "path", "C:evil"), OPEN, FormatError, "must be a relative POSIX path", id="drive letter"
    ),
    pytest.param(
        put(f("config.json"), "role", "script"), OPEN, FormatError, "role: expected one of", id="unknown role"
    ),
    pytest.param(
        edit_manifest(lambda m: f("config.json")(m).update(role="safetensors-header", tensors=["nope"])),
        OPEN,
        FormatError,
        "lists unknown tensor 'nope'",
        id="header lists unknown tensor",
    ),
    pytest.param(
        put(f("config.json"), "tensors", ["a.f32"]),
        OPEN,
        FormatError,
        "only a safetensors-header entry lists tensors",
        id="plain file lists tensors",
    ),
    # -- chunk contents: the reader opens the file, decoding refuses it --
    pytest.param(
        put(t("a.f32"), "codec", {"name": "future", "must_understand": False, "config": {}}),
        READ,
        UnsupportedError,
        "codec 'future' is not known to this reader",
        id="unknown optional codec",
    ),
    pytest.param(
        flip(lambda s: 64 + 5), READ, ChecksumError, "tensor 'a.f32' chunk 0: checksum mismatch", id="section crc"
    ),
    pytest.param(planes(lambda p: p[:3]), READ, FormatError, "expected a list of 4 planes", id="plane count"),
    pytest.param(
        planes(lambda p: p[:3] + [[p[3][0], p[3][1] - 1]]),
        READ,
        FormatError,
        "bytes, section holds",
        id="plane lengths",
    ),
    pytest.param(
        planes(lambda p: p[:3] + [["lzma", p[3][1]]]),
        READ,
        FormatError,
        "expected [method, length]",
        id="unknown plane method",
    ),
    pytest.param(
        planes(lambda p: p[:3] + [[p[3][0], 2**40]]),
        READ,
        FormatError,
        "planes[3][1]: expected an integer",
        id="plane length huge",
    ),
    pytest.param(
        planes(lambda p: p[:3] + [["split", p[3][1]]]),
        READ,
        FormatError,
        "cannot itself be split",
        id="top plane split",
    ),
    # Planes decode top first, then 0, 1, 2; the top plane keeps its place.
    pytest.param(
        planes(lambda p: [["raw", 127], [p[1][0], p[1][1] + p[0][1] - 127], p[2], p[3]]),
        READ,
        FormatError,
        "raw plane holds 127 bytes, expected 128",
        id="raw plane length",
    ),
    pytest.param(
        put(chunk("a.f32"), "params", {"plane": []}),
        READ,
        FormatError,
        "missing key(s) ['planes', 'rotate']",
        id="params missing planes",
    ),
    pytest.param(
        put(chunk("a.f32"), "params", {"planes": [["raw", 128]] * 4}),
        READ,
        FormatError,
        "missing key(s) ['rotate']",
        id="rotl chunk without rotation",
    ),
    pytest.param(
        put(chunk("c.grid"), "params", {"planes": [["raw", 4096]] * 2, "rotate": 1}),
        READ,
        FormatError,
        "unexpected key(s) ['rotate']",
        id="rotl1 chunk with rotation",
    ),
    pytest.param(
        edit_manifest(lambda m: chunk("a.f32")(m)["params"].update(rotate=32)),
        READ,
        FormatError,
        "params.rotate: expected an integer in [0, 31]",
        id="rotation too wide",
    ),
    pytest.param(
        _payload_edit(chunk("g.rotated"), _bad_fields_count),
        READ,
        FormatError,
        "starts with its low bit count",
        id="fields low bit count",
    ),
    pytest.param(edit_area(_short_fields_plane), READ, FormatError, "cannot hold its", id="fields plane truncated"),
    pytest.param(
        _payload_edit(chunk("c.grid"), _bad_split_table), READ, FormatError, "split runs total", id="split table sum"
    ),
    pytest.param(edit_area(_short_split_plane), READ, FormatError, "cannot hold its", id="split table truncated"),
    pytest.param(
        _new_file_payload(zstandard.ZstdCompressor().compress(bytes(1 << 20))),
        READ,
        FormatError,
        "zstd frame declares 1048576 decoded bytes, expected 132",
        id="decompression bomb",
    ),
    pytest.param(
        _new_file_payload(zstd_frame(2**40, b"x")),
        READ,
        FormatError,
        "zstd frame declares 1099511627776 decoded bytes",
        id="frame declares 2**40",
    ),
    pytest.param(
        _new_file_payload(zstd_frame(132, b"x" * 20)),
        READ,
        FormatError,
        "corrupt zstd frame",
        id="frame shorter than declared",
    ),
    pytest.param(
        _new_file_payload(zstandard.ZstdCompressor(write_content_size=False).compress(bytes(132))),
        READ,
        FormatError,
        "declares",
        id="frame without size",
    ),
    pytest.param(_new_file_payload(b"not zstd at all"), READ, FormatError, "not a zstd frame", id="not a frame"),
    pytest.param(
        _new_file_payload(bytes(200)), READ, FormatError, "longer than its decoded size 132", id="stored run too long"
    ),
    pytest.param(
        put(file_chunk("config.json"), "params", []),
        READ,
        FormatError,
        "params: expected an object",
        id="zstd params not object",
    ),
]


def outcome(path) -> tuple[str, BaseException] | None:
    """The first stage that refuses ``path`` and its exception, or None."""
    try:
        reader = Reader(path)
    except RbeError as exc:
        return OPEN, exc
    with reader:
        for name in reader.keys():
            try:
                reader.get_tensor(name)
            except RbeError as exc:
                return READ, exc
        for path in reader.files():
            try:
                reader.read_file(path)
            except RbeError as exc:
                return READ, exc
    return None


def test_sample_is_accepted(sample, tmp_path):
    """The control: every row's damage, and nothing else, is what gets refused."""
    path = tmp_path / "sample.rbe"
    path.write_bytes(sample)
    assert outcome(path) is None
    with Reader(path) as r:
        assert list(r.verify(deep=True)) == []


@pytest.mark.parametrize("build, stage, error, fragment", CASES)
def test_malformed_file_is_refused(sample, tmp_path, build, stage, error, fragment):
    path = tmp_path / "bad.rbe"
    path.write_bytes(build(sample))
    result = outcome(path)
    assert result is not None, "the damaged file was accepted"
    found_stage, exc = result
    assert (found_stage, type(exc)) == (stage, error), f"{found_stage}: {type(exc).__name__}: {exc}"
    assert fragment in str(exc)
    if stage == READ:  # verify(deep=True) must report the same damage
        with Reader(path) as r:
            assert any(fragment in problem for problem in r.verify(deep=True))


@pytest.mark.slow
def test_most_compressible_chunks_are_accepted(tmp_path):
    """The expansion bound leaves room for 64 MiB of zeros, the best case of each codec."""
    path = tmp_path / "zeros.rbe"
    with Writer(path) as w:
        w.add_array("zstd", np.zeros(1 << 26, np.uint8), codec=Zstd(chunk_bytes=1 << 26))
        w.add_array("f32", np.zeros(1 << 24, np.float32), codec=Byteplane(chunk_items=1 << 24))
        w.add_array("bf16", np.zeros(1 << 25, np.uint16), dtype="BF16", codec=Byteplane(chunk_items=1 << 25))
    with Reader(path) as r:
        assert all(len(r.entry(name).blob.chunks) == 1 for name in r.keys())
        assert not any(r.get_tensor(name).any() for name in r.keys())


def test_newer_minor_version_is_read(sample, tmp_path):
    """Minor versions only add optional things; a 1.x reader reads 1.7 files."""
    data = patch_footer(patch_header(sample, {10: struct.pack("<H", 7)}), {30: struct.pack("<H", 7)})
    path = tmp_path / "minor.rbe"
    path.write_bytes(data)
    assert outcome(path) is None
    with Reader(path) as r:
        assert r.version == (1, 7)
