"""Lossless compression of real checkpoints: rbe byteplane beside plain zstd and ZipNN.

Every method sees the same bytes (the floating-point tensors of the model's
safetensors file, each compressed on its own as a converter would) and the same
number of threads, in the same run, so the numbers are comparable with each
other even though their absolute values depend on the machine.

    python -m bench.lossless                      # MiniLM and SmolLM2-135M
    python -m bench.lossless --quick              # MiniLM only
    python -m bench.lossless --models smollm2 --threads 4

The table is printed and its rows are written to bench/out/lossless.json.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zstandard

from rbe_converters.safetensors_io import read_header
from rbeformat import Reader, Writer
from rbeformat.codecs.blob.byteplane import DEFAULT_SPLIT_GAIN, Byteplane
from rbeformat.codecs.blob.zstd import PLANES
from rbeformat.spec import DTYPES

from .models import minilm_dir, smollm2_dir

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
ZSTD_CHUNK_BYTES = 4 * 1024 * 1024
DECODE_REPEATS = 3
ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
MODELS = {
    "minilm": ("all-MiniLM-L6-v2", minilm_dir, ("F32", "BF16", "F16")),
    "smollm2": ("SmolLM2-135M", smollm2_dir, ("F32", "BF16")),
}


# -- data -------------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    dtype: str  # rbe / safetensors dtype name
    tensors: list[tuple[str, np.ndarray]]  # (name, little-endian bytes as uint8)

    @property
    def raw_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors)


def load_fp32(model_dir: str) -> list[tuple[str, np.ndarray]]:
    """The F32 tensors of every safetensors file in ``model_dir``, in file order."""
    tensors = []
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        st = read_header(path)
        data = np.fromfile(path, dtype=np.uint8, offset=st.data_start)
        for t in st.tensors:
            if t.dtype != "F32":
                continue  # integer buffers (position ids) are not weights
            tensors.append((t.name, data[t.begin : t.end]))
    return tensors


def to_bf16(fp32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16, as torch does; uint64 so NaN patterns cannot wrap."""
    u = fp32.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8)


def to_fp16(fp32: np.ndarray) -> np.ndarray:
    return fp32.view(np.float32).astype(np.float16).view(np.uint8)


def cast(tensors: list[tuple[str, np.ndarray]], dtype: str) -> list[tuple[str, np.ndarray]]:
    if dtype == "F32":
        return tensors
    convert = {"BF16": to_bf16, "F16": to_fp16}[dtype]
    return [(name, convert(t)) for name, t in tensors]


# -- the order-0 reference -------------------------------------------------------------


def order0_plane_bytes(data: np.ndarray, width: int) -> float:
    """Bytes needed by an order-0 entropy coder for each plain byte plane of ``data``."""
    words = data.reshape(-1, width)
    total = 0.0
    for k in range(width):
        counts = np.bincount(words[:, k], minlength=256)
        p = counts[counts > 0] / words.shape[0]
        total += words.shape[0] * float(-(p * np.log2(p)).sum()) / 8
    return total


# -- methods ----------------------------------------------------------------------------
# A method turns one tensor into an opaque stored object and back; the harness
# times these calls only, so copies made for a method's sake are not charged to it.


class Method:
    label = ""

    def setup(self, dataset: Dataset) -> None:
        """Called once per dataset before any tensor."""

    def prepare(self, data: np.ndarray):
        """What ``encode`` receives (untimed)."""
        return data

    def encode(self, name: str, data):
        raise NotImplementedError

    def stored_size(self, stored) -> int:
        raise NotImplementedError

    def end_encode(self) -> int | None:
        """Completes encoding (timed); returns the stored size if it is known only now."""
        return None

    def decode(self, name: str, stored, nbytes: int):
        raise NotImplementedError

    def finish(self) -> None:
        """Called once per dataset after all decoding (untimed)."""


def level_name(level: int) -> str:
    return "preset" if level == PLANES else f"-{level}"


def run_chunks(pool: ThreadPoolExecutor | None, fn: Callable, jobs: list) -> list:
    """Runs ``fn`` over ``jobs`` as rbe's reader does: on the pool only when it helps."""
    if pool is not None and len(jobs) > 1:
        return list(pool.map(fn, jobs))
    return [fn(job) for job in jobs]


class PlainZstd(Method):
    """zstd on the raw tensor bytes, in independent 4 MiB frames."""

    def __init__(self, level: int, pool: ThreadPoolExecutor | None):
        self.level, self.pool = level, pool
        self.label = f"zstd -{level} (4 MiB frames)"
        self.local = threading.local()  # zstd contexts are not safe to share between threads

    def _cctx(self) -> zstandard.ZstdCompressor:
        if not hasattr(self.local, "c"):
            self.local.c = zstandard.ZstdCompressor(level=self.level)
        return self.local.c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        if not hasattr(self.local, "d"):
            self.local.d = zstandard.ZstdDecompressor()
        return self.local.d

    def encode(self, name, data):
        view = memoryview(data)
        starts = range(0, len(view), ZSTD_CHUNK_BYTES)
        return run_chunks(self.pool, lambda s: self._cctx().compress(view[s : s + ZSTD_CHUNK_BYTES]), starts)

    def stored_size(self, stored):
        return sum(len(f) for f in stored)

    def decode(self, name, stored, nbytes):
        out = np.empty(nbytes, dtype=np.uint8)

        def job(i):
            part = out[i * ZSTD_CHUNK_BYTES : (i + 1) * ZSTD_CHUNK_BYTES]
            part[:] = np.frombuffer(self._dctx().decompress(stored[i]), np.uint8)

        run_chunks(self.pool, job, range(len(stored)))
        return out


class RbeByteplane(Method):
    """rbe's byteplane codec chunk by chunk, decoding into slices of one output like the reader."""

    def __init__(
        self,
        level: int,
        pool: ThreadPoolExecutor | None,
        split_gain: float = DEFAULT_SPLIT_GAIN,
        chunk_bytes: int | None = None,
    ):
        self.level, self.pool, self.split_gain, self.fixed_chunk = level, pool, split_gain, chunk_bytes
        self.label = "rbe byteplane " + level_name(level) + (" max-ratio" if split_gain == 0 else "")
        if chunk_bytes:
            self.label += f" ({chunk_bytes >> 10} KiB chunks)"

    def setup(self, dataset):
        self.dtype = DTYPES[dataset.dtype]
        items = self.fixed_chunk // self.dtype.itemsize if self.fixed_chunk else None
        self.base = Byteplane(level=self.level, split_gain=self.split_gain, chunk_items=items)

    def encode(self, name, data):
        view = memoryview(data)
        codec = self.base.for_dtype(self.dtype, len(view) // self.dtype.itemsize)  # as the writer does
        step = codec.chunk_items(self.dtype) * self.dtype.itemsize
        starts = range(0, len(view), step)
        chunks = run_chunks(self.pool, lambda s: self._encode_one(codec, view[s : s + step]), starts)
        return codec, step, chunks

    def _encode_one(self, codec: Byteplane, data: memoryview) -> tuple[memoryview, dict]:
        parts, params = codec.encode_chunk(data, self.dtype)
        return memoryview(b"".join(parts)), params  # one section, as the writer lays it out

    def stored_size(self, stored):
        return sum(len(payload) for payload, _ in stored[2])

    def decode(self, name, stored, nbytes):
        codec, step, chunks = stored
        out = np.empty(nbytes, dtype=np.uint8)

        def job(i):
            target = out[i * step : (i + 1) * step]
            codec.decode_chunk(chunks[i][0], chunks[i][1], self.dtype, memoryview(target), name)

        run_chunks(self.pool, job, range(len(chunks)))
        return out


class ZipNNMethod(Method):
    """ZipNN on each tensor's bytes; it rewrites its input, so it gets a fresh copy each time."""

    def __init__(self, threads: int):
        from zipnn import ZipNN

        self.factory, self.threads = ZipNN, threads
        self.label = "ZipNN " + _version("zipnn")

    def setup(self, dataset):
        self.z = self.factory(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dataset.dtype], threads=self.threads)

    def prepare(self, data):
        return bytearray(data)

    def encode(self, name, data):
        return self.z.compress(data)

    def stored_size(self, stored):
        return len(stored)

    def decode(self, name, stored, nbytes):
        return self.z.decompress(stored)


class RbeFile(Method):
    """The whole file path: rbe's Writer to a real file, its Reader back (checksums on)."""

    def __init__(self, level: int, threads: int):
        self.level, self.threads = level, threads
        self.label = "rbe file " + level_name(level) + " (Writer/Reader)"

    def setup(self, dataset):
        os.makedirs(OUT_DIR, exist_ok=True)
        self.tmpdir = tempfile.mkdtemp(prefix="lossless.", dir=OUT_DIR)
        self.path = os.path.join(self.tmpdir, "model.rbe")
        self.dtype = dataset.dtype
        self.writer = Writer(self.path, codec=Byteplane(level=self.level), threads=self.threads)
        self.reader = None

    def encode(self, name, data):
        view = memoryview(data)
        self.writer.add_tensor(
            name, self.dtype, [len(view) // DTYPES[self.dtype].itemsize], lambda o, n: view[o : o + n], dedup=False
        )
        return name

    def stored_size(self, stored):
        return 0  # the whole file is counted once, by end_encode

    def end_encode(self):
        self.writer.close()  # writes the manifest and footer, which are part of what is stored
        return os.path.getsize(self.path)

    def decode(self, name, stored, nbytes):
        if self.reader is None:
            self.reader = Reader(self.path, threads=self.threads)
        return self.reader.tensor_bytes(name)

    def finish(self):
        if getattr(self, "writer", None) is not None:
            self.writer.abort()  # a no-op once closed; discards a half-written file after an error
        if getattr(self, "reader", None) is not None:
            self.reader.close()
        if getattr(self, "tmpdir", None) is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


# -- measuring --------------------------------------------------------------------------


@dataclass
class Encoded:
    stored: list
    size: int
    seconds: float


def encode_all(method: Method, dataset: Dataset) -> Encoded:
    """Compresses every tensor on its own; only the method's own calls are timed."""
    method.setup(dataset)
    stored, seconds = [], 0.0
    for name, data in dataset.tensors:
        arg = method.prepare(data)
        t0 = time.perf_counter()
        stored.append(method.encode(name, arg))
        seconds += time.perf_counter() - t0
        del arg
    t0 = time.perf_counter()
    total = method.end_encode()
    seconds += time.perf_counter() - t0
    size = total if total is not None else sum(method.stored_size(s) for s in stored)
    return Encoded(stored, size, seconds)


def decode_all(method: Method, dataset: Dataset, encoded: Encoded) -> tuple[float, bool]:
    """One decode pass over every tensor: (seconds spent in the method, all bytes equal)."""
    seconds, exact = 0.0, True
    for (name, data), stored in zip(dataset.tensors, encoded.stored):
        t0 = time.perf_counter()
        out = method.decode(name, stored, data.nbytes)
        seconds += time.perf_counter() - t0
        exact &= memoryview(out).cast("B") == memoryview(data)
        del out
    return seconds, exact


def measure(methods: list[Method], dataset: Dataset) -> list[dict]:
    """Encodes with every method, then decodes in rounds that visit every method once.

    Interleaving the rounds spreads a burst of load from elsewhere on the machine
    over all methods instead of one; the best round of each method counts.
    """
    encoded, rows = [], []
    try:
        for method in methods:
            print(f"... {dataset.name}: encoding with {method.label}", file=sys.stderr, flush=True)
            encoded.append(encode_all(method, dataset))
        best = [float("inf")] * len(methods)
        exact = [True] * len(methods)
        for _ in range(DECODE_REPEATS):
            for i, method in enumerate(methods):
                gc.collect()
                seconds, ok = decode_all(method, dataset, encoded[i])
                best[i], exact[i] = min(best[i], seconds), exact[i] and ok
    finally:
        for method in methods:
            method.finish()
    raw = dataset.raw_bytes
    for method, enc, seconds, ok in zip(methods, encoded, best, exact):
        rows.append(
            {
                "dataset": dataset.name,
                "method": method.label,
                "raw_bytes": raw,
                "stored_bytes": enc.size,
                "ratio": raw / enc.size,
                "compress_MBps": raw / 1e6 / enc.seconds,
                "decompress_MBps": raw / 1e6 / seconds,
                "bit_exact": bool(ok),
            }
        )
    return rows


def bound_row(dataset: Dataset) -> dict:
    width = DTYPES[dataset.dtype].itemsize
    size = sum(order0_plane_bytes(t, width) for _, t in dataset.tensors)
    raw = dataset.raw_bytes
    return {
        "dataset": dataset.name,
        "method": "order-0 planes bound",
        "raw_bytes": raw,
        "stored_bytes": round(size),
        "ratio": raw / size,
        "compress_MBps": None,
        "decompress_MBps": None,
        "bit_exact": None,
    }


def methods(threads: int, levels: list[int], pool: ThreadPoolExecutor | None) -> list[Method]:
    """The anchors, then rbe's codec at each level, its max-ratio mode and the file path."""
    rbe = [RbeByteplane(level, pool) for level in levels]
    rbe.append(RbeByteplane(levels[0], pool, split_gain=0.0))
    return [PlainZstd(3, pool), PlainZstd(19, pool), ZipNNMethod(threads), *rbe, RbeFile(levels[0], threads)]


def datasets(models: list[str]):
    """Yields one dataset at a time so that only one model's casts are in memory."""
    for key in models:
        title, locate, dtypes = MODELS[key]
        fp32 = load_fp32(locate())
        for dtype in dtypes:
            yield Dataset(f"{title} {dtype.lower()}", dtype, cast(fp32, dtype))


# -- output -----------------------------------------------------------------------------

COLUMNS = [
    ("dataset", "dataset", "<", "{}"),
    ("method", "method", "<", "{}"),
    ("raw MB", "raw_bytes", ">", "{:.1f}"),
    ("stored MB", "stored_bytes", ">", "{:.1f}"),
    ("ratio", "ratio", ">", "{:.4f}"),
    ("compress MB/s", "compress_MBps", ">", "{:.1f}"),
    ("decompress MB/s", "decompress_MBps", ">", "{:.1f}"),
    ("bit-exact", "bit_exact", "<", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row[key]
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        value = value / 1e6
    if key == "bit_exact":
        value = "yes" if value else "NO"
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    cells = [[_cell(r, key, fmt) for _, key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, *_rest) in enumerate(COLUMNS)]
    line = lambda values: "  ".join(  # noqa: E731
        f"{v:{COLUMNS[i][2]}{widths[i]}}" for i, v in enumerate(values)
    ).rstrip()
    out = [line([c[0] for c in COLUMNS]), line(["-" * w for w in widths])]
    previous = None
    for r, c in zip(rows, cells):
        if previous is not None and r["dataset"] != previous:
            out.append("")
        previous = r["dataset"]
        out.append(line(c))
    return "\n".join(out)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def source_revision() -> str | None:
    """The commit the code under test comes from, "+dirty" if rbe's sources differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = ["git", "--no-optional-locks", "-C", root]  # read-only: never refreshes the index
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "rbeformat", "converters"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def environment(revision: str | None, threads: int, levels: list[int]) -> dict:
    return {
        "revision": revision,
        "threads": threads,
        "rbe_levels": levels,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "zstandard": zstandard.__version__,
        "zipnn": _version("zipnn"),
        "decode_repeats": DECODE_REPEATS,
        "zstd_chunk_bytes": ZSTD_CHUNK_BYTES,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only")
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--threads", type=int, default=2, help="threads for every method (default 2)")
    parser.add_argument(
        "--levels",
        default=f"{PLANES},19",
        help=f"zstd levels for rbe byteplane rows, comma-separated; {PLANES} is rbe's preset "
        f"(default {PLANES},19; the first also gets the max-ratio and file rows)",
    )
    parser.add_argument("--json", default=os.path.join(OUT_DIR, "lossless.json"), help="where the rows go")
    args = parser.parse_args(argv)
    models = ["minilm"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    revision = source_revision()  # taken first: the tree may change while the run goes on
    rows = []
    pool = ThreadPoolExecutor(args.threads) if args.threads > 1 else None
    try:
        for dataset in datasets(models):
            rows.append(bound_row(dataset))
            rows.extend(measure(methods(args.threads, levels, pool), dataset))
            del dataset
            gc.collect()
    finally:
        if pool is not None:
            pool.shutdown()
    print(format_table(rows))
    print(
        f"\nrevision {revision}; threads={args.threads}; MB = 1e6 bytes of raw tensor data; decompress is "
        f"the best of {DECODE_REPEATS} passes; every tensor is compressed on its own."
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"environment": environment(revision, args.threads, levels), "rows": rows}, fh, indent=2)
    failed = [r for r in rows if r["bit_exact"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
