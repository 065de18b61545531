"""The manifest: a JSON object that lists every tensor, alias and file.

``parse_manifest`` turns untrusted bytes into validated entries or raises
FormatError naming the offending field (for example ``tensors[3].chunks[0].offset``).
Everything a reader later trusts (shapes, sizes, byte ranges, names, paths) is
checked here, before any allocation.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import budget
from .codecs.blob.raw import Raw
from .codecs.core.base import Codec, require_int, require_keys
from .codecs.core.tensor import TensorCodec
from .codecs.registry import codec_from_record, tensor_codec_from_record
from .errors import FormatError, UnsupportedError
from .spec import (
    ALIGNMENT,
    DTYPES,
    MAX_CHUNK_DECODED_BYTES,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_TENSOR_ELEMENTS,
    DType,
)

FILE_ROLES = ("file", "safetensors-header")
INTERNAL_PREFIX = "rbe:"
# Transformed tensors decode to float32 in memory first; their size is bounded
# because a transform may hold far fewer stored bytes than it produces.
MAX_TRANSFORM_ELEMENTS = 1 << 32
MAX_CHAIN_DEPTH = 4
LOSSY_DTYPES = ("F32", "F16", "BF16", "F64")
# The most a chunk of these codecs can decode to, per stored byte: zstd's
# densest block (RLE) holds 128 KiB in 4 bytes, and byteplane stores each plane
# raw or as zstd.  Checking it keeps a few bytes of hostile manifest from making
# the reader allocate gigabytes for nothing.  A codec not listed here (one that
# computes its output from parameters, say) is not bounded this way.
MAX_EXPANSION = {"zstd": 32768, "byteplane": 32768}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# How deep a manifest's JSON may nest (objects and arrays).  The schema needs
# about 20 levels (a chain 4 codecs deep, a chunk's params); free content
# (stats, an unknown codec's config) gets the rest.
_MAX_JSON_DEPTH = 64
# A zstd-stored manifest may declare at most this many times its stored length
# (or _ZSTD_MANIFEST_FLOOR bytes, whichever is more).  Real manifests shrink
# 2-11x, 60x when most entries are aliases, 145x for 100000 aliases of one
# tensor; a few KB of hostile zstd would otherwise inflate to the 64 MiB limit.
_ZSTD_MANIFEST_RATIO = 1024
_ZSTD_MANIFEST_FLOOR = 1 << 20
# What Python's json module allocates per JSON value and per object key at
# most (an empty dict in a list: 72 bytes; a unique key with its dict slot,
# built through the duplicate-key hook: about 84), and per byte of text (the
# bytes and the decoded str).  parse_manifest checks the sum with the budget.
_BYTES_PER_JSON_TOKEN = 96
_BYTES_PER_JSON_CHAR = 2
# Entries (tensors and files) and chunk records a file may list: at most one
# per _BYTES_PER_RECORD bytes of the file, or _RECORD_FLOOR.  Each chunk of a
# known codec occupies at least 64 bytes of the file (aligned, non-empty,
# sections never overlap), so real files stay far below; aliases, empty
# tensors and chunks of unknown codecs occupy nothing, and without this a
# file of a few hundred KB lists a million of them, which takes minutes to
# validate and list.
_BYTES_PER_RECORD = 32
_RECORD_FLOOR = 1 << 16
# The scan before parsing reads the text in blocks of this many bytes.
_SCAN_BLOCK = 1 << 20
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    crc32: int
    items: int
    params: Any


@dataclass
class Blob:
    """An encoded object: a codec and the chunks it wrote."""

    dtype: DType
    items: int
    digest: str | None
    codec: Codec | None  # None when the codec is unknown and need not be understood
    codec_record: dict
    chunks: list[Chunk]
    unsupported: str | None = None


@dataclass
class Transform:
    """A tensor codec's output: its params and parts, each part stored in turn."""

    codec: TensorCodec
    codec_record: dict
    params: Any
    parts: dict[str, Part]


@dataclass
class Part:
    """One part of a transform: stored as a blob, or transformed again (a chain)."""

    dtype: DType
    shape: tuple[int, ...]
    blob: Blob | None
    transform: Transform | None


@dataclass
class TensorEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    blob: Blob | None  # None for an alias or a transformed tensor
    alias_of: str | None = None
    extra: dict = field(default_factory=dict)
    transform: Transform | None = None

    @property
    def internal(self) -> bool:
        """Tensors named ``rbe:...`` serve codecs (shared bases) and are not model tensors."""
        return self.name.startswith(INTERNAL_PREFIX)


def blobs_of(transform: Transform):
    """Every (part path, blob) under a transform, depth first."""
    for name, part in sorted(transform.parts.items()):
        if part.blob is not None:
            yield name, part.blob
        else:
            for sub, blob in blobs_of(part.transform):
                yield f"{name}.{sub}", blob


@dataclass
class FileEntry:
    path: str
    role: str
    blob: Blob
    tensors: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    version: tuple[int, int]
    producer: str
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    files: dict[str, FileEntry]

    def chunks(self):
        """Every (where, chunk) pair in the file."""
        for entry in self.tensors.values():
            if entry.blob is not None:
                for i, c in enumerate(entry.blob.chunks):
                    yield f"tensor {entry.name!r} chunk {i}", c
            if entry.transform is not None:
                for path, blob in blobs_of(entry.transform):
                    for i, c in enumerate(blob.chunks):
                        yield f"tensor {entry.name!r} part {path} chunk {i}", c
        for entry in self.files.values():
            for i, c in enumerate(entry.blob.chunks):
                yield f"file {entry.path!r} chunk {i}", c


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: expected a non-empty string")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{where}: {name!r:.80} is not valid UTF-8 (it holds a lone surrogate)") from None
    if len(encoded) > MAX_NAME_BYTES or "\x00" in name:
        raise FormatError(f"{where}: name longer than {MAX_NAME_BYTES} bytes or containing NUL")
    return name


def check_relative_path(path: Any, where: str) -> str:
    """A file path must stay inside the output directory when joined to it."""
    check_name(path, where)
    if "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise FormatError(f"{where}: {path!r:.80} must be a relative POSIX path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise FormatError(f"{where}: {path!r:.80} must not contain '', '.' or '..' components")
    return path


def _parse_shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise FormatError(f"{where}: expected a list of at most {MAX_NDIM} dimensions")
    shape = tuple(require_int(d, f"{where}[{i}]", 0, MAX_TENSOR_ELEMENTS) for i, d in enumerate(value))
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise FormatError(f"{where}: {math.prod(shape)} elements exceed the limit of {MAX_TENSOR_ELEMENTS}")
    return shape


def _parse_dtype(value: Any, where: str) -> DType:
    if not isinstance(value, str) or value not in DTYPES:  # a list or object is unhashable
        raise FormatError(f"{where}: unknown dtype {value!r:.40} (known: {', '.join(DTYPES)})")
    return DTYPES[value]


def _parse_chunks(value: Any, where: str, dtype: DType, items: int, codec: Codec | None) -> list[Chunk]:
    if not isinstance(value, list):
        raise FormatError(f"{where}: expected a list")
    chunks, total = [], 0
    expansion = MAX_EXPANSION.get(codec.name) if codec is not None else None
    for i, c in enumerate(value):
        cw = f"{where}[{i}]"
        require_keys(c, cw, {"offset", "length", "crc32", "items", "params"})
        offset = require_int(c["offset"], f"{cw}.offset", 0, 1 << 62)
        if offset % ALIGNMENT:
            raise FormatError(f"{cw}.offset: {offset} is not a multiple of {ALIGNMENT}")
        length = require_int(c["length"], f"{cw}.length", 0, 1 << 62)
        n = require_int(c["items"], f"{cw}.items", 1, items)
        decoded = n * dtype.itemsize
        if isinstance(codec, Raw):
            if length != decoded:
                raise FormatError(f"{cw}: raw chunk of {n} items must store {decoded} bytes, not {length}")
        elif decoded > MAX_CHUNK_DECODED_BYTES:
            raise FormatError(f"{cw}.items: chunk decodes to {decoded} bytes, over the {MAX_CHUNK_DECODED_BYTES} limit")
        elif expansion is not None and decoded > expansion * length:
            raise FormatError(
                f"{cw}: {length} stored bytes cannot decode to {decoded} bytes "
                f"(a {codec.name} chunk expands at most {expansion}-fold)"
            )
        chunks.append(Chunk(offset, length, require_int(c["crc32"], f"{cw}.crc32", 0, 0xFFFFFFFF), n, c["params"]))
        total += n
    if total != items:
        raise FormatError(f"{where}: chunks hold {total} items, expected {items}")
    return chunks


def _parse_blob(obj: dict, where: str, dtype: DType, items: int) -> Blob:
    digest = obj.get("digest")
    if digest is not None and (not isinstance(digest, str) or not _DIGEST.fullmatch(digest)):
        raise FormatError(f"{where}.digest: expected 'sha256:' and 64 lowercase hex digits")
    record = obj["codec"]
    codec, unsupported = None, None
    try:
        codec = codec_from_record(record, f"{where}.codec")
    except UnsupportedError as exc:
        if record.get("must_understand", True) is not False:
            raise
        unsupported = str(exc)
    chunks = _parse_chunks(obj["chunks"], f"{where}.chunks", dtype, items, codec)
    return Blob(dtype, items, digest, codec, record, chunks, unsupported)


def _parse_tensor(obj: Any, where: str) -> TensorEntry:
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected an object")
    name = check_name(obj.get("name"), f"{where}.name")
    dtype = _parse_dtype(obj.get("dtype"), f"{where}.dtype")
    shape = _parse_shape(obj.get("shape"), f"{where}.shape")
    if "alias_of" in obj:
        require_keys(obj, where, {"name", "dtype", "shape", "alias_of"})
        return TensorEntry(name, dtype, shape, None, check_name(obj["alias_of"], f"{where}.alias_of"))
    extra = {k: obj[k] for k in ("stats",) if k in obj}
    if "parts" in obj:
        require_keys(obj, where, {"name", "dtype", "shape", "codec", "params", "parts"}, {"stats"})
        transform = _parse_transform(obj, where, dtype, shape, 1)
        return TensorEntry(name, dtype, shape, None, extra=extra, transform=transform)
    require_keys(obj, where, {"name", "dtype", "shape", "digest", "codec", "chunks"}, {"stats"})
    blob = _parse_blob(obj, where, dtype, math.prod(shape))
    return TensorEntry(name, dtype, shape, blob, extra=extra)


def _parse_transform(obj: dict, where: str, dtype: DType, shape: tuple[int, ...], depth: int) -> Transform:
    """A transformed tensor or part: its codec, params and parts, checked against part_specs."""
    if depth > MAX_CHAIN_DEPTH:
        raise FormatError(f"{where}: codec chain deeper than {MAX_CHAIN_DEPTH}")
    if dtype.name not in LOSSY_DTYPES:
        raise FormatError(f"{where}.dtype: a transformed tensor must be one of {LOSSY_DTYPES}, not {dtype.name}")
    if math.prod(shape) > MAX_TRANSFORM_ELEMENTS:
        raise FormatError(f"{where}.shape: a transformed tensor may hold at most {MAX_TRANSFORM_ELEMENTS} elements")
    codec = tensor_codec_from_record(obj["codec"], f"{where}.codec")
    try:
        specs = codec.part_specs(obj["params"], shape, f"{where}.params")
    except FormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise FormatError(f"{where}.params: invalid ({type(exc).__name__}: {exc})") from None
    parts_obj = obj["parts"]
    if not isinstance(parts_obj, dict) or set(parts_obj) != set(specs):
        raise FormatError(f"{where}.parts: expected exactly {sorted(specs)}")
    parts = {}
    for pname, spec in specs.items():
        pw = f"{where}.parts.{pname}"
        pobj = parts_obj[pname]
        if not isinstance(pobj, dict):
            raise FormatError(f"{pw}: expected an object")
        pdtype = _parse_dtype(pobj.get("dtype"), f"{pw}.dtype")
        pshape = _parse_shape(pobj.get("shape"), f"{pw}.shape")
        if pdtype.name != spec.dtype or pshape != tuple(spec.shape):
            raise FormatError(f"{pw}: expected {spec.dtype} {list(spec.shape)}, found {pdtype.name} {list(pshape)}")
        if "parts" in pobj:
            require_keys(pobj, pw, {"dtype", "shape", "codec", "params", "parts"})
            parts[pname] = Part(pdtype, pshape, None, _parse_transform(pobj, pw, pdtype, pshape, depth + 1))
        else:
            require_keys(pobj, pw, {"dtype", "shape", "digest", "codec", "chunks"})
            parts[pname] = Part(pdtype, pshape, _parse_blob(pobj, pw, pdtype, math.prod(pshape)), None)
    return Transform(codec, obj["codec"], obj["params"], parts)


def _parse_file(obj: Any, where: str) -> FileEntry:
    require_keys(obj, where, {"path", "role", "size", "digest", "codec", "chunks"}, {"tensors"})
    path = check_relative_path(obj["path"], f"{where}.path")
    role = obj["role"]
    if role not in FILE_ROLES:
        raise FormatError(f"{where}.role: expected one of {FILE_ROLES}, found {role!r:.40}")
    size = require_int(obj["size"], f"{where}.size", 0, MAX_FILE_BYTES)
    blob = _parse_blob(obj, where, DTYPES["U8"], size)
    tensors = obj.get("tensors", [])
    if role == "safetensors-header":
        if not isinstance(tensors, list) or len(tensors) > MAX_ENTRIES:
            raise FormatError(f"{where}.tensors: expected a list of tensor names")
        tensors = [check_name(t, f"{where}.tensors[{i}]") for i, t in enumerate(tensors)]
    elif "tensors" in obj:
        raise FormatError(f"{where}.tensors: only a safetensors-header entry lists tensors")
    return FileEntry(path, role, blob, tensors)


def record_limit(file_size: int) -> int:
    """The most tensors, files and chunk records together that a file of ``file_size`` bytes may list."""
    return max(_RECORD_FLOOR, file_size // _BYTES_PER_RECORD)


def _count_records(obj: dict) -> int:
    """Entries and chunk records (those of parts included), counted without validating anything."""
    stack = [*obj["tensors"], *obj["files"]]
    count = len(stack)
    while stack:
        entry = stack.pop()
        if isinstance(entry, dict):
            chunks, parts = entry.get("chunks"), entry.get("parts")
            count += len(chunks) if isinstance(chunks, list) else 0
            stack.extend(parts.values() if isinstance(parts, dict) else ())
    return count


def inflate_limit(stored: int) -> int:
    """The most bytes a zstd-stored manifest of ``stored`` bytes may declare (within MAX_MANIFEST_BYTES)."""
    return max(_ZSTD_MANIFEST_FLOOR, _ZSTD_MANIFEST_RATIO * stored)


def parse_manifest(
    data: bytes, limit: int | None = None, reason: str | None = None, file_size: int | None = None
) -> Manifest:
    """Validates manifest bytes; raises FormatError on anything out of place.

    Before parsing, the text's nesting depth is checked (at most
    ``_MAX_JSON_DEPTH``), escapes of lone surrogates are refused, and the
    memory the parse needs is estimated from its values and keys and checked
    against the memory budget (``limit``, see rbeformat.budget; ``reason`` says why it is that).
    With ``file_size``, the entries and chunk records are counted before any
    is validated: at most ``record_limit(file_size)``.
    """
    data = bytes(data)
    check_json_text(data, "manifest", limit, reason=reason)
    hook = unique_keys(
        lambda key: FormatError(f"manifest: an object holds the key {key!r:.80} twice (JSON keys must be unique)")
    )
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"manifest: not valid UTF-8 JSON ({str(exc)[:120]})") from None
    require_keys(obj, "manifest", {"format", "version", "producer", "metadata", "tensors", "files"})
    if obj["format"] != "rbe":
        raise FormatError(f"manifest.format: expected 'rbe', found {obj['format']!r:.40}")
    version = obj["version"]
    if not (isinstance(version, list) and len(version) == 2 and all(type(v) is int for v in version)):
        raise FormatError("manifest.version: expected [major, minor]")
    if not isinstance(obj["producer"], str):
        raise FormatError("manifest.producer: expected a string")
    metadata = obj["metadata"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("manifest.metadata: expected an object of strings")
    for key in ("tensors", "files"):
        if not isinstance(obj[key], list) or len(obj[key]) > MAX_ENTRIES:
            raise FormatError(f"manifest.{key}: expected a list of at most {MAX_ENTRIES} entries")
    if file_size is not None and _count_records(obj) > record_limit(file_size):
        raise FormatError(
            f"manifest: {_count_records(obj)} tensors, files and chunks in a {file_size}-byte file; "
            f"a file lists at most one per {_BYTES_PER_RECORD} bytes of its size, or {_RECORD_FLOOR}"
        )
    tensors: dict[str, TensorEntry] = {}
    for i, t in enumerate(obj["tensors"]):
        entry = _parse_tensor(t, f"tensors[{i}]")
        if entry.name in tensors:
            raise FormatError(f"tensors[{i}].name: duplicate tensor name {entry.name!r:.80}")
        tensors[entry.name] = entry
    files: dict[str, FileEntry] = {}
    for i, f in enumerate(obj["files"]):
        entry = _parse_file(f, f"files[{i}]")
        if entry.path in files:
            raise FormatError(f"files[{i}].path: duplicate path {entry.path!r:.80}")
        files[entry.path] = entry
    _check_references(tensors, files)
    return Manifest(tuple(version), obj["producer"], metadata, tensors, files)


def _check_references(tensors: dict[str, TensorEntry], files: dict[str, FileEntry]) -> None:
    for entry in tensors.values():
        if entry.transform is not None:
            _check_codec_references(entry, tensors)
        if entry.alias_of is None:
            continue
        target = tensors.get(entry.alias_of)
        if target is None or target.alias_of is not None:
            raise FormatError(f"tensor {entry.name!r:.80}: alias_of names no stored tensor")
        if (target.dtype, target.shape) != (entry.dtype, entry.shape):
            raise FormatError(f"tensor {entry.name!r:.80}: alias dtype/shape differ from {target.name!r:.80}")
    claimed: set[str] = set()
    for f in files.values():
        for name in f.tensors:
            if name not in tensors:
                raise FormatError(f"file {f.path!r:.80}: lists unknown tensor {name!r:.80}")
            if name.startswith(INTERNAL_PREFIX):
                raise FormatError(f"file {f.path!r:.80}: lists internal tensor {name!r:.80}")
            if name in claimed:
                raise FormatError(f"file {f.path!r:.80}: tensor {name!r:.80} is listed by two safetensors files")
            claimed.add(name)


def _transforms(transform: Transform):
    yield transform
    for part in transform.parts.values():
        if part.transform is not None:
            yield from _transforms(part.transform)


def _check_codec_references(entry: TensorEntry, tensors: dict[str, TensorEntry]) -> None:
    """Tensors a codec reads (a shared base), at any depth of a chain, must be stored,
    untransformed, floating-point internal tensors: that rules out reference cycles."""
    for transform in _transforms(entry.transform):
        for ref in transform.codec.references():
            target = tensors.get(ref)
            if target is None or target.blob is None or not target.internal or target.dtype.name not in LOSSY_DTYPES:
                raise FormatError(
                    f"tensor {entry.name!r:.80}: its codec reads {ref!r:.80}, which is not a stored "
                    f"floating-point internal ('{INTERNAL_PREFIX}') tensor"
                )


def dump_manifest(obj: dict) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def unique_keys(error):
    """A json ``object_pairs_hook`` refusing an object with two equal keys (5.1) instead of keeping the
    last: it raises ``error(key)``."""

    def hook(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set = set()
            raise error(next(k for k, _ in pairs if k in seen or seen.add(k)))
        return obj

    return hook


def check_json_text(
    data: bytes, what: str, limit: int | None = None, error=FormatError, reason: str | None = None
) -> None:
    """Checks untrusted JSON text before json.loads: nesting and lone surrogate escapes (``error``,
    naming ``what``), and the memory the parse needs against the budget (MemoryLimitError)."""
    tokens = _scan_json(data, what, error)
    budget.check(
        _BYTES_PER_JSON_CHAR * len(data) + _BYTES_PER_JSON_TOKEN * tokens,
        f"{what}: parsing {len(data)} bytes of JSON ({tokens} values and keys)",
        limit,
        reason,
    )


def _scan_json(data: bytes, what: str, error) -> int:
    """Checks JSON text before it is parsed; returns how many values and keys it can hold at most.

    Outside strings, every value but the first follows a ``,`` or an opening
    bracket, and every key precedes a ``:``; their count bounds what json
    allocates.  Nesting deeper than ``_MAX_JSON_DEPTH`` and ``\\u`` escapes of
    lone surrogates (which no UTF-8 text can hold) are FormatErrors.  Runs in
    blocks, with a few bytes of memory per byte of one block.
    """
    text = data
    if b"\\" in text:  # escaped backslashes, then escaped quotes, out: every quote left delimits a string
        text = text.replace(b"\\\\", b"")
        if _LONE_SURROGATE.search(_SURROGATE_PAIR.sub(b"", text)):
            raise error(
                f"{what}: a string holds a lone surrogate escape (\\ud800-\\udfff unpaired); "
                "JSON text must be valid UTF-8"
            )
        text = text.replace(b'\\"', b"")
    tokens, depth, deepest, inside = 1, 0, 0, 0
    for start in range(0, len(text), _SCAN_BLOCK):
        block = np.frombuffer(text, np.uint8, min(_SCAN_BLOCK, len(text) - start), start)
        quotes = block == ord('"')
        outside = ((np.cumsum(quotes, dtype=np.int32) + inside) & 1) == 0  # a closing quote counts as outside
        inside = (inside + int(np.count_nonzero(quotes))) & 1
        opens = outside & ((block == ord("[")) | (block == ord("{")))
        closes = outside & ((block == ord("]")) | (block == ord("}")))
        tokens += int(np.count_nonzero(opens))
        tokens += int(np.count_nonzero(outside & ((block == ord(",")) | (block == ord(":")))))
        if opens.any():
            level = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int32) + depth
            deepest = max(deepest, int(level.max()))
            depth = int(level[-1])
        else:
            depth -= int(np.count_nonzero(closes))
        if deepest > _MAX_JSON_DEPTH:
            raise error(f"{what}: JSON nested more than {_MAX_JSON_DEPTH} levels deep")
    return tokens
