"""Encoding a tensor's entry apart from any file: the work a writer can hand to other processes.

A *chunk encoder* turns a run of items into chunk records.  The writer's own
writes each chunk's sections into its file as soon as they are encoded and
records where they lie (``offset``, ``length``, ``crc32``); ``keep_sections``
keeps them instead (``sections``, a list of bytes), and a writer places them
later with ``Writer.add_encoded``, in the order they were encoded.  Both ways
give the same file, byte for byte: what differs is only who does the work.

>>> entry = encode_lossless("F32", [2], b"\\0" * 8, Byteplane())   # doctest: +SKIP
>>> writer.add_encoded("bias", entry)                               # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .codecs.blob.byteplane import Byteplane
from .codecs.core.base import Codec
from .errors import InputError
from .spec import DTYPES, dtype_of_numpy
from .values import as_stored, from_float32, stored_error_stats, to_float32

if TYPE_CHECKING:
    from .chain import Chain
    from .codecs.core.tensor import Calibration

ReadAt = Callable[[int, int], bytes]  # read(offset, size) -> exactly size bytes
# (codec, dtype name, items, read_at, hasher or None) -> the chunk records, in order
ChunkEncoder = Callable[[Codec, str, int, ReadAt, Any], list[dict]]


@dataclass
class EncodedTensor:
    """A tensor entry encoded, its sections not yet placed in a file.

    ``node`` is the manifest entry less its name; ``key`` identifies equal tensors
    (a writer makes a later one an alias of the first); ``stats`` and ``decoded``
    (float32 as a reader decodes it) are a transformed tensor's.
    """

    dtype: str
    shape: list[int]
    node: dict
    key: tuple
    stats: dict | None = None
    decoded: np.ndarray | None = None


def encoded_chunks(
    codec: Codec, dtype_name: str, items: int, read_at: ReadAt, hasher: Any, pool=None, window: int = 1
) -> Iterator[tuple[int, list[bytes], dict]]:
    """(items, sections, params) of each chunk, in order; with a thread ``pool``, ``window`` chunks
    are encoded at once.  ``hasher`` (or None) is fed the raw bytes in order."""
    dtype = DTYPES[dtype_name]
    per_chunk = codec.chunk_items(dtype)
    pending: deque = deque()
    for start in range(0, items, per_chunk):
        n = min(per_chunk, items - start)
        raw = read_at(start * dtype.itemsize, n * dtype.itemsize)
        if hasher is not None:
            hasher.update(raw)
        view = memoryview(raw)
        job = (pool.submit(codec.encode_chunk, view, dtype),) if pool else codec.encode_chunk(view, dtype)
        pending.append((n, job))
        if len(pending) >= window:
            yield _finished(*pending.popleft(), pool)
    while pending:
        yield _finished(*pending.popleft(), pool)


def _finished(n: int, job, pool) -> tuple[int, list[bytes], dict]:
    sections, params = job[0].result() if pool else job
    return n, list(sections), params


def keep_sections(pool=None, window: int = 1) -> ChunkEncoder:
    """A chunk encoder that keeps each chunk's sections in its record, for a writer to place later."""

    def encode(codec: Codec, dtype_name: str, items: int, read_at: ReadAt, hasher: Any) -> list[dict]:
        return [
            {"items": n, "params": params, "sections": sections}
            for n, sections, params in encoded_chunks(codec, dtype_name, items, read_at, hasher, pool, window)
        ]

    return encode


def part_codec(dtype: str, items: int) -> Byteplane:
    """The lossless codec of a codec's part (and of other arrays a writer stores whole)."""
    return Byteplane().for_dtype(DTYPES[dtype], items)


def lossless_blob(arr: np.ndarray, dtype: str, chunks: ChunkEncoder) -> dict:
    """A codec part's node, stored losslessly."""
    data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    codec = part_codec(dtype, arr.size)
    hasher = hashlib.sha256()
    records = chunks(codec, dtype, arr.size, lambda o, n: data[o : o + n], hasher)
    return {"codec": codec.describe(), "digest": "sha256:" + hasher.hexdigest(), "chunks": records}


def encode_chain(
    x: np.ndarray, chain: Chain, refs, where: str, calibration: Calibration | None, chunks: ChunkEncoder
) -> tuple[dict, Callable[[], np.ndarray]]:
    """Encodes x with chain.codec; returns the manifest node and a function that decodes the float32
    tensor, which the caller calls once it has let go of x (a large tensor's values and its decoded
    values are then never both held).

    Parts go in name order, each stored losslessly or by the chain given for it
    (depth first), with the calibration ``codec.part_calibration`` derives.
    """
    codec = chain.codec
    try:
        encoded = codec.encode(x, refs, calibration)
    except ValueError as exc:
        raise InputError(f"{where}: {codec.name} cannot encode it ({exc})") from None
    parts, decoded_parts = {}, {}
    for pname, arr in sorted(encoded.parts.items()):
        pdtype = dtype_of_numpy(arr.dtype)
        sub = chain.parts.get(pname)
        head = {"dtype": pdtype, "shape": list(arr.shape)}
        if sub is not None and not sub.lossless:
            sub_calibration = None
            if calibration is not None:
                try:
                    sub_calibration = codec.part_calibration(pname, calibration, encoded)
                except ValueError as exc:
                    raise InputError(f"{where} part {pname}: the calibration does not fit it ({exc})") from None
            # A part's codec without an encoder for the method encodes it uncalibrated.
            if sub_calibration is not None and sub_calibration.method not in sub.codec.calibrations:
                sub_calibration = None
            node, decode = encode_chain(
                arr.astype(np.float32), sub, None, f"{where} part {pname}", sub_calibration, chunks
            )
            parts[pname] = {**head, **node}
            decoded_parts[pname] = from_float32(decode(), pdtype).view(arr.dtype).reshape(arr.shape)
        else:
            parts[pname] = {**head, **lossless_blob(arr, pdtype, chunks)}
            decoded_parts[pname] = arr
    params, shape = encoded.params, tuple(x.shape)
    node = {"codec": codec.describe(), "params": params, "parts": parts}
    return node, lambda: codec.decode(decoded_parts, params, shape, where, refs)


def transformed_key(array: np.ndarray, dtype: str, chain: Chain) -> tuple:
    """What makes two transformed tensors equal: dtype, shape, values and chain."""
    stored = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    return (dtype, tuple(array.shape), "sha256:" + hashlib.sha256(stored).hexdigest(), chain.text())


def encode_transformed(
    name: str,
    dtype: str,
    array: np.ndarray,
    chain: Chain,
    chunks: ChunkEncoder,
    *,
    refs: dict[str, np.ndarray] | None = None,
    calibration: Calibration | None = None,
    reference: np.ndarray | None = None,
    key: tuple | None = None,
) -> EncodedTensor:
    """A tensor encoded by a codec chain, with its error statistics (against ``reference`` when
    given, else ``array``) measured on the decoded tensor as a reader will see it."""
    chain.validate(f"tensor {name!r}: codec chain")  # before any (possibly slow) encoding
    x = to_float32(array, dtype)
    node, decode = encode_chain(x, chain, refs, f"tensor {name!r}", calibration, chunks)
    del x  # a large tensor's float32 copy is not kept beside its decoded values
    decoded = decode()
    stats = stored_error_stats(array if reference is None else reference, decoded, dtype)
    return EncodedTensor(dtype, list(array.shape), {**node, "stats": stats}, key, stats, as_stored(decoded, dtype))


def encode_lossless(dtype: str, shape: list[int], data, codec: Codec) -> EncodedTensor:
    """A tensor stored losslessly from its little-endian bytes ``data``, its sections kept."""
    view = memoryview(data).cast("B")
    items = len(view) // DTYPES[dtype].itemsize
    codec = codec.for_dtype(DTYPES[dtype], items)
    hasher = hashlib.sha256()
    records = keep_sections()(codec, dtype, items, lambda o, n: view[o : o + n], hasher)
    digest = "sha256:" + hasher.hexdigest()
    node = {"digest": digest, "codec": codec.describe(), "chunks": records}
    return EncodedTensor(dtype, [int(d) for d in shape], node, (dtype, tuple(int(d) for d in shape), digest))
