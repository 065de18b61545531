"""The lazy, validating reader.

Opening a file reads the footer and the manifest and checks every byte range
against the file before anything else happens; tensors are decoded one at a
time, on demand, their chunks in parallel.

>>> with safe_open("model.rbe") as f:                          # doctest: +SKIP
...     w = f.get_tensor("encoder.layer.0.attention.self.query.weight")
"""

from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import zstandard

from .errors import ChecksumError, FormatError, RbeError, UnsupportedError
from .layout import MANIFEST_ZSTD, crc32, unpack_footer, unpack_header
from .manifest import Blob, FileEntry, Manifest, TensorEntry, Transform, blobs_of, parse_manifest
from .values import from_float32, to_float32
from .codecs.raw import Raw
from .spec import ALIGNMENT, FOOTER_SIZE, HEADER_SIZE, MAX_MANIFEST_BYTES

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_PAGE = mmap.PAGESIZE


class Reader:
    """An open rbe file.  Use as a context manager, or call close()."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, verify_checksums: bool = True):
        self.path = os.fspath(path)
        self.verify_checksums = verify_checksums
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise RbeError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if size < HEADER_SIZE + FOOTER_SIZE:
                raise FormatError(f"{self.path}: {size} bytes is too short for an rbe file")
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._map)
            self.size = size
            self.version = unpack_header(self._buf[:HEADER_SIZE])
            self.manifest = self._read_manifest()
            self._check_layout()
        except BaseException:
            self.close()
            raise
        self._pool: ThreadPoolExecutor | None = None

    # -- opening ---------------------------------------------------------------------
    def _read_manifest(self) -> Manifest:
        footer = unpack_footer(bytes(self._buf[self.size - FOOTER_SIZE :]))
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
        raw = self._buf[footer.manifest_offset : footer.manifest_offset + footer.manifest_length]
        if crc32(raw) != footer.manifest_crc32:
            raise ChecksumError("manifest: checksum mismatch; the file is damaged")
        if footer.manifest_encoding == MANIFEST_ZSTD:
            raw = _inflate_manifest(raw)
        return parse_manifest(raw)

    def _check_layout(self) -> None:
        """Sections must lie between header and manifest, aligned, and never overlap."""
        limit = self.footer.manifest_offset
        spans = []
        for where, c in self.manifest.chunks():
            if c.offset < HEADER_SIZE or c.offset + c.length > limit:
                raise FormatError(f"{where}: bytes [{c.offset}, {c.offset + c.length}) lie outside the data area")
            spans.append((c.offset, c.offset + c.length, where))
        spans.sort()
        for (s0, e0, w0), (s1, e1, w1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise FormatError(f"{w1}: overlaps {w0}")

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown()
            self._pool = None
        if getattr(self, "_buf", None) is not None:
            self._buf.release()
            self._buf = None
        if getattr(self, "_map", None) is not None:
            try:
                self._map.close()
            except BufferError:  # a raw tensor view is still alive; the map closes with it
                pass
            self._map = None
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
            raise RbeError(f"{self.path}: no tensor named {name!r}") from None

    def stored_entry(self, name: str) -> TensorEntry:
        """The entry holding the data of ``name`` (its alias target, if it is an alias)."""
        entry = self.entry(name)
        return self.manifest.tensors[entry.alias_of] if entry.alias_of else entry

    def get_tensor(self, name: str) -> np.ndarray:
        """Decodes one tensor to a numpy array (bf16 as uint16, fp8 as uint8).

        A tensor stored through a lossy codec chain comes back dense, in its dtype.
        """
        entry = self.entry(name)
        data = self.tensor_bytes(name)
        return np.frombuffer(data, np.dtype(entry.dtype.numpy_storage)).reshape(entry.shape)

    def tensor_bytes(self, name: str) -> memoryview:
        """The little-endian bytes of one tensor, decoded."""
        stored = self.stored_entry(name)
        where = f"tensor {stored.name!r}"
        if stored.transform is not None:
            values = self._decode_transform(stored.transform, stored.dtype, stored.shape, where)
            return memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        return memoryview(self._decode_blob(stored.blob, where))

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
        refs = {ref: to_float32(self.get_tensor(ref), self.entry(ref).dtype.name)
                for ref in transform.codec.references()}
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
        entry = self.manifest.files.get(path)
        if entry is None:
            raise RbeError(f"{self.path}: no embedded file {path!r}")
        return self._decode_blob(entry.blob, f"file {path!r}").tobytes()

    # -- decoding --------------------------------------------------------------------
    def _payload(self, chunk, where: str) -> memoryview:
        payload = self._buf[chunk.offset : chunk.offset + chunk.length]
        if self.verify_checksums and crc32(payload) != chunk.crc32:
            raise ChecksumError(f"{where}: checksum mismatch at bytes {chunk.offset}..{chunk.offset + chunk.length}")
        return payload

    def _release(self, first: int, last: int) -> None:
        """Drops the pages of the file bytes [first, last) from this process's mapping.

        Without it, reading a whole model through the mmap leaves every page of
        the file resident in the process (RSS grows to the file size), and one
        large tensor keeps all its compressed pages until it is done.  The
        pages stay in the OS cache; a later read maps them again.
        """
        if _MADV_DONTNEED is None or last - first < 16 * _PAGE:
            return  # not worth a system call
        start = first // _PAGE * _PAGE
        end = min(-(-last // _PAGE) * _PAGE, self.size)
        try:
            self._map.madvise(_MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        return self._pool

    def _decode_blob(self, blob: Blob, where: str) -> np.ndarray:
        if blob.codec is None:
            raise UnsupportedError(f"{where}: {blob.unsupported}")
        itemsize = blob.dtype.itemsize
        if isinstance(blob.codec, Raw) and len(blob.chunks) == 1 and not self.verify_checksums:
            c = blob.chunks[0]
            return np.frombuffer(self._buf, np.uint8, c.length, c.offset)
        try:
            out = np.empty(blob.items * itemsize, dtype=np.uint8)
        except MemoryError:
            raise RbeError(f"{where}: not enough memory to decode its {blob.items * itemsize} bytes") from None
        jobs, start = [], 0
        for i, c in enumerate(blob.chunks):
            jobs.append((c, out[start : start + c.items * itemsize], f"{where} chunk {i}"))
            start += c.items * itemsize

        def run(job):
            chunk, target, chunk_where = job
            try:
                blob.codec.decode_chunk(self._payload(chunk, chunk_where), chunk.params, blob.dtype,
                                        memoryview(target), chunk_where)
            except RbeError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as exc:
                raise FormatError(f"{chunk_where}: malformed chunk ({type(exc).__name__}: {exc})") from None
            self._release(chunk.offset, chunk.offset + chunk.length)  # a page shared with a neighbour just maps again

        if len(jobs) > 1 and self.threads > 1:
            for _ in self._thread_pool().map(run, jobs):
                pass
        else:
            for job in jobs:
                run(job)
        return out

    def verify(self, deep: bool = False) -> Iterator[str]:
        """Checks every checksum, padding byte and (with ``deep``) every digest.

        Yields one problem description per damaged section; yields nothing for a
        sound file.
        """
        covered = [(0, HEADER_SIZE)]
        for where, c in self.manifest.chunks():
            covered.append((c.offset, c.offset + c.length))
            if crc32(self._buf[c.offset : c.offset + c.length]) != c.crc32:
                yield f"{where}: checksum mismatch (bytes {c.offset}..{c.offset + c.length})"
        m0 = self.footer.manifest_offset
        covered.append((m0, m0 + self.footer.manifest_length))
        covered.append((self.size - FOOTER_SIZE, self.size))
        covered.sort()
        pos = 0
        for start, end in covered:
            if start > pos and any(self._buf[pos:start]):
                yield f"padding: nonzero bytes in [{pos}, {start})"
            pos = max(pos, end)
        if deep:
            yield from self._verify_digests()

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
                data = self._decode_blob(blob, where)
            except RbeError as exc:
                yield str(exc)
                continue
            if "sha256:" + hashlib.sha256(data).hexdigest() != blob.digest:
                yield f"{where}: decoded bytes do not match the recorded sha256 digest"


def _inflate_manifest(frame) -> bytes:
    """A zstd-stored manifest, its declared size checked against the cap first."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise FormatError(f"manifest: not a zstd frame ({exc})") from None
    if not 0 <= size <= MAX_MANIFEST_BYTES:
        raise FormatError(f"manifest: declares {size} decoded bytes (limit {MAX_MANIFEST_BYTES}, size required)")
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"manifest: corrupt zstd frame ({exc})") from None
    if len(data) != size:
        raise FormatError(f"manifest: decoded to {len(data)} bytes, declared {size}")
    return data


def safe_open(path: str | os.PathLike, framework: str = "numpy", **kwargs) -> Reader:
    """Opens an rbe file lazily, like ``safetensors.safe_open``; numpy only."""
    if framework not in ("numpy", "np"):
        raise RbeError(f"framework {framework!r} is not supported by rbeformat; use rbe_loaders for torch")
    return Reader(path, **kwargs)
