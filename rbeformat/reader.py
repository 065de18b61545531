"""The lazy, validating reader.

Opening a file reads the footer and the manifest and checks every byte range
against the file before anything else happens; tensors are decoded one at a
time, on demand, their chunks in parallel.

Sections are read with positional reads (``os.pread``), not through a memory
map: a file that shrinks while it is read (another program truncating or
rewriting it) ends in a ``FormatError`` naming the file, where a mapping would
kill the process with SIGBUS.  Only ``map_raw=True`` maps the file, to hand out
raw tensors as read-only views of it without reading them; there a file that
shrinks underneath is the caller's risk, as with any mmap.

>>> with Reader("model.rbe") as f:                             # doctest: +SKIP
...     w = f.get_tensor("encoder.layer.0.attention.self.query.weight")
...     rows = f.get_slice("encoder.layer.0.attention.self.query.weight")[:16]

``rbeformat.safe_open`` (in api.py) opens the same reader for numpy or torch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard

from . import budget
from .codecs.blob.raw import Raw
from .codecs.core.base import require_keys
from .errors import (
    ChecksumError,
    EmbeddedFileNotFoundError,
    FileMissingError,
    FormatError,
    RbeError,
    TensorNotFoundError,
    UnsupportedError,
    UsageError,
)
from .layout import MANIFEST_ZSTD, crc32, unpack_footer, unpack_header
from .manifest import Blob, FileEntry, Manifest, TensorEntry, Transform, blobs_of, inflate_limit, parse_manifest
from .spec import ALIGNMENT, FOOTER_SIZE, HEADER_SIZE, MAX_MANIFEST_BYTES, DType
from .values import CONVERT_BLOCK, from_float32, to_float32

_READ_BLOCK = 16 << 20  # verify() reads large sections in blocks of this size
# Decoding a compressed chunk holds its stored bytes and up to this many
# copies of its decoded size (zstd's output; byteplane's planes and split runs).
_CHUNK_COPIES = 3
# Memory a decode may hold beyond what the estimates name (small arrays, dicts).
DECODE_SLACK = 1 << 20
# Streaming (iter_file, iter_tensor_bytes, verify) decodes chunks in batches of
# about this many bytes, a batch's chunks in parallel.
_STREAM_BYTES = 64 << 20
# read_file holds an embedded file in memory twice (decoded, then as bytes):
# it reads files up to this size; iter_file streams any size.
READ_FILE_CAP = 1 << 30


def _naming_the_file(method):
    """A damaged file's FormatError from ``method`` names the file: a caller reading several sees which."""

    @functools.wraps(method)
    def named(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except FormatError as exc:
            _name_the_file(exc, self.path)
            raise

    return named


class Reader:
    """An open rbe file.  Use as a context manager, or call close().

    ``map_raw=True`` returns each single-chunk ``raw`` tensor as a read-only
    view of the memory-mapped file instead of a copy (its checksum is still
    checked unless ``verify_checksums=False``, which then reads nothing): if
    the file is truncated while such a view is alive, touching it raises
    SIGBUS, which no reader can turn into an error.

    ``max_memory`` (bytes) bounds what the file's numbers may make the reader
    allocate at once: the parsed manifest, one decoded tensor with its parts
    and the codec's working memory, an embedded file read whole.  Without it,
    ``rbeformat.budget.container_limit`` applies (the process's ``set_limit``,
    else a share of the available memory, tied to the file's size).  Going
    over raises ``budget.MemoryLimitError`` before anything is allocated.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        verify_checksums: bool = True,
        map_raw: bool = False,
        max_memory: int | None = None,
    ):
        self.path = os.fspath(path)
        self.verify_checksums = verify_checksums
        self.map_raw = map_raw
        self._map = None
        self.chunks_decoded = 0  # chunks read so far: shows that a slice reads only the chunks it needs
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        try:
            self._fh = open(self.path, "rb")
        except FileNotFoundError as exc:  # also a FileNotFoundError, as open() raises
            raise FileMissingError(f"{self.path}: cannot open ({exc.strerror})", self.path) from None
        except OSError as exc:
            raise RbeError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if size < HEADER_SIZE + FOOTER_SIZE:
                raise FormatError(f"{self.path}: {size} bytes is too short for an rbe file")
            self._fd = self._fh.fileno()
            self.size = size
            self._explicit_memory = max_memory
            self.max_memory = budget.container_limit(size, max_memory)
            self._memory_reason = budget.container_reason(size, max_memory)
            self.version = unpack_header(self._read(0, HEADER_SIZE))
            self.manifest = self._read_manifest()
            self._check_layout()
        except FormatError as exc:
            self.close()
            _name_the_file(exc, self.path)
            raise
        except BaseException:
            self.close()
            raise
        self._pool: ThreadPoolExecutor | None = None

    # -- opening ---------------------------------------------------------------------
    def _read_manifest(self) -> Manifest:
        footer = unpack_footer(self._read(self.size - FOOTER_SIZE, FOOTER_SIZE))
        self.footer = footer
        end = self.size - FOOTER_SIZE
        if self.size % ALIGNMENT:
            raise FormatError(f"file size {self.size} is not a multiple of {ALIGNMENT}; the file is truncated")
        if footer.manifest_length > MAX_MANIFEST_BYTES:
            raise FormatError(f"manifest: {footer.manifest_length} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
        if footer.manifest_offset % ALIGNMENT or not HEADER_SIZE <= footer.manifest_offset <= end:
            raise FormatError(f"manifest: offset {footer.manifest_offset} is misaligned or outside the file")
        if footer.manifest_offset + footer.manifest_length > end:
            raise FormatError("manifest: runs past the footer")
        if end - (footer.manifest_offset + footer.manifest_length) >= ALIGNMENT:
            raise FormatError("manifest: unexplained bytes between the manifest and the footer")
        raw = self._read(footer.manifest_offset, footer.manifest_length)
        if crc32(raw) != footer.manifest_crc32:
            raise ChecksumError("manifest: checksum mismatch; the file is damaged")
        if footer.manifest_encoding == MANIFEST_ZSTD:
            raw = inflate_manifest(raw, self.max_memory)
        limit = budget.manifest_limit(self.size, self._explicit_memory)
        reason = None if limit == self.max_memory else f"the default for the manifest of a {self.size}-byte file"
        return parse_manifest(raw, limit, reason or self._memory_reason, self.size)

    def _check_layout(self) -> None:
        """Sections must lie between header and manifest, aligned, and never overlap."""
        limit = self.footer.manifest_offset
        spans = []
        for where, c in self.manifest.chunks():
            if c.offset < HEADER_SIZE or c.offset + c.length > limit:
                raise FormatError(f"{where}: bytes [{c.offset}, {c.offset + c.length}) lie outside the data area")
            spans.append((c.offset, c.offset + c.length, where))
        spans.sort()
        for (_, e0, w0), (s1, _, w1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise FormatError(f"{w1}: overlaps {w0}")

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown()
            self._pool = None
        for attribute, close in (("_view", "release"), ("_map", "close")):
            held = getattr(self, attribute, None)
            if held is not None:
                try:
                    getattr(held, close)()
                except BufferError:  # a raw tensor view is still alive; the map closes with it
                    pass
                setattr(self, attribute, None)
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None

    # -- the safetensors-like surface ------------------------------------------------
    def keys(self) -> list[str]:
        """The model's tensor names (internal ``rbe:`` tensors that serve codecs are left out)."""
        return [name for name, entry in self.manifest.tensors.items() if not entry.internal]

    def metadata(self) -> dict[str, str]:
        return dict(self.manifest.metadata)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}") from None

    def stored_entry(self, name: str) -> TensorEntry:
        """The entry holding the data of ``name`` (its alias target, if it is an alias)."""
        entry = self.entry(name)
        return self.manifest.tensors[entry.alias_of] if entry.alias_of else entry

    def get_tensor(self, name: str) -> np.ndarray:
        """Decodes one tensor to a numpy array (bf16 as uint16, fp8 as uint8).

        A tensor stored through a lossy codec chain comes back dense, in its dtype.
        """
        return self._convert(self._array(name), self.entry(name).dtype)

    def get_slice(self, name: str) -> TensorSlice:
        """A lazy view of one tensor, like safetensors' ``get_slice``: index it to decode a part."""
        self.entry(name)  # an unknown name fails here, not at the first index
        return TensorSlice(self, name)

    def _array(self, name: str) -> np.ndarray:
        entry = self.entry(name)
        data = self.tensor_bytes(name)
        return np.frombuffer(data, np.dtype(entry.dtype.numpy_storage)).reshape(entry.shape)

    def _convert(self, array: np.ndarray, dtype: DType):
        """Turns a decoded numpy array into the framework's tensor; numpy needs nothing.

        ``safe_open(framework="pt")`` returns a subclass (rbeformat/api.py) that
        overrides it, so that this module never imports a framework.
        """
        return array

    def _rows(self, name: str, first: int, stop: int) -> np.ndarray:
        """Rows [first, stop) of a tensor's first axis, decoding only the chunks that hold them.

        A tensor stored through a codec chain is decoded whole and then cut: its
        rows are not laid out chunk by chunk.  An alias reads its target's chunks.
        """
        entry, stored = self.entry(name), self.stored_entry(name)
        if stored.blob is None:
            return self._array(name)[first:stop]
        row = math.prod(entry.shape[1:])
        data = self._decode_blob(stored.blob, f"tensor {stored.name!r}", first * row, stop * row)
        return np.frombuffer(data, np.dtype(entry.dtype.numpy_storage)).reshape((stop - first, *entry.shape[1:]))

    def tensor_bytes(self, name: str) -> memoryview:
        """The little-endian bytes of one tensor, decoded."""
        stored = self.stored_entry(name)
        where = f"tensor {stored.name!r}"
        if stored.transform is not None:
            self._check_memory(self.transform_memory(stored.transform, stored.dtype, stored.shape), where)
            values = self._decode_transform(stored.transform, stored.dtype, stored.shape, where)
            return memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        return memoryview(self._decode_blob(stored.blob, where))

    def get_part(self, name: str, path: str) -> np.ndarray:
        """One part of a transformed tensor's codec chain, decoded, in the part's dtype storage.

        ``path`` names the part through the chain, dot-separated (``"codes"``,
        ``"values.scales"``); a part that another codec encodes comes back as
        that codec's output.  Runtimes that compute on the codec's own form
        (packed codes and scales rather than the dense tensor) read it this way.
        """
        stored = self.stored_entry(name)
        where = f"tensor {stored.name!r} part {path}"
        transform, part = stored.transform, None
        for step in path.split("."):
            part = transform.parts.get(step) if transform is not None else None
            if part is None:
                raise UsageError(f"{where}: the codec chain has no such part")
            transform = part.transform
        if part.transform is not None:
            self._check_memory(self.transform_memory(part.transform, part.dtype, part.shape), where)
            values = self._decode_transform(part.transform, part.dtype, part.shape, where)
        else:
            values = self._decode_blob(part.blob, where)
        return np.frombuffer(values, np.dtype(part.dtype.numpy_storage)).reshape(part.shape)

    @_naming_the_file
    def _decode_transform(self, transform: Transform, dtype, shape, where: str) -> np.ndarray:
        """Decodes parts (recursively), then the codec; returns the values in dtype's storage."""
        parts = {}
        for pname, part in transform.parts.items():
            pwhere = f"{where} part {pname}"
            if part.transform is not None:
                values = self._decode_transform(part.transform, part.dtype, part.shape, pwhere)
            else:
                values = self._decode_blob(part.blob, pwhere)
            parts[pname] = np.frombuffer(values, np.dtype(part.dtype.numpy_storage)).reshape(part.shape)
        refs = {ref: to_float32(self._array(ref), self.entry(ref).dtype.name) for ref in transform.codec.references()}
        try:
            decoded = transform.codec.decode(parts, transform.params, shape, where, refs)
            if decoded.shape != tuple(shape):
                raise FormatError(f"{where}: codec produced shape {decoded.shape}, expected {tuple(shape)}")
            return from_float32(decoded, dtype.name)
        except MemoryError:
            raise RbeError(f"{where}: not enough memory to decode it") from None
        except RbeError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, ZeroDivisionError) as exc:
            raise FormatError(f"{where}: malformed {transform.codec.name} data ({type(exc).__name__}: {exc})") from None

    def files(self) -> dict[str, FileEntry]:
        return dict(self.manifest.files)

    def read_file(self, path: str) -> bytes:
        """An embedded file's bytes, in memory: for files up to ``READ_FILE_CAP`` (configs, tokenizers).

        ``iter_file`` streams a file of any size.
        """
        entry = self._file_entry(path)
        where = f"file {path!r}"
        if entry.blob.items > READ_FILE_CAP:
            raise budget.MemoryLimitError(
                f"{where}: {entry.blob.items} bytes is more than an embedded file read "
                f"into memory may hold ({READ_FILE_CAP}); stream it with iter_file"
            )
        self._check_memory(entry.blob.items + self.blob_memory(entry.blob), f"{where}: reading it into memory")
        return self._decode_blob(entry.blob, where).tobytes()

    def iter_file(self, path: str, *, verify: bool = True) -> Iterator[memoryview]:
        """An embedded file's bytes in order, a batch of decoded chunks at a time, never the whole file.

        With ``verify`` the SHA-256 digest is checked once the last bytes are
        out: a mismatch raises ChecksumError then, so a caller writing the
        bytes out must discard what it wrote when the iteration raises.
        """
        entry = self._file_entry(path)
        return self._iter_blob(entry.blob, f"file {path!r}", verify)

    def iter_tensor_bytes(self, name: str, *, verify: bool = False) -> Iterator[memoryview]:
        """A tensor's little-endian bytes in order: a stored (or aliased) tensor a batch of chunks at a
        time, a transformed one whole (``tensor_bytes``).  ``verify`` checks a stored tensor's digest
        at the end, as ``iter_file`` does."""
        stored = self.stored_entry(name)
        if stored.blob is None:
            yield self.tensor_bytes(name)
            return
        yield from self._iter_blob(stored.blob, f"tensor {stored.name!r}", verify)

    def _file_entry(self, path: str) -> FileEntry:
        entry = self.manifest.files.get(path)
        if entry is None:
            raise EmbeddedFileNotFoundError(f"{self.path}: no embedded file {path!r}")
        return entry

    def _iter_blob(self, blob: Blob, where: str, verify: bool) -> Iterator[memoryview]:
        try:
            yield from self._iter_blob_unnamed(blob, where, verify)
        except FormatError as exc:
            _name_the_file(exc, self.path)
            raise

    def _iter_blob_unnamed(self, blob: Blob, where: str, verify: bool) -> Iterator[memoryview]:
        if blob.codec is None:
            raise UnsupportedError(f"{where}: {blob.unsupported}")
        hasher = hashlib.sha256() if verify and blob.digest is not None else None
        start = first = 0
        for chunk in blob.chunks:
            start += chunk.items
            if (start - first) * blob.dtype.itemsize >= _STREAM_BYTES or start == blob.items:
                data = memoryview(self._decode_blob(blob, where, first, start)).cast("B")
                if hasher is not None:
                    hasher.update(data)
                yield data
                first = start
        if hasher is not None and "sha256:" + hasher.hexdigest() != blob.digest:
            raise ChecksumError(f"{where}: decoded bytes do not match the recorded sha256 digest")

    # -- memory ----------------------------------------------------------------------
    def _check_memory(self, nbytes: int, where: str) -> None:
        budget.check(nbytes + DECODE_SLACK, where, self.max_memory, self._memory_reason)

    def blob_memory(self, blob: Blob, first: int = 0, stop: int | None = None) -> int:
        """Bytes that decoding elements [first, stop) of a blob holds at once: the chunks it needs, and
        for chunks decoded in parallel their stored bytes and the codec's working copies."""
        stop = blob.items if stop is None else stop
        selected, span_first, span_stop = _chunks_in_range(blob, first, stop)
        total = (span_stop - span_first) * blob.dtype.itemsize
        if selected and not isinstance(blob.codec, Raw):
            worst = max(c.length + _CHUNK_COPIES * c.items * blob.dtype.itemsize for _, c in selected)
            total += worst * min(self.threads, len(selected))
        return total

    def transform_memory(self, transform: Transform, dtype: DType, shape: tuple[int, ...]) -> int:
        """Bytes that decoding a transformed tensor (or part) holds at once, at its peak.

        Its parts are decoded one after the other and kept; then the tensors
        the codec reads (a shared base) in float32; then the codec decodes
        (``TensorCodec.decode_memory``: its working memory and float32
        result); then the result is converted to ``dtype``.
        """
        held = peak = 0
        for part in transform.parts.values():
            if part.transform is not None:
                need = self.transform_memory(part.transform, part.dtype, part.shape)
            else:
                need = self.blob_memory(part.blob)
            peak = max(peak, held + need)
            held += math.prod(part.shape) * part.dtype.itemsize
        for ref in transform.codec.references():
            target = self.manifest.tensors[ref]  # a stored internal tensor: the manifest checked it
            n = math.prod(target.shape)
            peak = max(peak, held + self.blob_memory(target.blob) + 8 * n)
            held += 4 * n
        n = math.prod(shape)
        convert = {"F32": 0, "F64": 8 * n, "F16": 2 * n}.get(dtype.name, 2 * n + 16 * min(n, CONVERT_BLOCK))
        decode = transform.codec.decode_memory(transform.params, tuple(shape))
        return max(peak, held + decode, held + 4 * n + convert)

    # -- reading -------------------------------------------------------------------
    def _read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the file, read now; FormatError if the file has shrunk."""
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        parts, got = [data], len(data)
        while got < length and data:  # a regular file returns at most ~2 GiB per call
            data = os.pread(self._fd, length - got, offset + got)
            parts.append(data)
            got += len(data)
        if got < length:
            self._truncated(offset, length)
        return b"".join(parts)

    def _read_into(self, offset: int, target: memoryview) -> None:
        """Fills ``target`` with the file's bytes from ``offset``, with no intermediate copy."""
        target = memoryview(target).cast("B")
        got = 0
        while got < len(target):
            n = os.preadv(self._fd, [target[got:]], offset + got)
            if n == 0:
                self._truncated(offset, len(target))
            got += n

    def _truncated(self, offset: int, length: int):
        try:
            now = f"; it now holds {os.fstat(self._fd).st_size} bytes"
        except OSError:
            now = ""
        raise FormatError(
            f"{self.path}: file changed or truncated while reading (bytes {offset}..{offset + length} "
            f"of the {self.size} it held when opened{now})"
        )

    @property
    def _buf(self) -> memoryview:
        """The whole file, memory-mapped on first use: only ``map_raw`` views (and tests) use it."""
        if self._map is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
        return self._view

    # -- decoding --------------------------------------------------------------------
    def _payload(self, chunk, where: str) -> memoryview:
        payload = self._read(chunk.offset, chunk.length)
        if self.verify_checksums and crc32(payload) != chunk.crc32:
            raise ChecksumError(f"{where}: checksum mismatch at bytes {chunk.offset}..{chunk.offset + chunk.length}")
        return memoryview(payload)

    def _raw_chunk(self, chunk, target: memoryview, where: str) -> None:
        """A raw chunk, read straight into its place in the output (what ``Raw.decode_chunk`` would copy)."""
        require_keys(chunk.params, f"{where}.params", set())
        if chunk.length != len(target):
            raise FormatError(f"{where}: raw chunk holds {chunk.length} bytes, expected {len(target)}")
        self._read_into(chunk.offset, target)
        if self.verify_checksums and crc32(target) != chunk.crc32:
            raise ChecksumError(f"{where}: checksum mismatch at bytes {chunk.offset}..{chunk.offset + chunk.length}")

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        return self._pool

    @_naming_the_file
    def _decode_blob(self, blob: Blob, where: str, first: int = 0, stop: int | None = None) -> np.ndarray:
        """The bytes of elements [first, stop) of a blob (all of them by default).

        Chunks are runs of elements, so only the chunks overlapping the range
        are decoded; the result is cut from them.
        """
        if blob.codec is None:
            raise UnsupportedError(f"{where}: {blob.unsupported}")
        itemsize = blob.dtype.itemsize
        stop = blob.items if stop is None else stop
        raw = isinstance(blob.codec, Raw)
        if not (raw and len(blob.chunks) == 1 and self.map_raw):
            self._check_memory(self.blob_memory(blob, first, stop), f"{where}: decoding it")
        if raw and len(blob.chunks) == 1 and self.map_raw:
            c = blob.chunks[0]
            if self.verify_checksums and crc32(self._buf[c.offset : c.offset + c.length]) != c.crc32:
                raise ChecksumError(f"{where} chunk 0: checksum mismatch at bytes {c.offset}..{c.offset + c.length}")
            self.chunks_decoded += 1
            return np.frombuffer(self._buf, np.uint8, (stop - first) * itemsize, c.offset + first * itemsize)
        selected, span_first, span_stop = _chunks_in_range(blob, first, stop)
        try:
            out = np.empty((span_stop - span_first) * itemsize, dtype=np.uint8)
        except MemoryError:
            raise RbeError(
                f"{where}: not enough memory to decode {(span_stop - span_first) * itemsize} bytes"
            ) from None
        jobs, start = [], 0
        for i, c in selected:
            jobs.append((c, out[start : start + c.items * itemsize], f"{where} chunk {i}"))
            start += c.items * itemsize
        self.chunks_decoded += len(jobs)

        def run(job):
            chunk, target, chunk_where = job
            try:
                if raw:
                    self._raw_chunk(chunk, memoryview(target), chunk_where)
                else:
                    blob.codec.decode_chunk(
                        self._payload(chunk, chunk_where), chunk.params, blob.dtype, memoryview(target), chunk_where
                    )
            except RbeError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as exc:
                raise FormatError(f"{chunk_where}: malformed chunk ({type(exc).__name__}: {exc})") from None

        if len(jobs) > 1 and self.threads > 1:
            for _ in self._thread_pool().map(run, jobs):
                pass
        else:
            for job in jobs:
                run(job)
        if (span_first, span_stop) == (first, stop):
            return out
        return out[(first - span_first) * itemsize : (stop - span_first) * itemsize]

    def verify(self, deep: bool = False) -> Iterator[str]:
        """Checks every checksum, padding byte and (with ``deep``) every digest.

        Yields one problem description per damaged section; yields nothing for a
        sound file.
        """
        covered = [(0, HEADER_SIZE)]
        for where, c in self.manifest.chunks():
            covered.append((c.offset, c.offset + c.length))
            crc = 0
            for block in self._blocks(c.offset, c.offset + c.length):
                crc = crc32(block, crc)
            if crc != c.crc32:
                yield f"{where}: checksum mismatch (bytes {c.offset}..{c.offset + c.length})"
        m0 = self.footer.manifest_offset
        covered.append((m0, m0 + self.footer.manifest_length))
        covered.append((self.size - FOOTER_SIZE, self.size))
        covered.sort()
        pos = 0
        for start, end in covered:
            if start > pos and any(any(block) for block in self._blocks(pos, start)):
                yield f"padding: nonzero bytes in [{pos}, {start})"
            pos = max(pos, end)
        if deep:
            yield from self._verify_digests()

    def _blocks(self, first: int, stop: int) -> Iterator[bytes]:
        """The file's bytes [first, stop), read in blocks of at most ``_READ_BLOCK``."""
        for offset in range(first, stop, _READ_BLOCK):
            yield self._read(offset, min(_READ_BLOCK, stop - offset))

    def _verify_digests(self) -> Iterator[str]:
        blobs = [(f"tensor {e.name!r}", e.blob) for e in self.manifest.tensors.values() if e.blob]
        for e in self.manifest.tensors.values():
            if e.transform is not None:
                blobs += [(f"tensor {e.name!r} part {path}", blob) for path, blob in blobs_of(e.transform)]
        blobs += [(f"file {f.path!r}", f.blob) for f in self.manifest.files.values()]
        for where, blob in blobs:
            if blob.digest is None:
                continue
            try:
                for _ in self._iter_blob(blob, where, verify=True):  # a batch of chunks at a time
                    pass
            except RbeError as exc:  # a line about this file, as verify's others are: without its name
                yield str(exc).removeprefix(f"{self.path}: ")


def inflate_manifest(frame, max_memory: int | None = None) -> bytes:
    """A zstd-stored manifest, its declared size checked against the caps first."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise FormatError(f"manifest: not a zstd frame ({exc})") from None
    if not 0 <= size <= MAX_MANIFEST_BYTES:
        raise FormatError(f"manifest: declares {size} decoded bytes (limit {MAX_MANIFEST_BYTES}, size required)")
    if size > inflate_limit(len(frame)):
        raise FormatError(
            f"manifest: {len(frame)} bytes of zstd declare {size} decoded bytes, more than a "
            f"manifest expands ({inflate_limit(len(frame))} at most)"
        )
    budget.check(size, "manifest: decompressing it", max_memory)
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"manifest: corrupt zstd frame ({exc})") from None
    if len(data) != size:
        raise FormatError(f"manifest: decoded to {len(data)} bytes, declared {size}")
    return data


def _chunks_in_range(blob: Blob, first: int, stop: int) -> tuple[list, int, int]:
    """The (index, chunk) pairs holding elements [first, stop), and the element span they cover."""
    selected, start, span_first, span_stop = [], 0, first, first
    for i, chunk in enumerate(blob.chunks):
        end = start + chunk.items
        if start < stop and end > first:
            if not selected:
                span_first = start
            span_stop = end
            selected.append((i, chunk))
        start = end
    return selected, span_first, span_stop


class TensorSlice:
    """One tensor of an open file, decoded where it is indexed (``Reader.get_slice``).

    ``sl[a:b]`` on a losslessly stored tensor decodes only the chunks holding
    rows a..b of the first axis (an alias reads its target's chunks); further
    indices (ints, slices with any step, ``...``) are applied to those rows.
    A tensor stored through a codec chain is decoded whole and then cut.  The
    result is a new array (bf16 as uint16, fp8 as uint8, as ``get_tensor``).
    """

    def __init__(self, reader: Reader, name: str):
        self._reader = reader
        self._name = name
        self._entry = reader.entry(name)

    def get_shape(self) -> list[int]:
        return list(self._entry.shape)

    def get_dtype(self) -> str:
        """The safetensors dtype name (``F32``, ``BF16``, ...)."""
        return self._entry.dtype.name

    def __getitem__(self, key):
        where = f"tensor {self._name!r}"
        index = _full_index(key, self._entry.shape, where)
        if index:
            first, stop, local = _row_range(index[0], self._entry.shape[0], where)
            rows, index = self._reader._rows(self._name, first, stop), (local, *index[1:])
        else:  # a 0-d tensor
            rows = self._reader._array(self._name)
        try:
            part = rows[index]
        except (IndexError, TypeError, ValueError) as exc:
            raise UsageError(f"{where}: invalid index {key!r} for shape {self.get_shape()} ({exc})") from None
        return self._reader._convert(np.array(part, order="C"), self._entry.dtype)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _full_index(key, shape: tuple[int, ...], where: str) -> tuple:
    """``key`` as one int or slice per axis: ``...`` expanded, missing axes taken whole."""
    key = key if isinstance(key, tuple) else (key,)
    for k in key:
        if not (k is Ellipsis or isinstance(k, slice) or _is_int(k)):
            raise UsageError(f"{where}: can index with ints, slices and ... only, not {type(k).__name__}")
    ellipses = [i for i, k in enumerate(key) if k is Ellipsis]
    if len(ellipses) > 1:
        raise UsageError(f"{where}: an index can hold only one ...")
    if ellipses:
        i = ellipses[0]
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    if len(key) > len(shape):
        raise UsageError(f"{where}: {len(key)} indices for a tensor of {len(shape)} dimensions")
    return key + (slice(None),) * (len(shape) - len(key))


def _row_range(index, length: int, where: str) -> tuple[int, int, int | slice]:
    """The rows [first, stop) an axis-0 index touches, and the index to apply to them."""
    if _is_int(index):
        row = int(index) + length if index < 0 else int(index)
        if not 0 <= row < length:
            raise UsageError(f"{where}: index {index} is out of range for axis 0 of size {length}")
        return row, row + 1, 0
    try:
        rows = range(*index.indices(length))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: invalid slice {index!r} ({exc})") from None
    if not rows:
        return 0, 0, slice(0, 0)
    first, stop = min(rows), max(rows) + 1
    local_stop = rows.stop - first  # negative only for a negative step running to row `first`
    return first, stop, slice(rows.start - first, local_stop if local_stop >= 0 else None, rows.step)


def _name_the_file(exc: FormatError, path: str) -> None:
    """Starts the error's message with the file's name (as the command line prints it), unless it does."""
    if len(exc.args) == 1 and not str(exc).startswith(f"{path}: "):
        exc.args = (f"{path}: {exc.args[0]}",)
