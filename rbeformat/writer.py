"""The streaming writer: one pass, bounded memory, atomic output.

Sections are appended as chunks are encoded; the manifest and the footer come
last, so nothing is held back.  The file is written under a temporary name in
the target's directory and renamed into place only when complete, so a crash
or a kill leaves no partial file at the destination.

>>> with Writer("model.rbe") as w:                             # doctest: +SKIP
...     w.add_array("weight", np.ones((4, 4), np.float32))
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import zstandard as zstd_codec

from ._version import __version__
from .codecs.blob.byteplane import Byteplane
from .codecs.blob.zstd import Zstd
from .codecs.core.base import Codec
from .codecs.util.parallel import default_threads
from .encoding import EncodedTensor, encode_transformed, encoded_chunks, part_codec, transformed_key
from .errors import InputError, OutputExistsError, RbeError, UsageError
from .layout import MANIFEST_JSON, MANIFEST_ZSTD, crc32, pack_footer, pack_header
from .manifest import INTERNAL_PREFIX, LOSSY_DTYPES, check_name, check_relative_path, dump_manifest
from .publish import rename_noreplace
from .spec import (
    ALIGNMENT,
    DTYPES,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    MAX_MANIFEST_BYTES,
    MAX_NDIM,
    align_up,
    dtype_of_numpy,
)

if TYPE_CHECKING:
    from .chain import Chain
    from .codecs.core.tensor import Calibration

ReadAt = Callable[[int, int], bytes]  # read(offset, size) -> exactly size bytes


class Writer:
    """Writes an rbe file.  States: open -> closed (committed) or aborted."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        force: bool = False,
        codec: Codec | None = None,
        threads: int | None = None,
        progress: Callable[[int], None] | None = None,
    ):
        # ``progress`` gets the bytes of each model tensor as it is consumed (aliases and
        # transformed tensors included, densely); internal tensors, codec parts and embedded
        # files are not counted, so the calls add up to the input's tensor bytes.
        self.path = os.fspath(path)
        if os.path.islink(self.path):
            raise OutputExistsError(
                f"{self.path}: is a symbolic link; rbe replaces no link and writes through "
                "none: remove it, or name the file it points to"
            )
        if os.path.exists(self.path) and not force:
            raise OutputExistsError(f"{self.path}: exists; pass force=True (--force) to overwrite it")
        self.force = force
        self.codec = codec or Byteplane()
        self.threads = threads or default_threads()
        self.progress = progress
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".partial", dir=directory)
        os.fchmod(fd, default_file_mode())  # mkstemp's 0600 would outlive the rename
        self._file = os.fdopen(fd, "wb")
        self._pos = 0
        self._tensors: list[dict] = []
        self._files: list[dict] = []
        self._names: set[str] = set()
        self._paths: set[str] = set()
        self._digests: dict[tuple, str] = {}
        self._metadata: dict[str, str] = {}
        self._input_stats: dict[str, dict] = {}  # tensor name -> what its input had lost (set_input_stats)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._later: deque = deque()  # (name, resolve) of tensors encoded elsewhere, in order
        self._state = "open"
        self.keep_partial = False  # abort() leaves the partial file for a resume (``checkpoint``)
        self._write(pack_header())

    # -- resuming --------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """What ``resume`` needs to go on from here: the partial file's name and length, synced to
        disk, and the entries written so far.  From now on an abort leaves the partial file."""
        self._require_open()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.keep_partial = True
        return {
            "partial": os.path.basename(self._tmp),
            "length": self._pos,
            "tensors": self._tensors,
            "files": self._files,
            "names": sorted(self._names),
            "paths": sorted(self._paths),
            "digests": [[key[0], list(key[1]), *key[2:], name] for key, name in self._digests.items()],
        }

    def resume(self, state: dict) -> None:
        """Continues the partial file a ``checkpoint`` described, in place of the new one this writer
        began (removed): cut back to the checkpoint's length, its entries restored.  InputError when
        the partial file is missing, shorter, or not a plain file of this output's."""
        self._require_open()
        name = state.get("partial")
        prefix = f".{os.path.basename(self.path)}."
        if not (isinstance(name, str) and name.startswith(prefix) and name.endswith(".partial") and "/" not in name):
            raise InputError(f"{self.path}: the resume state names no partial file of this output")
        path = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        length = state.get("length")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InputError(f"{path}: cannot reopen the partial file to resume ({exc.strerror})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not isinstance(length, int) or not 0 < length <= info.st_size:
            os.close(fd)
            raise InputError(f"{path}: the partial file is not the one the resume state describes")
        self._file.close()
        os.unlink(self._tmp)
        os.ftruncate(fd, length)
        os.lseek(fd, length, os.SEEK_SET)
        self._file, self._tmp, self._pos = os.fdopen(fd, "wb"), path, length
        self._tensors, self._files = list(state["tensors"]), list(state["files"])
        self._names, self._paths = set(state["names"]), set(state["paths"])
        self._digests = {(k[0], tuple(k[1]), *k[2:-1]): k[-1] for k in state["digests"]}
        self.keep_partial = True

    @property
    def partial_name(self) -> str:
        """The name of the hidden file this writer writes beside the output until it is complete."""
        return os.path.basename(self._tmp)

    def has(self, name: str) -> bool:
        """Whether a tensor of this name is written (resumed conversions skip it)."""
        return name in self._names

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- low level -------------------------------------------------------------------
    def _require_open(self) -> None:
        self._check_open()
        self.flush_later()  # whatever comes next goes after the tensors handed out before it

    def _check_open(self) -> None:
        if self._state != "open":
            raise RbeError(f"writer is {self._state}; no more entries can be added")

    def _write(self, data) -> None:
        self._file.write(data)
        self._pos += len(data)

    def _pad(self) -> None:
        self._write(b"\x00" * (align_up(self._pos) - self._pos))

    def _section(self, parts: list[bytes]) -> tuple[int, int, int]:
        self._pad()
        offset, crc, length = self._pos, 0, 0
        for part in parts:
            crc = crc32_update(crc, part)
            length += len(part)
            self._write(part)
        return offset, length, crc

    def _encode_chunks(
        self, codec: Codec, dtype_name: str, items: int, read_at: ReadAt, digest: Any, report: bool = False
    ) -> list[dict]:
        """Encodes the items in chunks (``window`` at once on the pool) and writes each as it is done."""
        chunks: list[dict] = []
        width = DTYPES[dtype_name].itemsize
        for n, sections, params in encoded_chunks(
            codec, dtype_name, items, read_at, digest, self._pool, 2 * self.threads
        ):
            chunks.append({**self._placed(sections), "items": n, "params": params})
            if report and self.progress:
                self.progress(n * width)
        return chunks

    def _placed(self, sections: list[bytes]) -> dict:
        offset, length, crc = self._section(sections)
        return {"offset": offset, "length": length, "crc32": crc}

    def _place(self, node: dict) -> None:
        """Writes the kept sections of an encoded node (``encoding.keep_sections``) in the order they
        were encoded, depth first through its parts, each chunk record then saying where they lie."""
        for chunk in node.get("chunks", ()):
            sections = chunk.pop("sections")
            placed = self._placed(sections)
            items, params = chunk.pop("items"), chunk.pop("params")
            chunk.update(placed, items=items, params=params)
        for part in node.get("parts", {}).values():
            self._place(part)

    # -- entries ---------------------------------------------------------------------
    def add_tensor(
        self,
        name: str,
        dtype: str,
        shape: Iterable[int],
        read_at: ReadAt,
        *,
        codec: Codec | None = None,
        dedup: bool = True,
        internal: bool = False,
    ) -> str | None:
        """Adds a tensor whose little-endian bytes ``read_at(offset, size)`` returns.

        With ``dedup`` a tensor equal (dtype, shape, bytes) to one already written
        becomes an alias of it.  Returns the name it aliases, or None.
        """
        self._require_open()
        name = self._claim_name(name, internal)
        if dtype not in DTYPES:
            raise InputError(f"tensor {name!r}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        shape = [int(d) for d in shape]
        if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
            raise InputError(f"tensor {name!r}: invalid shape {shape}")
        items = math.prod(shape)
        codec = (codec or self.codec).for_dtype(DTYPES[dtype], items)
        if dedup:
            digest = _digest(read_at, items * DTYPES[dtype].itemsize)
            key = (dtype, tuple(shape), digest)
            if key in self._digests:
                target = self._digests[key]
                self._tensors.append({"name": name, "dtype": dtype, "shape": shape, "alias_of": target})
                if self.progress and not internal:
                    self.progress(items * DTYPES[dtype].itemsize)
                return target
            chunks = self._encode_chunks(codec, dtype, items, read_at, None, report=not internal)
            self._digests[key] = name
        else:
            hasher = hashlib.sha256()
            chunks = self._encode_chunks(codec, dtype, items, read_at, hasher, report=not internal)
            digest = "sha256:" + hasher.hexdigest()
        self._tensors.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": shape,
                "digest": digest,
                "codec": codec.describe(),
                "chunks": chunks,
            }
        )
        return None

    def add_transformed(
        self,
        name: str,
        dtype: str,
        array: np.ndarray,
        chain: Chain,
        *,
        refs: dict[str, np.ndarray] | None = None,
        dedup: bool = True,
        calibration: Calibration | None = None,
        reference: np.ndarray | None = None,
    ) -> dict:
        """Adds a tensor encoded by a codec chain (lossy or structural).

        ``array`` holds the tensor's values (any float dtype); the chain's codec
        sees them as float32, with ``calibration`` (if given) guiding its
        encoder.  Each part of the codec's output is stored
        losslessly, or by the chain given for it.  Returns the error statistics
        recorded in the manifest (relative Frobenius error, SNR, max |error|),
        measured on the decoded tensor as a reader will see it, against
        ``reference`` when given (the values before a step such as pruning that
        changed ``array``), else against ``array``.
        """
        return self._add_transformed(name, dtype, array, chain, refs, dedup, calibration, reference)[0]

    def add_transformed_decoded(
        self,
        name: str,
        dtype: str,
        array: np.ndarray,
        chain: Chain,
        *,
        refs: dict[str, np.ndarray] | None = None,
        calibration: Calibration | None = None,
        reference: np.ndarray | None = None,
    ) -> np.ndarray:
        """Like ``add_transformed`` (never an alias); returns the float32 values a reader will decode.

        A converter that encodes a model layer by layer runs the later layers
        on what the earlier ones decode to.
        """
        return self._add_transformed(name, dtype, array, chain, refs, False, calibration, reference)[1]

    def _add_transformed(
        self, name, dtype, array, chain, refs, dedup, calibration, reference=None
    ) -> tuple[dict, np.ndarray | None]:
        self._require_open()
        if dtype not in LOSSY_DTYPES:
            raise InputError(f"tensor {name!r}: a codec chain needs a floating-point tensor, not {dtype}")
        key = transformed_key(array, dtype, chain) if dedup else None
        if key is not None and key in self._digests:
            self._add_encoded(name, EncodedTensor(dtype, list(array.shape), {}, key))
            return {}, None
        name = self._claim_name(name)
        if key is not None:
            self._digests[key] = name
        encoded = encode_transformed(
            name, dtype, array, chain, self._encode_chunks, refs=refs, calibration=calibration, reference=reference
        )
        self._tensors.append({"name": name, "dtype": dtype, "shape": encoded.shape, **encoded.node})
        self._report_dense(dtype, array.shape)
        return encoded.stats, encoded.decoded

    def add_encoded(self, name: str, encoded: EncodedTensor, *, internal: bool = False) -> str | None:
        """Adds a tensor encoded elsewhere (``encoding.encode_transformed`` or ``encode_lossless`` with
        ``keep_sections``), placing its sections now: the same file as adding it here.  A tensor whose
        key matches one written before becomes an alias of it; returns the name it aliases, or None."""
        self._require_open()
        return self._add_encoded(name, encoded, internal)

    def _add_encoded(self, name: str, encoded: EncodedTensor, internal: bool = False) -> str | None:
        name = self._claim_name(name, internal)
        head = {"name": name, "dtype": encoded.dtype, "shape": list(encoded.shape)}
        target = self._digests.get(encoded.key) if encoded.key is not None else None
        if target is not None:
            self._tensors.append({**head, "alias_of": target})
        else:
            if encoded.key is not None:
                self._digests[encoded.key] = name
            self._place(encoded.node)
            self._tensors.append({**head, **encoded.node})
        if not internal:
            self._report_dense(encoded.dtype, encoded.shape)
        return target

    def add_later(self, name: str, resolve: Callable[[], EncodedTensor], window: int) -> None:
        """Adds a tensor whose encoding is under way elsewhere: ``resolve()`` waits for it and returns
        it (``add_encoded``).  Entries keep the order they were added in, whoever finishes first; once
        more than ``window`` wait, the oldest is placed.  Any other call places them all first."""
        self._check_open()
        self._later.append((name, resolve))
        while len(self._later) > window:
            self._place_oldest()

    def flush_later(self) -> None:
        """Places every tensor ``add_later`` handed out."""
        while self._later:
            self._place_oldest()

    def _place_oldest(self) -> None:
        name, resolve = self._later.popleft()
        self._add_encoded(name, resolve())

    def _report_dense(self, dtype: str, shape) -> None:
        if self.progress:
            self.progress(math.prod(shape) * DTYPES[dtype].itemsize)

    def add_array(self, name: str, array: np.ndarray, **kwargs) -> str | None:
        """Adds a numpy array (bf16 and fp8 arrive as uint views with an explicit dtype=)."""
        dtype = kwargs.pop("dtype", None) or dtype_of_numpy(array.dtype)
        if dtype is None:
            raise InputError(f"tensor {name!r}: numpy dtype {array.dtype} has no rbe dtype")
        if dtype not in DTYPES:
            raise InputError(f"tensor {name!r}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if DTYPES[dtype].itemsize != array.dtype.itemsize:
            raise InputError(
                f"tensor {name!r}: {dtype} needs {DTYPES[dtype].itemsize}-byte items, array has {array.dtype}"
            )
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        return self.add_tensor(name, dtype, array.shape, lambda o, n: data[o : o + n], **kwargs)

    def add_file(
        self,
        path: str,
        data: bytes | None = None,
        *,
        read_at: ReadAt | None = None,
        size: int | None = None,
        role: str = "file",
        tensors: list[str] | None = None,
    ) -> None:
        """Embeds a file (a config, a tokenizer) under its path relative to the model.

        Pass the bytes, or ``read_at`` and ``size`` to stream a large file.
        """
        self._require_open()
        try:
            check_relative_path(path, "file path")
        except RbeError as exc:
            raise InputError(str(exc)) from None
        if path in self._paths:
            raise InputError(f"file {path!r} added twice")
        self._paths.add(path)
        if data is not None:
            view = memoryview(data)
            size = len(view)
            read_at = lambda o, n: view[o : o + n]  # noqa: E731
        hasher = hashlib.sha256()
        codec = Zstd()
        chunks = self._encode_chunks(codec, "U8", size, read_at, hasher)
        entry = {
            "path": path,
            "role": role,
            "size": size,
            "digest": "sha256:" + hasher.hexdigest(),
            "codec": codec.describe(),
            "chunks": chunks,
        }
        if tensors is not None:
            entry["tensors"] = list(tensors)
        self._files.append(entry)

    def add_safetensors_layout(self, path: str, header: bytes, tensor_names: list[str]) -> None:
        """Records a safetensors file: its verbatim header and its tensors in data order.

        With it, decoding rebuilds the original file byte for byte.
        """
        self._require_open()
        missing = [t for t in tensor_names if t not in self._names]
        if missing:
            raise InputError(f"{path}: tensors {missing[:3]} were not added before the layout")
        self.add_file(path, header, role="safetensors-header", tensors=tensor_names)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        self._require_open()
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InputError("metadata must map strings to strings")
        for text in (*metadata, *metadata.values()):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a reader refuses its \ud800-style escape in the manifest
                raise InputError(f"metadata {text!r:.80}: not valid UTF-8 (it holds a lone surrogate)") from None
        self._metadata = dict(metadata)

    def set_input_stats(self, name: str, stats: dict) -> None:
        """Records, as the key ``input`` of tensor ``name``'s ``stats`` (spec 5.7), the ``stats`` its input
        file kept for it: a re-encoding of values that file stored lossily, whose own figures here are
        against those values, not the model they came from.  Not for an alias, which has no stats."""
        self._require_open()
        if not isinstance(stats, dict):
            raise UsageError(f"tensor {name!r}: input stats must be a dict, not {type(stats).__name__}")
        self._input_stats[name] = stats

    def _claim_name(self, name: str, internal: bool = False) -> str:
        try:
            check_name(name, "tensor name")
        except RbeError as exc:
            raise InputError(str(exc)) from None
        if name.startswith(INTERNAL_PREFIX) and not internal:
            raise InputError(f"tensor {name!r}: names starting with {INTERNAL_PREFIX!r} are reserved for rbe")
        if name in self._names:
            raise InputError(f"tensor {name!r} added twice")
        self._names.add(name)
        return name

    # -- completion ------------------------------------------------------------------
    def close(self) -> None:
        """Writes the manifest and footer, syncs, and renames into place."""
        self._require_open()
        for tensor in self._tensors:
            before = self._input_stats.get(tensor["name"])
            if before is not None and "alias_of" not in tensor:
                tensor["stats"] = {**tensor.get("stats", {}), "input": before}
        manifest = dump_manifest(
            {
                "format": "rbe",
                "version": [FORMAT_MAJOR, FORMAT_MINOR],
                "producer": f"rbe {__version__}",
                "metadata": self._metadata,
                "tensors": self._tensors,
                "files": self._files,
            }
        )
        if len(manifest) > MAX_MANIFEST_BYTES:
            self.abort()
            raise InputError(f"manifest of {len(manifest)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
        manifest, encoding = _store_manifest(manifest)
        try:
            self._pad()
            offset = self._pos
            self._write(manifest)
            self._pad()
            self._write(pack_footer(offset, len(manifest), crc32(manifest), encoding))
            assert self._pos % ALIGNMENT == 0
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._publish()
            fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            self.abort()
            raise
        self._shutdown()
        self._state = "closed"

    def _publish(self) -> None:
        """Renames the complete file into place; without ``force`` it never replaces a file that
        appeared at the path after the check in ``__init__`` (another writer's)."""
        if self.force:
            os.replace(self._tmp, self.path)
            return
        try:
            rename_noreplace(self._tmp, self.path)
        except FileExistsError:
            raise OutputExistsError(
                f"{self.path}: appeared while this output was being written (another program "
                "made it) and was left as it is; pass force=True (--force) to overwrite it"
            ) from None

    def abort(self) -> None:
        """Discards the partial file; the destination is left as it was."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._shutdown()
        try:
            self._file.close()
        finally:
            if os.path.exists(self._tmp) and not self.keep_partial:
                os.unlink(self._tmp)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def stored_part_bytes(arr: np.ndarray) -> int:
    """The bytes a writer stores for this codec part: its chunks encoded as ``encoding.lossless_blob`` does.

    Lets an encoder compare chains by what a file will hold (packed 4-bit codes, two to a
    byte, compress; 3-bit ones straddle bytes and hardly do) rather than by raw bit cost;
    chunk descriptions in the manifest are not counted.
    """
    dtype = dtype_of_numpy(arr.dtype)
    codec = part_codec(dtype, arr.size)
    data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    width = DTYPES[dtype].itemsize
    per_chunk = codec.chunk_items(DTYPES[dtype]) * width
    return sum(
        sum(len(p) for p in codec.encode_chunk(data[o : o + per_chunk], DTYPES[dtype])[0])
        for o in range(0, len(data), per_chunk)
    )


def _store_manifest(manifest: bytes) -> tuple[bytes, int]:
    """The manifest as stored: zstd-compressed when that saves at least 1 KiB.

    A large model's manifest (chunk records, digests) shrinks about sevenfold;
    a small one stays plain JSON, readable with any hex viewer.
    """
    frame = zstd_codec.ZstdCompressor(level=19, write_content_size=True).compress(manifest)
    if len(frame) <= len(manifest) - 1024:
        return frame, MANIFEST_ZSTD
    return manifest, MANIFEST_JSON


def crc32_update(crc: int, data) -> int:
    return crc32(data, crc)


def _digest(read_at: ReadAt, size: int, block: int = 16 << 20) -> str:
    hasher = hashlib.sha256()
    for offset in range(0, size, block):
        hasher.update(read_at(offset, min(block, size - offset)))
    return "sha256:" + hasher.hexdigest()


def default_file_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give: 0666 (0777 for a directory) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_directory(directory: str) -> None:
    """Makes renames durable; some file systems cannot sync a directory, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
