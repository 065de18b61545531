"""Containers back to what they were converted from: a Hugging Face directory, one .safetensors file
or an .onnx model.

``decode`` writes a HF directory (every embedded file, each safetensors file
rebuilt byte for byte from its stored header and tensors) or one .safetensors
file; ``decode_onnx`` writes the .onnx model a container converted from ONNX
carries, every initializer dense (past 2 GB, into a ``.data`` file beside it),
and ``decode`` to a directory writes it there under the input's file name;
``write_onnx`` writes any ModelProto so.  An ONNX graph exported at conversion
(``rbe convert --onnx``) is left out of a directory decode
(``exported_graph_parts``) and decodes to a dense .onnx through its mapping
(``onnx_export.dense_model``).

``decode_to`` and ``decode_onnx_to`` are ``rbe decode`` and ``rbe export-onnx``
(dense) as library functions: the target's checks (a directory named like a
file is refused: ``outputs.check_directory_name``), the partial files killed
runs left removed, the total a progress bar counts to, the decode.  The onnx
package is imported only for ONNX outputs.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from rbeformat import FormatError, Reader
from rbeformat.atomic import (
    atomic_directory,
    atomic_file,
    check_directory_target,
    check_parent,
    check_target,
    remove_stale_partials,
)
from rbeformat.embedded.onnx import GRAPH_KEY, MAPPING_KEY, ONNX_DTYPES, OWN_PREFIX, SOURCE_KEY, read_graph
from rbeformat.manifest import check_json_text, unique_keys
from rbeformat.spec import DTYPES

from .inputs import open_rbe
from .outputs import check_directory_name, check_input_exists, check_not_input
from .safetensors_io import build_header

Progress = Callable[[int], None]

INLINE_LIMIT = (2 << 30) - 1  # protobuf cannot serialize a message of 2 GB or more
EXTERNAL_ALIGNMENT = 4096  # page-aligned external tensors can be memory-mapped by runtimes


# -- rbe decode and rbe export-onnx, as library functions ---------------------------------------


@dataclass
class Decoded:
    """What a decode wrote: the tensor bytes (the bar's total), the paths written (an .onnx
    output: the model and its external data, if any), the files of an existing directory kept
    and the partial files of killed runs removed beside the output."""

    total: int
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    exported_graph: bool = False  # an .onnx output of a graph exported at conversion (no bar ran)
    removed: list[str] = field(default_factory=list)


def _no_bar(total: int):
    from .pipeline import Reporter

    return Reporter().bar(total, "decode")


def decode_to(
    src: str,
    dst: str,
    *,
    force: bool = False,
    verify: bool = True,
    threads: int | None = None,
    bar: Callable | None = None,
) -> Decoded:
    """``rbe decode SRC DST``: a directory, one .safetensors file, or (DST ending in .onnx) the ONNX model.

    ``bar(total)`` gives a context manager whose ``update(n)`` is told of the bytes written."""
    check_not_input(src, dst)  # before any check of the output, whose advice would be to remove it
    check_input_exists(src)
    bar = bar or _no_bar
    if dst.lower().endswith(".onnx"):
        return decode_onnx_to(src, dst, force=force, verify=verify, threads=threads, bar=bar)
    removed = []
    if dst.endswith(".safetensors"):
        check_target(dst, force)
        check_parent(dst)
        removed = remove_stale_partials(dst)
    else:
        check_directory_name(dst, force)
        check_directory_target(dst, force)
    with open_rbe(src) as r:
        total = decoded_tensor_bytes(r)
    with bar(total) as progress:
        kept = decode(src, dst, force=force, verify=verify, threads=threads, progress=progress.update)
    return Decoded(total, [dst], kept, removed=removed)


def decode_onnx_to(
    src: str,
    dst: str,
    *,
    force: bool = False,
    verify: bool = True,
    threads: int | None = None,
    bar: Callable | None = None,
) -> Decoded:
    """``rbe export-onnx SRC DST`` (dense): the ONNX model a container carries, converted from an .onnx
    file (``decode_onnx``) or exported at conversion (``onnx_export.dense_model``)."""
    check_not_input(src, dst)
    check_input_exists(src)
    bar = bar or _no_bar
    check_target(dst, force)
    check_parent(dst)
    with open_rbe(src) as r:
        total = decoded_tensor_bytes(r)
        exported = r.metadata().get(MAPPING_KEY) is not None
    from .sources import onnx  # noqa: F401  (one clear error without the onnx package)

    removed = remove_stale_partials(dst) + remove_stale_partials(dst + ".data")
    if exported:  # a HF directory with its exported graph (rbe convert --onnx): wired by the mapping
        from .onnx_export import dense_model

        with open_rbe(src, verify_checksums=verify, threads=threads) as r:
            model = dense_model(r)
        return Decoded(total, write_onnx(model, dst, force), exported_graph=True, removed=removed)
    with bar(total) as progress:
        written = decode_onnx(src, dst, force=force, verify=verify, threads=threads, progress=progress.update)
    return Decoded(total, written, removed=removed)


def export_on_the_fly(src: str, dst: str, *, force: bool = False) -> tuple[list[str], str]:
    """``rbe export-onnx --on-the-fly``: the container's ONNX model with quantized weights kept compressed,
    expanded inside the graph as it runs (``rbe_loaders.ort``); (the paths written, which form each weight took)."""
    check_not_input(src, dst)
    check_input_exists(src)
    check_target(dst, force)
    check_parent(dst)
    open_rbe(src, verify_checksums=False).close()  # one clear error for a file that is not rbe
    from rbe_loaders.ort import on_the_fly_model  # a loader; imported only for this

    model, report = on_the_fly_model(src)
    return write_onnx(model, dst, force), report


def write_onnx(model, path: str, force: bool) -> list[str]:
    """Writes ``model`` atomically: inline below 2 GB, else its initializers' data in PATH.data
    (each at a multiple of 4096, as ``decode_onnx`` writes them).  Returns the paths written."""
    from onnx.external_data_helper import set_external_data

    if model.ByteSize() <= INLINE_LIMIT:
        with atomic_file(path, force) as fh:
            fh.write(model.SerializeToString())
        return [path]
    data_path = path + ".data"
    check_target(data_path, force)
    with atomic_file(path, force) as model_fh, atomic_file(data_path, force) as data_fh:
        offset = 0
        for t in model.graph.initializer:
            if not t.raw_data:
                continue
            pad = -offset % EXTERNAL_ALIGNMENT
            data_fh.write(b"\0" * pad + t.raw_data)
            set_external_data(t, os.path.basename(data_path), offset + pad, len(t.raw_data))
            offset += pad + len(t.raw_data)
            t.ClearField("raw_data")
        model_fh.write(model.SerializeToString())  # renamed into place after the data file
    return [path, data_path]


# -- to a Hugging Face directory or one .safetensors file ------------------------------------


def decode(
    src: str,
    dst: str,
    *,
    force: bool = False,
    verify: bool = True,
    threads: int | None = None,
    progress: Progress | None = None,
    max_memory: int | None = None,
) -> list[str]:
    """Decodes an rbe file to a HF directory, or to one .safetensors file if dst ends so.

    A container converted from an .onnx file decodes to a directory as its
    ONNX model, dense, under the input's file name (``onnx_file_name``).
    Into an existing directory (only with ``force``) it replaces just the files
    the container holds and returns the relative paths of the other files
    there, which it leaves alone.  ``progress`` receives tensor bytes as they
    are written; they add up to ``decoded_tensor_bytes``.  Embedded files and
    stored tensors are written a batch of chunks at a time, never held whole;
    ``max_memory`` is the Reader's memory limit (rbeformat.budget).
    """
    single = dst.endswith(".safetensors")
    if single:
        check_target(dst, force)
    else:
        check_directory_target(dst, force)
    with Reader(src, threads=threads, max_memory=max_memory) as r:
        if single:
            with atomic_file(dst, force) as fh:
                _write_single_safetensors(r, fh, verify, progress)
            return []
        if carries_onnx_model(r):
            return _write_onnx_directory(r, dst, force, verify, progress)
        with atomic_directory(dst, force, _directory_files(r)) as out:
            write_directory(r, out, verify, progress)
        return out.kept()


def decoded_tensor_bytes(r: Reader) -> int:
    """Bytes of tensor data a decode writes: every tensor a user sees, aliases included, densely."""
    return sum(math.prod(r.entry(name).shape) * r.entry(name).dtype.itemsize for name in r.keys())


# An ONNX graph exported at conversion (``rbe convert --onnx``, converters/onnx_export.py) is no part of the
# HF directory: its files (named by these metadata keys) and its own tensors (``OWN_PREFIX``) are left out of
# a decode.
EXPORTED_GRAPH_KEYS = (GRAPH_KEY, MAPPING_KEY)


def carries_onnx_model(r: Reader) -> bool:
    """Whether the container was converted from an .onnx file: its graph is the model (a graph exported
    with --onnx sits beside a HF directory, which stays the model)."""
    metadata = r.metadata()
    return GRAPH_KEY in metadata and MAPPING_KEY not in metadata


def exported_graph_parts(r: Reader) -> tuple[set[str], set[str]]:
    """(file paths, tensor names) of the exported ONNX graph a container carries beside a HF directory."""
    metadata = r.metadata()
    if MAPPING_KEY not in metadata:  # an .onnx input's graph is the model itself
        return set(), set()
    files = {metadata[key] for key in EXPORTED_GRAPH_KEYS if key in metadata}
    listed = {name for f in r.files().values() for name in f.tensors}
    tensors = {name for name in r.keys() if name.startswith(OWN_PREFIX) and name not in listed}
    return files, tensors


def _write_single_safetensors(r: Reader, fh, verify: bool, progress: Progress | None) -> None:
    shards = [f for f in r.files().values() if f.role == "safetensors-header"]
    if len(shards) == 1:
        header = r.read_file(shards[0].path)
        names = shards[0].tensors
    else:
        graph_tensors = exported_graph_parts(r)[1]
        names = [name for name in r.keys() if name not in graph_tensors]
        header = build_header([(n, r.entry(n).dtype.name, r.entry(n).shape) for n in names], r.metadata())
    write_shard(r, header, names, fh.write, verify, progress)


def write_shard(r: Reader, header: bytes, names: list[str], write, verify: bool, progress) -> None:
    _check_header_matches(r, header, names)
    write(struct.pack("<Q", len(header)))
    write(header)
    for name in names:
        for data in r.iter_tensor_bytes(name, verify=verify):
            write(data)
            if progress:
                progress(len(data))


def _check_header_matches(r: Reader, header: bytes, names: list[str]) -> None:
    """The stored header must describe exactly the listed tensors, back to back."""
    import json

    check_json_text(header, "stored safetensors header", r.max_memory)
    hook = unique_keys(lambda key: ValueError(f"the key {key!r:.80} appears twice"))
    try:
        obj = json.loads(header, object_pairs_hook=hook)
        obj.pop("__metadata__", None)
        pos = 0
        for name in names:
            entry, info = r.entry(name), obj.pop(name)
            size = math.prod(entry.shape) * entry.dtype.itemsize
            if (
                info["dtype"] != entry.dtype.name
                or tuple(info["shape"]) != entry.shape
                or info["data_offsets"] != [pos, pos + size]
            ):
                raise ValueError(name)
            pos += size
        if obj:
            raise ValueError("extra entries")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise FormatError(f"stored safetensors header does not match the tensors ({exc})") from None


# A container written by save_file has no safetensors layout: its tensors become this file.
_MERGED = "model.safetensors"


def _directory_files(r: Reader) -> list[str]:
    """The relative paths a directory decode writes; refuses a container that cannot be one."""
    graph_files, graph_tensors = exported_graph_parts(r)
    files = {path: f for path, f in r.files().items() if path not in graph_files}
    listed = {name for f in files.values() for name in f.tensors}
    # keys() omits internal tensors; an exported graph's own tensors belong to no file either
    unlisted = [name for name in r.keys() if name not in listed and name not in graph_tensors]
    if listed and unlisted:
        raise FormatError(
            f"tensors {unlisted[:3]} belong to no safetensors file of the directory; "
            "decode to a single .safetensors file instead"
        )
    if listed:
        return sorted(files)
    if _MERGED in files:
        raise FormatError(
            f"the container's tensors would be written to {_MERGED}, but it also holds a file "
            "of that name; decode to a single .safetensors file instead"
        )
    return sorted(files) + [_MERGED]


def write_directory(r: Reader, out, verify: bool, progress: Progress | None) -> None:
    graph_files = exported_graph_parts(r)[0]
    files = {path: f for path, f in r.files().items() if path not in graph_files}
    for path, entry in sorted(files.items()):
        with out.create(path) as fh:
            if entry.role == "safetensors-header":
                write_shard(r, r.read_file(path), entry.tensors, fh.write, verify, progress)
            else:
                _write_file(r, path, fh.write, verify)
    if not any(f.role == "safetensors-header" for f in files.values()):
        names = r.keys()
        header = build_header([(n, r.entry(n).dtype.name, r.entry(n).shape) for n in names], r.metadata())
        with out.create(_MERGED) as fh:
            write_shard(r, header, names, fh.write, verify, progress)


def _write_file(r: Reader, path: str, write, verify: bool) -> None:
    """An embedded file, written a batch of chunks at a time while hashed; a digest mismatch after the last
    raises ChecksumError, which discards the output being written."""
    for data in r.iter_file(path, verify=verify):
        write(data)


# -- to an .onnx model ----------------------------------------------------------------------


def decode_onnx(
    src: str,
    dst: str,
    *,
    force: bool = False,
    verify: bool = True,
    threads: int | None = None,
    progress: Progress | None = None,
    inline_limit: int = INLINE_LIMIT,
) -> list[str]:
    """Writes the ONNX model an rbe file carries to ``dst``, every initializer dense.

    Up to ``inline_limit`` bytes of initializers go inline (``raw_data``); past it
    they go to ``dst`` + ".data" beside it, which the model names as its external data.
    Returns the paths written.
    """
    check_target(dst, force)
    check_parent(dst)
    with Reader(src, threads=threads) as r:
        model, initializers, inline = _dense_graph(r, verify, inline_limit)
        if inline:
            with atomic_file(dst, force) as fh:
                _write_inline(r, model, initializers, fh, verify, progress)
            return [dst]
        data_path = dst + ".data"
        check_target(data_path, force)
        with atomic_file(dst, force) as model_fh, atomic_file(data_path, force) as data_fh:
            location = os.path.basename(data_path)
            _write_external(r, model, initializers, model_fh, data_fh, location, verify, progress)
        return [dst, data_path]


def _write_onnx_directory(r: Reader, dst: str, force: bool, verify: bool, progress) -> list[str]:
    """The ONNX model of a container converted from an .onnx file, written into the directory ``dst`` as
    ``decode_onnx`` writes it to a file, with the files embedded beside the graph (the tokenizer.json of
    ``rbe convert --tokenizer``); returns the files of an existing directory kept."""
    name = onnx_file_name(r)
    model, initializers, inline = _dense_graph(r, verify, INLINE_LIMIT)
    graph_file = r.metadata()[GRAPH_KEY]
    beside = sorted(path for path in r.files() if path not in (graph_file, name, name + ".data"))
    with atomic_directory(dst, force, [name, *beside] if inline else [name, name + ".data", *beside]) as out:
        if inline:
            with out.create(name) as fh:
                _write_inline(r, model, initializers, fh, verify, progress)
        else:
            with out.create(name) as model_fh, out.create(name + ".data") as data_fh:
                _write_external(r, model, initializers, model_fh, data_fh, name + ".data", verify, progress)
        for path in beside:
            with out.create(path) as fh:
                _write_file(r, path, fh.write, verify)
    return out.kept()


def onnx_file_name(r: Reader) -> str:
    """The name an ONNX model decodes to in a directory: the input's (``onnx.source``) when it is a plain
    file name ending in .onnx, else model.onnx."""
    name = r.metadata().get(SOURCE_KEY, "")
    if re.fullmatch(r"[^./\\\x00][^/\\\x00]{0,200}\.onnx", name):
        return name
    return "model.onnx"


def _dense_graph(r: Reader, verify: bool, inline_limit: int) -> tuple[object, list, bool]:
    """The stored ModelProto checked against the container, its initializers that rbe stores, and whether
    they fit inline (below ``inline_limit`` bytes with the graph)."""
    model = read_graph(r, verify)
    initializers = [t for t in model.graph.initializer if t.data_type in ONNX_DTYPES]
    _check_graph(r, model, initializers)
    total = sum(math.prod(_dims(t)) * DTYPES[ONNX_DTYPES[t.data_type]].itemsize for t in initializers)
    return model, initializers, total + model.ByteSize() <= inline_limit


def _dims(t) -> tuple[int, ...]:
    return tuple(int(d) for d in t.dims)


def _check_graph(r: Reader, model, initializers: list) -> None:
    """What a decode trusts in a stored graph (``read_graph`` refused file references): one tensor per
    initializer."""
    names = [t.name for t in initializers]
    if len(set(names)) != len(names):
        raise FormatError("the stored ONNX graph names an initializer twice")
    from .sources.onnx import DATA_FIELDS

    for t in initializers:
        _check_tensor_matches(r, t)
        for name in DATA_FIELDS:  # the decoded tensor is the only data it gets
            t.ClearField(name)
        t.ClearField("data_location")


def _check_tensor_matches(r: Reader, t) -> None:
    if t.name not in r.keys():
        raise FormatError(f"the ONNX graph's initializer {t.name!r:.80} has no tensor in the container")
    entry = r.entry(t.name)
    if entry.dtype.name != ONNX_DTYPES[t.data_type] or tuple(entry.shape) != _dims(t):
        raise FormatError(
            f"tensor {t.name!r:.80}: {entry.dtype.name} {list(entry.shape)} does not match the "
            f"graph's initializer ({ONNX_DTYPES[t.data_type]} {list(_dims(t))})"
        )


def _write_inline(r: Reader, model, initializers: list, fh, verify: bool, progress) -> None:
    for t in initializers:
        t.raw_data = b"".join(r.iter_tensor_bytes(t.name, verify=verify))
        if progress:
            progress(len(t.raw_data))
    fh.write(model.SerializeToString())


def _write_external(r: Reader, model, initializers: list, model_fh, data_fh, location: str, verify: bool, progress):
    """Every initializer's data into ``data_fh`` (named ``location`` beside the model), then the model."""
    offset = 0
    for t in initializers:
        pad = -offset % EXTERNAL_ALIGNMENT
        data_fh.write(b"\0" * pad)
        offset += pad
        length = 0
        for data in r.iter_tensor_bytes(t.name, verify=verify):  # a batch of chunks at a time
            data_fh.write(data)
            length += len(data)
            if progress:
                progress(len(data))
        point_at(t, location, offset, length)
        offset += length
    model_fh.write(model.SerializeToString())


def point_at(t, location: str, offset: int, length: int) -> None:
    """Makes initializer ``t`` name its data in the external file ``location``."""
    from onnx import TensorProto

    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
