"""Peak memory of ``rbe convert`` and ``rbe decode`` on a multi-GB sharded checkpoint.

Builds a synthetic Llama-shaped checkpoint (sharded safetensors with an index
and a config.json; float32 weights drawn from N(0, 0.02), the last layer in
bf16; the largest tensor, the embedding, about 512 MiB), converts it as
``rbe convert`` does (``rbe_converters.pipeline.convert_model``), decodes it back
as ``rbe decode`` does (``rbe_converters.decode.decode_to``) and checks every
file is byte-identical.  Each step runs as a child Python process calling the
library function, whose peak resident set is measured, so the numbers are the
step's own and not this script's.

    python -m bench.rss                       # about 4.7 GB
    python -m bench.rss --size-gb 0.3 --keep  # small, and keep the files

The streaming writer should need about two copies of the largest tensor plus
the interpreter; the table checks peak RSS against 2 x largest + 400 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from .lossless import source_revision, to_bf16

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
VOCAB = 32768
LARGEST_TARGET = 512 * 2**20  # bytes of the embedding at full size
SHARDS = 5
PIECE_ITEMS = 8 * 2**20  # generated and written this many elements at a time
OVERHEAD_BYTES = 400e6  # interpreter, numpy, zstd contexts, pipeline buffers
MiB = 2**20


# -- the synthetic checkpoint -----------------------------------------------------------


@dataclass
class Spec:
    name: str
    dtype: str  # "F32" or "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype == "F32" else 2)


def _round_up(value: float, step: int) -> int:
    return max(step, int(math.ceil(value / step)) * step)


def llama_shapes(size_bytes: float) -> tuple[dict, list[Spec]]:
    """A config and tensor list of a Llama-like model of at least ``size_bytes``."""
    hidden = max(64, int(min(LARGEST_TARGET, size_bytes / 6) // (VOCAB * 4)) // 64 * 64)
    ffn = _round_up(hidden * 2.6875, 256)  # the 4096 -> 11008 ratio of Llama 2 7B

    def layer(i: int, dtype: str) -> list[Spec]:
        p = f"model.layers.{i}."
        return [
            Spec(p + "input_layernorm.weight", dtype, (hidden,)),
            *[Spec(p + f"self_attn.{x}_proj.weight", dtype, (hidden, hidden)) for x in "qkvo"],
            Spec(p + "post_attention_layernorm.weight", dtype, (hidden,)),
            Spec(p + "mlp.gate_proj.weight", dtype, (ffn, hidden)),
            Spec(p + "mlp.up_proj.weight", dtype, (ffn, hidden)),
            Spec(p + "mlp.down_proj.weight", dtype, (hidden, ffn)),
        ]

    ends = [Spec("model.norm.weight", "F32", (hidden,)), Spec("lm_head.weight", "F32", (VOCAB, hidden))]
    layers = 1
    while True:
        # Every layer is float32 except the last, which is bf16 so both element widths are exercised.
        body = [s for i in range(layers) for s in layer(i, "BF16" if i == layers - 1 else "F32")]
        specs = [Spec("model.embed_tokens.weight", "F32", (VOCAB, hidden)), *body, *ends]
        if sum(s.nbytes for s in specs) >= size_bytes:
            break
        layers += 1
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 128),
        "num_key_value_heads": max(1, hidden // 128),
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "_note": "synthetic weights for a benchmark",
    }
    return config, specs


def split_shards(specs: list[Spec], count: int) -> list[list[Spec]]:
    """Consecutive groups of tensors of roughly equal byte size."""
    target = sum(s.nbytes for s in specs) / count
    shards: list[list[Spec]] = [[]]
    filled = 0
    for spec in specs:
        if shards[-1] and filled + spec.nbytes / 2 > target * len(shards) and len(shards) < count:
            shards.append([])
        shards[-1].append(spec)
        filled += spec.nbytes
    return shards


def safetensors_header(specs: list[Spec]) -> bytes:
    obj, pos = {"__metadata__": {"format": "pt"}}, 0
    for s in specs:
        obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    text = json.dumps(obj, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_tensor(fh, spec: Spec, rng: np.random.Generator) -> None:
    """Writes N(0, 0.02) values in pieces so that no whole tensor is ever in memory."""
    remaining = math.prod(spec.shape)
    while remaining:
        n = min(PIECE_ITEMS, remaining)
        piece = rng.standard_normal(n, dtype=np.float32)
        piece *= np.float32(0.02)
        fh.write(memoryview(piece if spec.dtype == "F32" else to_bf16(piece.view(np.uint8))).cast("B"))
        remaining -= n


def build_checkpoint(root: str, size_bytes: float, seed: int = 0) -> list[Spec]:
    config, specs = llama_shapes(size_bytes)
    shards = split_shards(specs, SHARDS)
    os.makedirs(root)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header = safetensors_header(shard)
        with open(os.path.join(root, fname), "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header)
            for spec in shard:
                write_tensor(fh, spec, rng)
                weight_map[spec.name] = fname
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    _write_json(os.path.join(root, "model.safetensors.index.json"), index)
    _write_json(os.path.join(root, "config.json"), config)
    return specs


def _write_json(path: str, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


# -- measuring a child process ----------------------------------------------------------


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss: int  # bytes: GNU time's maxrss, or the sampled VmHWM without it
    peak_anon: int  # bytes, the largest RssAnon seen by sampling /proc
    peak_file: int  # bytes, the largest RssFile seen (mmap'd files, libraries; reclaimable)
    peak_hwm: int  # bytes, the largest VmHWM seen (the process's own high-water mark)
    stderr: str


TIME = shutil.which("time")  # GNU time, the program (the shell keyword of the same name is no use here)
_STATUS_KEYS = ("VmHWM:", "RssAnon:", "RssFile:")


def _proc_status(pid: int) -> dict[str, int]:
    """VmHWM, RssAnon and RssFile in bytes; empty once the process is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(_STATUS_KEYS):
                    key, kb, _unit = line.split()
                    values[key] = int(kb) * 1024
    except OSError:
        pass
    return values


def _only_child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = fh.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def run_measured(cmd: list[str]) -> ChildRun:
    """Runs ``cmd`` and measures its peak memory.

    A child's ru_maxrss starts from its parent's RSS at spawn time (Linux carries
    the high-water mark across fork and exec), so wait4 on a child of this
    multi-hundred-MB process would overstate small peaks.  GNU time spawns
    the command from a process of a few MB instead.  /proc is sampled as well
    for the anonymous / file-backed split and as the fallback without time.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as report:
        wrapped = TIME is not None
        full = [TIME, "-f", "%M", "-o", report.name, *cmd] if wrapped else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peaks, done = dict.fromkeys(_STATUS_KEYS, 0), threading.Event()

        def sample() -> None:
            target = None
            while not done.is_set():
                target = target or (_only_child(proc.pid) if wrapped else proc.pid)
                if target is not None:
                    for key, value in _proc_status(target).items():
                        peaks[key] = max(peaks[key], value)
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stderr = proc.stderr.read().decode(errors="replace")  # drains the pipe so the child never blocks
        proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.stderr.close()
        maxrss = int(report.read().strip().splitlines()[-1]) * 1024 if wrapped and proc.returncode == 0 else 0
    peak = maxrss or peaks["VmHWM:"]
    return ChildRun(proc.returncode, wall, peak, peaks["RssAnon:"], peaks["RssFile:"], peaks["VmHWM:"], stderr)


# A child process running one library step: ``convert`` (``pipeline.convert_model``) or ``decode``
# (``decode.decode_to``), with its options as JSON; a failure exits non-zero with the traceback on stderr.
LIBRARY_STEP = """
import json, sys
step, src, dst, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if step == "convert":
    from rbe_converters.pipeline import ConvertOptions, convert_model
    convert_model(src, dst, ConvertOptions(**options))
else:
    from rbe_converters.decode import decode_to
    decode_to(src, dst, **options)
"""


def library_command(step: str, src: str, dst: str, **options) -> list[str]:
    """The command line of a child Python that runs ``step`` (convert or decode) from ``src`` to ``dst``."""
    return [sys.executable, "-c", LIBRARY_STEP, step, src, dst, json.dumps(options)]


# -- checking ---------------------------------------------------------------------------


def sha256_file(path: str, block: int = 8 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def tree_digests(root: str) -> dict[str, str]:
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root)] = sha256_file(full)
    return found


def dir_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


# -- report -----------------------------------------------------------------------------

COLUMNS = [
    "step",
    "input GB",
    "largest tensor MiB",
    "peak RSS MiB",
    "anon MiB",
    "file-backed MiB",
    "bound MiB",
    "within bound",
    "wall s",
    "MB/s",
]


def row(
    step: str,
    input_bytes: int,
    largest: int,
    peak: int,
    anon: int | None,
    file: int | None,
    bound: float | None,
    wall: float,
    hwm: int | None = None,
) -> dict:
    return {
        "step": step,
        "input_bytes": input_bytes,
        "largest_tensor_bytes": largest,
        "peak_rss_bytes": peak,
        "peak_anon_bytes": anon,
        "peak_file_bytes": file,
        "sampled_hwm_bytes": hwm,
        "bound_bytes": bound,
        "within_bound": None if bound is None else peak <= bound,
        "wall_s": wall,
        "MBps": input_bytes / 1e6 / wall,
    }


def _cells(r: dict) -> list[str]:
    mib = lambda v: "-" if v is None else f"{v / MiB:.0f}"  # noqa: E731
    within = {None: "-", True: "yes", False: "NO"}[r["within_bound"]]
    return [
        r["step"],
        f"{r['input_bytes'] / 1e9:.2f}",
        mib(r["largest_tensor_bytes"]),
        mib(r["peak_rss_bytes"]),
        mib(r["peak_anon_bytes"]),
        mib(r["peak_file_bytes"]),
        mib(r["bound_bytes"]),
        within,
        f"{r['wall_s']:.1f}",
        f"{r['MBps']:.1f}",
    ]


def format_table(rows: list[dict]) -> str:
    cells = [_cells(r) for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]
    fmt = lambda vals: "  ".join(  # noqa: E731
        f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(vals, widths))
    )
    return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells)])


# -- main -------------------------------------------------------------------------------


def run(args) -> int:
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    ckpt, rbe_file, decoded = (os.path.join(workdir, n) for n in ("checkpoint", "model.rbe", "decoded"))
    for path in (ckpt, rbe_file, decoded):
        if os.path.lexists(path):
            raise SystemExit(f"{path} exists; remove it or pick another --workdir")
    _config, planned = llama_shapes(args.size_gb * 1e9)
    need = 3.1 * sum(s.nbytes for s in planned)  # input, container (~0.8x) and the decoded copy
    if shutil.disk_usage(workdir).free < need:
        raise SystemExit(f"{workdir}: needs about {need / 1e9:.1f} GB free")
    rows, created = [], [ckpt, rbe_file, decoded]
    revision = source_revision()  # taken first: the tree may change while the run goes on
    try:
        t0 = time.perf_counter()
        specs = build_checkpoint(ckpt, args.size_gb * 1e9)
        gen_wall = time.perf_counter() - t0
        total = dir_bytes(ckpt)
        largest = max(s.nbytes for s in specs)
        bound = 2 * largest + OVERHEAD_BYTES
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append(row("generate (this script)", total, largest, self_peak, None, None, 1024 * MiB, gen_wall))
        print(
            f"checkpoint: {len(specs)} tensors, {total / 1e9:.2f} GB in {SHARDS} shards, largest tensor "
            f"{largest / MiB:.0f} MiB",
            file=sys.stderr,
        )

        threads = {"threads": args.threads} if args.threads else {}
        level = {"level": args.level} if args.level is not None else {}
        for step, cmd in (
            ("rbe convert", library_command("convert", ckpt, rbe_file, **level, **threads)),
            ("rbe decode", library_command("decode", rbe_file, decoded, **threads)),
        ):
            print(f"running {step} ...", file=sys.stderr, flush=True)
            child = run_measured(cmd)
            if child.returncode != 0:
                print(child.stderr, file=sys.stderr)
                raise SystemExit(f"{step} failed with exit code {child.returncode}")
            rows.append(
                row(
                    step,
                    total,
                    largest,
                    child.peak_rss,
                    child.peak_anon,
                    child.peak_file,
                    bound,
                    child.wall_s,
                    child.peak_hwm,
                )
            )

        print("comparing sha256 of every file ...", file=sys.stderr, flush=True)
        before, after = tree_digests(ckpt), tree_digests(decoded)
        identical = before == after
        container = os.path.getsize(rbe_file)
    finally:
        if not args.keep:
            for path in created:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
            _rmdir_if_empty(workdir)

    print(format_table(rows))
    print(
        f"\nrevision {revision}; container {container / 1e9:.3f} GB (ratio {total / container:.4f}); "
        f"decoded files byte-identical: {'yes' if identical else 'NO'} ({len(before)} files)"
    )
    print(
        f"bound = 2 x largest tensor + {OVERHEAD_BYTES / 1e6:.0f} MB; peak RSS = maxrss from GNU time "
        "(sampled VmHWM without it); anon / file-backed = largest RssAnon / RssFile sampled every 20 ms"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(
            {
                "revision": revision,
                "rows": rows,
                "container_bytes": container,
                "identical": identical,
                "files": len(before),
                "cpu_count": os.cpu_count(),
                "level": args.level,
                "threads": args.threads,
            },
            fh,
            indent=2,
        )
    ok = identical and all(r["within_bound"] is not False for r in rows)
    return 0 if ok else 1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=4.2, help="minimum checkpoint size in GB (default 4.2)")
    parser.add_argument(
        "--workdir",
        default=os.path.join(OUT_DIR, "rss-work"),
        help="where the checkpoint, container and decoded copy go (default bench/out/rss-work)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--json", default=os.path.join(OUT_DIR, "rss.json"), help="where the rows go")
    parser.add_argument("--level", type=int, default=None, help="passed to rbe convert --level")
    parser.add_argument("--threads", type=int, default=None, help="passed to rbe convert/decode --threads")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
