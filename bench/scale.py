"""Conversions of checkpoints larger than memory: peak RSS and time, block by block.

Builds Llama-shaped bf16 checkpoints with random weights (transformers'
``LlamaConfig`` and its own initialization, written block by block in shards
with an index, SmolLM2's tokenizer beside them), then converts each with
``rbe_converters.pipeline.convert_model`` in a child Python whose peak resident
set (``getrusage``, the kernel's own high-water mark, not a sample) and time
are measured, optionally inside a memory cap (a cgroup v1 memory limit, where
the machine allows creating one).  Quality on random weights means nothing and
is not reported.

    python -m bench.scale --sizes 0.8b                 # make and convert the 0.8 B checkpoint
    python -m bench.scale --sizes 2.9b --cap-gib 4     # inside a 4 GiB memory cap
    python -m bench.scale --make-only --sizes 2.9b,6.7b
    python -m bench.scale --sizes 0.8b --resume-check   # SIGKILL half way, then --resume
    python -m bench.scale --sizes 0.8b --jobs q4,q4-ray2  # on a local Ray of 2 workers: the same bytes?
    python -m bench.scale --sizes 6.7b --resume          # in sittings: each goes on where the last stopped

Sizes (hidden / layers / MLP / heads / kv heads / vocabulary):

- ``0.8b``: 2048 / 12 / 5632 / 16 / 16 / 49152, untied, 0.82 B
- ``2.9b``: 3072 / 28 / 8192 / 24 / 8 / 49152, tied (Llama-3.2-3B's shapes), 2.97 B
- ``2.9b-14``: the same with 14 layers, for the check that peak memory does not grow with depth
- ``2.9b-2``, ``6.7b-2``: those shapes with 2 layers, a check of the memory bound in minutes
- ``6.7b``: 4096 / 32 / 11008 / 32 / 32 / 49152, untied (Llama-2-7B's shapes with SmolLM2's
  vocabulary, so that its tokenizer's ids are valid), 6.88 B
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .models import cache_dir, smollm2_dir

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "scale")
SHARD_BYTES = 2 * 2**30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        block = attention + 3 * self.hidden * self.mlp + 2 * self.hidden
        return self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


BASE_BYTES = 1.0e9  # Python, numpy, torch, transformers, the tokenizer and the survey's results


def predicted_peak(shape: Shape, windows: int, window: int = 512) -> float:
    """The README's bound on a calibrated conversion's peak RSS, in bytes: the interpreter, the largest
    of its phases (see ``peak_phases``) and every window's hidden states at two block boundaries."""
    hidden = min(8 * windows * window * shape.hidden, 2**30)  # past 512 MiB a boundary's spill to a file
    return BASE_BYTES + max(peak_phases(shape, window).values()) + hidden


def peak_phases(shape: Shape, window: int = 512) -> dict[str, float]:
    """What each phase of a calibrated conversion holds beyond the interpreter, in bytes, for a Llama
    block of b parameters, hidden size h, MLP width m and vocabulary v (the README's table)."""
    h, m, v = shape.hidden, shape.mlp, shape.vocab
    head_dim = h // shape.heads
    b = 2 * h * h + 2 * h * shape.kv_heads * head_dim + 3 * h * m
    hessians = 8 * (3 * h * h + m * m)  # a block's inputs: q/k/v, o and gate/up read h values, down reads m
    samples = hessians / 8  # the inputs themselves where few: at most a quarter of the width's tokens
    band = 4 * 1024 * m  # x^T x is added to its sum 1024 rows at a time (calibrate.torch.MOMENT_ROWS)
    return {
        "survey: a block runs, its Hessians summed": 4 * b + hessians + samples + band,
        "survey: a weight scored": hessians + samples + 9 * h * m + 0.3e9,
        "encoding: a block runs, a stage's Hessian summed": 6 * b + 8 * m * m + band,
        # H and its factor; the weight stored, in float32, decoded and as codes; the block's other
        # weights encoded so far, in their stored dtype; GPTQ's four slices of rows (64 MiB each)
        "encoding: GPTQ of the widest stage": 2 * b + 16 * m * m + 9 * h * m + 4 * 64 * 2**20,
        "the embedding or head encoded": 8 * v * h + 0.5e9,
        "the final norm and head run": 4 * v * h * (1 if shape.tied else 2) + 4 * window * v,
    }


SIZES = {
    "0.8b": Shape(2048, 12, 5632, 16, 16, 49152, tied=False),
    "2.9b": Shape(3072, 28, 8192, 24, 8, 49152, tied=True),
    "2.9b-14": Shape(3072, 14, 8192, 24, 8, 49152, tied=True),
    "2.9b-2": Shape(3072, 2, 8192, 24, 8, 49152, tied=True),
    "6.7b-2": Shape(4096, 2, 11008, 32, 32, 49152, tied=False),
    "6.7b": Shape(4096, 32, 11008, 32, 32, 49152, tied=False),
}


def llama_config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.mlp,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )


def make_checkpoint(shape: Shape, folder: str, seed: int = 0) -> str:
    """Writes a bf16 Llama checkpoint of ``shape`` into ``folder`` (kept when complete), one
    module group at a time, so that making it needs about one shard of memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    done = folder + ".complete"  # beside the folder: a file inside it would be converted with the model
    if os.path.exists(done):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    config = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    groups = [model.model.embed_tokens, *model.model.layers, model.model.norm]
    if not shape.tied:
        groups.append(model.lm_head)
    names = {id(module): name for name, module in model.named_modules()}
    shards: list[dict] = [{}]
    for index, module in enumerate(groups):
        torch.manual_seed(seed * 100003 + index)
        module.to_empty(device="cpu")
        module.to(torch.bfloat16)
        for sub in module.modules():
            model._init_weights(sub)
        prefix = names[id(module)]
        for key, value in module.state_dict().items():
            shards[-1][f"{prefix}.{key}"] = value.contiguous()
        if sum(v.numel() * 2 for v in shards[-1].values()) >= SHARD_BYTES:
            _write_shard(shards, folder, save_file)
            shards.append({})
        module.to("meta")
    if shards[-1]:
        _write_shard(shards, folder, save_file)
    _write_index(shards, folder)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(smollm2_dir(), name), os.path.join(folder, name))
    open(done, "w").close()
    return folder


def _shard_name(index: int) -> str:
    return f"model-{index + 1:05d}.safetensors"


def _write_shard(shards: list[dict], folder: str, save_file) -> None:
    save_file(shards[-1], os.path.join(folder, _shard_name(len(shards) - 1)), metadata={"format": "pt"})
    shards[-1] = {name: None for name in shards[-1]}  # names kept for the index, values released


def _write_index(shards: list[dict], folder: str) -> None:
    count = len(shards)
    weight_map = {}
    for index, shard in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        os.replace(os.path.join(folder, _shard_name(index)), os.path.join(folder, final))
        weight_map.update({name: final for name in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=1)


def checkpoint_dir(size: str) -> str:
    return os.path.join(cache_dir(), "scale", f"llama-{size}-bf16")


# -- measured conversions -----------------------------------------------------------------

CHILD = """
import json, resource, sys, time
from rbe_converters.pipeline import ConvertOptions, StderrReporter, convert_model
options = ConvertOptions(**json.loads(sys.argv[3]))
start = time.perf_counter()
result = convert_model(sys.argv[1], sys.argv[2], options, StderrReporter())
print(json.dumps({"seconds": time.perf_counter() - start, "file_bytes": result.totals["file_bytes"],
                  "bits_per_weight": result.totals["bits_per_weight"]}))
"""


def run_capped(argv: list[str], cap_gib: float | None, log_path: str, append: bool = False) -> tuple[int, float, str]:
    """Runs ``argv`` (inside a cgroup v1 memory cap of ``cap_gib`` when given); returns
    (exit code, peak RSS in bytes of the child and its children, stdout)."""
    cgroup = _make_cgroup(cap_gib) if cap_gib else None

    def enter_cgroup():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))

    with open(log_path, "a" if append else "w") as log, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=log, text=True, preexec_fn=enter_cgroup)
        # wait4: this child's own peak (its ru_maxrss), not the largest of every child so far
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    if cgroup:
        os.rmdir(cgroup)
    return proc.returncode, usage.ru_maxrss * 1024, stdout


def _make_cgroup(cap_gib: float) -> str:
    root = "/sys/fs/cgroup/memory"
    if not os.path.isdir(root):
        raise SystemExit("no cgroup v1 memory controller here: run without --cap-gib, or cap the job another way")
    path = os.path.join(root, f"rbe-scale-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(path)
    with open(os.path.join(path, "memory.limit_in_bytes"), "w") as fh:
        fh.write(str(int(cap_gib * 2**30)))
    return path


JOBS = {
    "lossless": {},
    "q8": {"preset": "q8"},
    "q4": {"preset": "q4", "calibration_windows": 2},
}
# The same conversions on a local Ray of 1 or 2 workers: each must write the single-process file's bytes.
for _job in ("lossless", "q8", "q4"):
    for _workers in (1, 2):
        JOBS[f"{_job}-ray{_workers}"] = dict(JOBS[_job], ray="local", ray_workers=_workers)

LLAMA_70B = Shape(8192, 80, 28672, 64, 8, 32000, tied=False)


def gptq_work(shape: Shape) -> float:
    """A block's GPTQ arithmetic, rows x columns^2 summed over its Linear weights (the factor of H and
    the column by column updates dominate): what the per-block encoding time scales with."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    rows_by_input = [(shape.hidden, shape.hidden), (kv, shape.hidden), (kv, shape.hidden), (shape.hidden, shape.hidden)]
    rows_by_input += [(shape.mlp, shape.hidden), (shape.mlp, shape.hidden), (shape.hidden, shape.mlp)]
    return float(sum(rows * columns**2 for rows, columns in rows_by_input))


def projection_70b(shape: Shape, seconds: float, machines=(1, 2, 4, 8)) -> list[str]:
    """On paper: Llama-2-70B's calibrated q4 time from this run's time per block, scaled by the GPTQ
    arithmetic per block, on N machines of this kind.  Ray spreads a block's work only as wide as its
    widest stage (3: q, k and v) and mixed precision's 7 scores, so N above 3 buys little."""
    per_block = seconds / shape.layers * gptq_work(LLAMA_70B) / gptq_work(shape)
    lines = []
    for n in machines:
        hours = LLAMA_70B.layers * per_block / min(n, 3) / 3600
        lines.append(f"70 B on {n} machine{'s' if n > 1 else ''}: about {hours:.0f} h (at most 3 tasks at once)")
    return lines


def resume_check(size: str, folder: str, threads: int | None, cap_gib: float | None) -> dict:
    """The calibrated q4 conversion uninterrupted; again, killed with SIGKILL once half the blocks are
    written; then ``--resume``: whether the bytes match, the resumed run's time against the full run's,
    and whether anything was at the output path while it was interrupted."""
    import signal

    from rbe_converters.resume import state_dir

    options = dict(JOBS["q4"], force=True, threads=threads)
    whole, out = os.path.join(OUT_DIR, f"{size}-q4-whole.rbe"), os.path.join(OUT_DIR, f"{size}-q4-resumed.rbe")
    argv = [sys.executable, "-c", CHILD, folder, whole, json.dumps(options)]
    code, peak, stdout = run_capped(argv, cap_gib, os.path.join(OUT_DIR, f"{size}-resume-whole.log"))
    full = json.loads(stdout.strip().splitlines()[-1])["seconds"] if code == 0 else None
    layers = SIZES[size].layers
    argv = [sys.executable, "-c", CHILD, folder, out, json.dumps(options)]
    with open(os.path.join(OUT_DIR, f"{size}-resume-killed.log"), "w") as log:
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        block = os.path.join(state_dir(out), "block.json")
        while child.poll() is None:
            time.sleep(2)
            try:
                with open(block) as fh:
                    if json.load(fh)["block"] + 1 >= layers // 2:
                        child.send_signal(signal.SIGKILL)
                        break
            except (OSError, ValueError):
                pass
        child.wait()
    interrupted_output = os.path.exists(out)
    argv = [sys.executable, "-c", CHILD, folder, out, json.dumps(dict(options, resume=True))]
    code, resumed_peak, stdout = run_capped(argv, cap_gib, os.path.join(OUT_DIR, f"{size}-resume-resumed.log"))
    resumed = json.loads(stdout.strip().splitlines()[-1])["seconds"] if code == 0 else None

    def sha(path: str) -> str | None:
        return _sha256(path) if os.path.exists(path) else None

    return {
        "full_seconds": full,
        "resumed_seconds": resumed,
        "ratio": resumed / full if full and resumed else None,
        "identical": sha(whole) is not None and sha(whole) == sha(out),
        "output_while_interrupted": interrupted_output,
        "peak_full_gb": peak / 1e9,
        "peak_resumed_gb": resumed_peak / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.8b", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--jobs", default="q4", help=f"comma-separated, of {', '.join(JOBS)}")
    parser.add_argument("--cap-gib", type=float, default=None, help="run each conversion inside this memory cap")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--make-only", action="store_true", help="only make the checkpoints")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on from an interrupted run of the same job (its time is then this sitting's alone)",
    )
    parser.add_argument(
        "--resume-check",
        action="store_true",
        help="q4 uninterrupted, then killed half way and resumed: same bytes? time of the resumed run",
    )
    args = parser.parse_args(argv)
    os.makedirs(OUT_DIR, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        shape = SIZES[size]
        start = time.perf_counter()
        folder = make_checkpoint(shape, checkpoint_dir(size))
        print(f"{size}: {shape.parameters() / 1e9:.2f} B parameters in {folder} ({time.perf_counter() - start:.0f} s)")
        if args.make_only:
            continue
        if args.resume_check:
            print(
                json.dumps({"checkpoint": size, **resume_check(size, folder, args.threads, args.cap_gib)}), flush=True
            )
            continue
        for job in args.jobs.split(","):
            options = dict(JOBS[job], force=True, threads=args.threads, resume=args.resume)
            out = os.path.join(OUT_DIR, f"{size}-{job}.rbe")
            log = os.path.join(OUT_DIR, f"{size}-{job}.log")
            code, peak, stdout = run_capped(
                [sys.executable, "-c", CHILD, folder, out, json.dumps(options)], args.cap_gib, log, args.resume
            )
            result = json.loads(stdout.strip().splitlines()[-1]) if code == 0 else {}
            bound = (
                predicted_peak(shape, JOBS[job]["calibration_windows"]) if "calibration_windows" in JOBS[job] else None
            )
            result["sha256"] = _sha256(out) if code == 0 else None
            rows.append((size, job, code, peak, bound, result))
            print(_row(*rows[-1]), flush=True)
            if job == "q4" and code == 0:
                print("\n".join(projection_70b(shape, result["seconds"])), flush=True)
    if rows:
        print(
            "\n| checkpoint | job | exit | peak RSS | README bound | time | file | bits/weight | same bytes as |"
            "\n|---|---|---|---|---|---|---|---|---|"
        )
        shas = {(size, job): result.get("sha256") for size, job, _, _, _, result in rows}
        for row in rows:
            print(_row(*row, same=_same_as(row[0], row[1], shas)))


def _same_as(size: str, job: str, shas: dict) -> str:
    """For a Ray job: whether its file is the single-process job's, byte for byte (when both ran)."""
    if "-ray" not in job:
        return "-"
    single = shas.get((size, job.split("-ray")[0]))
    if single is None or shas.get((size, job)) is None:
        return "not compared"
    return f"{job.split('-ray')[0]}: {'yes' if single == shas[(size, job)] else 'NO'}"


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 24), b""):
            digest.update(piece)
    return digest.hexdigest()


def _row(size: str, job: str, code: int, peak: float, bound: float | None, result: dict, same: str = "-") -> str:
    limit = f"{bound / 1e9:.2f} GB" if bound else "-"
    if "seconds" not in result:
        return f"| {size} | {job} | {code} | {peak / 1e9:.2f} GB | {limit} | - | - | - | - |"
    minutes, size_gb, bits = result["seconds"] / 60, result["file_bytes"] / 1e9, result["bits_per_weight"]
    return (
        f"| {size} | {job} | {code} | {peak / 1e9:.2f} GB | {limit} | {minutes:.1f} min | {size_gb:.2f} GB "
        f"| {bits:.2f} | {same} |"
    )


if __name__ == "__main__":
    main()
