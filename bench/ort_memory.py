"""Resident weight memory and latency of ONNX Runtime sessions: dense against on the fly.

Converts an fp32 ONNX sentence encoder (paraphrase-MiniLM-L3-v2 by default)
with ``RECIPE`` (Linear weights 4-bit asym in groups of 32 along the input axis,
embedding tables 8-bit asym in groups of 64), then writes two models from the
same .rbe: the dense decode (``rbe export-onnx``) and the on-the-fly graph
(``rbe export-onnx --on-the-fly``).  Each model is measured in a fresh child
process that opens it as any program would, ``onnxruntime.InferenceSession(path)``
with default options:

* resident MB (median of three processes): the process's RSS after the session is created minus its RSS
  after an empty session (one Identity node) was created, which loads the
  library and its allocators first;
* latency: median of 50 batch-1 runs (median of the three medians) of one sentence (one intra-op thread);
* mean cosine of the pooled sentence embeddings of 16 sentences to the dense
  model, and to the fp32 original.

    python -m bench.ort_memory                 # prints the table
    python -m bench.ort_memory --keep DIR      # and keeps the files in DIR
    python -m bench.ort_memory --rbe q4.rbe [--model fp32.onnx]   # an .rbe made by rbe convert
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from bench.ort_sessions import ORT_OPEN  # the session opened after an empty one, its RSS measured

RECIPE = {
    "rule": [
        {
            "roles": ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down", "linear"],
            "input_last": False,
            "codec": "transpose(values=gquant(bits=4, group=32, mode=asym))",
        },
        {"roles": ["token_embedding", "position_embedding"], "codec": "gquant(bits=8, group=64, mode=asym)"},
    ]
}
SENTENCES = 16
RUNS = 50
REPEATS = 3

# Runs in the child: argv = model path, tokenizer.json, output .npy path.
CHILD = (
    r"""
import json, os, sys, time
import numpy as np
from tokenizers import Tokenizer
job = {"model": sys.argv[1]}
"""
    + ORT_OPEN
    + r"""
tokenizer = Tokenizer.from_file(sys.argv[2])
tokenizer.enable_padding()
tokenizer.enable_truncation(128)
sentences = json.loads(sys.argv[4])
def feeds(texts):
    encoded = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encoded], np.int64)
    mask = np.array([e.attention_mask for e in encoded], np.int64)
    wanted = {i.name for i in session.get_inputs()}
    given = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: value for name, value in given.items() if name in wanted}
def pooled_of(outputs, mask):
    flat = [o for o in outputs if o.dtype == np.float32 and o.ndim == 2]
    if flat:  # the model pools itself
        return flat[0]
    hidden = [o for o in outputs if o.dtype == np.float32 and o.ndim == 3][0]  # last_hidden_state: mean-pool it
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(1) / weights.sum(1)
batch = feeds(sentences)
pooled = pooled_of(session.run(None, batch), batch["attention_mask"])
np.save(sys.argv[3], pooled)
one = feeds(sentences[:1])
session.run(None, one)
times = []
for _ in range(int(sys.argv[5])):
    start = time.perf_counter()
    session.run(None, one)
    times.append(time.perf_counter() - start)
print(json.dumps({"resident": resident, "latency": float(np.median(times)), "rss_after_runs": rss() - before}))
"""
)


def build(model_path: str, folder: str) -> dict[str, str]:
    """The .rbe and the dense and on-the-fly .onnx files made from it; returns their paths."""
    from rbe_converters.compress.recipe import policy_from_document
    from rbe_converters.decode import decode_onnx_to, export_on_the_fly
    from rbe_converters.pipeline import convert

    paths = {name: os.path.join(folder, name) for name in ("model.rbe", "dense.onnx", "on-the-fly.onnx")}
    convert(model_path, paths["model.rbe"], policy=policy_from_document(RECIPE, "bench recipe"), force=True)
    decode_onnx_to(paths["model.rbe"], paths["dense.onnx"], force=True)
    export_on_the_fly(paths["model.rbe"], paths["on-the-fly.onnx"], force=True)
    return paths


def measure(
    model_path: str, tokenizer: str, sentences: list[str], folder: str, runs: int = RUNS, repeats: int = REPEATS
) -> dict:
    """Resident bytes and latency of ``model_path`` (medians over ``repeats`` fresh processes:
    the heap after parsing a model varies by several MB), and its pooled outputs."""
    out = os.path.join(folder, os.path.basename(model_path) + ".npy")
    results = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, model_path, tokenizer, out, json.dumps(sentences), str(runs)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {key: float(np.median([r[key] for r in results])) for key in results[0]}
    result["pooled"] = np.load(out).astype(np.float64)
    return result


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def table(rows: dict[str, dict]) -> str:
    dense = rows["dense"]
    lines = [
        f"{'session':<12} {'resident MB':>12} {'x dense':>8} {'latency ms':>11} {'x dense':>8} "
        f"{'cos dense':>10} {'cos fp32':>9}"
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<12} {row['resident'] / 1e6:>12.1f} {row['resident'] / dense['resident']:>8.3f} "
            f"{row['latency'] * 1e3:>11.2f} {row['latency'] / dense['latency']:>8.2f} "
            f"{mean_cosine(row['pooled'], dense['pooled']):>10.5f} "
            f"{mean_cosine(row['pooled'], rows['fp32']['pooled']):>9.5f}"
        )
    return "\n".join(lines)


def run(model_path: str, tokenizer: str, folder: str, runs: int = RUNS, rbe: str | None = None) -> dict[str, dict]:
    """The fp32 model, the dense decode and the on-the-fly graph of ``rbe`` (default: ``model_path``
    converted with ``RECIPE``), each measured in fresh processes."""
    from rbe_converters.evaluate.quality import default_sentences

    sentences = default_sentences(SENTENCES)
    paths = exports(rbe, folder) if rbe else build(model_path, folder)
    return {
        name: measure(path, tokenizer, sentences, folder, runs)
        for name, path in (
            ("fp32", model_path),
            ("dense", paths["dense.onnx"]),
            ("on-the-fly", paths["on-the-fly.onnx"]),
        )
    }


def exports(rbe: str, folder: str) -> dict[str, str]:
    """The dense and on-the-fly .onnx files of an existing .rbe (one converted from .onnx, or with --onnx)."""
    from rbe_converters.decode import decode_onnx_to, export_on_the_fly

    paths = {name: os.path.join(folder, name) for name in ("dense.onnx", "on-the-fly.onnx")}
    decode_onnx_to(rbe, paths["dense.onnx"], force=True)
    export_on_the_fly(rbe, paths["on-the-fly.onnx"], force=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an fp32 .onnx sentence encoder (default: paraphrase-MiniLM-L3-v2)")
    parser.add_argument("--tokenizer", help="its tokenizer.json (default: all-MiniLM-L6-v2's, the same vocabulary)")
    parser.add_argument("--keep", metavar="DIR", help="write the files into DIR and keep them")
    parser.add_argument("--runs", type=int, default=RUNS, help="batch-1 runs for the latency median")
    parser.add_argument(
        "--rbe",
        help="measure this .rbe (e.g. made with --preset q4) instead of converting --model "
        "with the built-in recipe; --model is then its fp32 original as .onnx",
    )
    args = parser.parse_args(argv)
    from bench.models import minilm_dir, paraphrase_onnx

    model = args.model or paraphrase_onnx()
    tokenizer = args.tokenizer or os.path.join(minilm_dir(), "tokenizer.json")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        print(table(run(model, tokenizer, args.keep, args.runs, args.rbe)))
        return
    with tempfile.TemporaryDirectory(prefix="rbe-ort-bench-") as folder:
        print(table(run(model, tokenizer, folder, args.runs, args.rbe)))


if __name__ == "__main__":
    main()
