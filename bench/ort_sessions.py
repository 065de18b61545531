"""rbe's on-the-fly ONNX Runtime sessions beside dense ORT, ORT's own 4-bit quantizer and dense PyTorch.

One run, one table.  Per model (paraphrase-MiniLM-L3-v2 from its ONNX file,
all-MiniLM-L6-v2 and SmolLM2-135M from their Hugging Face directories):

* ``fp32 ORT``: the dense fp32 graph (the ONNX file itself; for the HF models
  the graph ``rbe convert --preset lossless --onnx`` exports, written dense by
  ``rbe export-onnx``);
* ``ORT RTN`` / ``ORT GPTQ``: onnxruntime's ``MatMulNBitsQuantizer`` on that
  graph, 4-bit symmetric, blocks of 32 (its own defaults leave Gather tables
  and a tied head fp32); GPTQ calibrated on the calibration half of the text;
* ``rbe q4`` / ``rbe q3``: ``rbe convert --preset q4`` (or q3), with
  ``--tokenizer`` and ``--calibration-windows 128`` for the ONNX file and
  ``--onnx --calibration-windows 8`` for the HF directories, then
  ``rbe export-onnx --on-the-fly``;
* ``fp32 PyTorch``: transformers on the fp32 safetensors directory (none for
  the ONNX-only model).

Every model is measured in fresh child processes, one intra-op thread each
(torch too), opened as any program would (``InferenceSession(path)`` with
default options, ``from_pretrained``):

* file MB: the file(s) a user would ship (.onnx and its external data, the .rbe,
  the safetensors);
* resident MB: RSS after the session is created minus RSS after an empty ORT
  session; for PyTorch, RSS after ``from_pretrained`` and one forward (its
  safetensors are mapped, their pages resident once read) minus RSS after
  importing torch and transformers; median of three processes for the
  encoders, one for SmolLM2;
* latency: encoders, median of batch-1 runs on one sentence; SmolLM2, tokens/s
  of 64 greedy new tokens with the KV cache after a short prompt;
* quality against ``fp32 ORT``: mean cosine and nearest-neighbour agreement of
  the mean-pooled embeddings of sentences from the evaluation half of the text
  (the half calibration never sees), or perplexity on windows of 512 tokens of it.

    python -m bench.ort_sessions                        # the whole table (about 40 min on 2 cores)
    python -m bench.ort_sessions --models paraphrase    # one model
    python -m bench.ort_sessions --keep DIR             # keep (and reuse) the converted files in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MODELS = ("paraphrase", "minilm", "smollm2")
PRESETS = ("q4", "q3")
ORT_BLOCK = 32  # the anchor: MatMulNBitsQuantizer 4-bit, block 32, symmetric
SENTENCES = 128
CALIBRATION_SENTENCES = 64
RUNS = 50
REPEATS = 3
WINDOW = 512
PPL_WINDOWS = 4
CALIBRATION_WINDOWS = 8  # rbe's GPTQ on SmolLM2 (the preset's default is 32); ORT GPTQ gets 4
# An encoder calibrated in ONNX Runtime from its sentences costs seconds: 128 windows' worth of tokens
# (65,536, about half the calibration sentences) gave paraphrase-MiniLM-L3-v2 q4 cosine 0.9903 on
# 300 calibration sentences past them, against 0.9893 with the default 32.
ONNX_CALIBRATION_WINDOWS = 128
NEW_TOKENS = 64
PROMPT = "The Python interpreter reads a program and"

# -- child processes ------------------------------------------------------------------

_RSS = r"""
import os
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
"""

ORT_OPEN = (
    _RSS
    + r"""
import onnxruntime as ort
from onnx import TensorProto, helper
def options():
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return o
empty = helper.make_model(helper.make_graph(
    [helper.make_node("Identity", ["x"], ["y"])], "empty",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=[helper.make_opsetid("", 17)])
keep = ort.InferenceSession(empty.SerializeToString(), options())
before = rss()
session = ort.InferenceSession(job["model"], options())
resident = rss() - before
"""
)

_TORCH_OPEN = (
    _RSS
    + r"""
import torch, transformers
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
before = rss()
auto = transformers.AutoModelForCausalLM if job["causal"] else transformers.AutoModel
model = auto.from_pretrained(job["model"], dtype=torch.float32, trust_remote_code=False,
                              use_safetensors=True).eval()
"""
)

_ENCODER_FEEDS = r"""
import time
import numpy as np
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(job["tokenizer"])
tokenizer.enable_padding()
tokenizer.enable_truncation(128)
def encoded(texts):
    rows = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in rows], np.int64)
    return ids, np.array([e.attention_mask for e in rows], np.int64)
def mean_pool(hidden, mask):
    w = mask[..., None].astype(np.float32)
    return (hidden * w).sum(1) / np.maximum(w.sum(1), 1e-9)
def timed(run_once):
    run_once()
    times = []
    for _ in range(job["runs"]):
        start = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
"""

ORT_ENCODER = (
    "import json, sys\njob = json.loads(sys.argv[1])\n"
    + ORT_OPEN
    + _ENCODER_FEEDS
    + r"""
wanted = {i.name for i in session.get_inputs()}
def run(texts):
    ids, mask = encoded(texts)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    outputs = session.run(None, {k: v for k, v in feed.items() if k in wanted})
    flat = [o for o in outputs if o.dtype == np.float32 and o.ndim == 2]
    if flat:  # the graph pools itself
        return flat[0]
    return mean_pool([o for o in outputs if o.dtype == np.float32 and o.ndim == 3][0], mask)
pooled = np.concatenate([run(job["sentences"][i:i + 32]) for i in range(0, len(job["sentences"]), 32)])
np.save(job["out"], pooled)
latency = timed(lambda: run(job["sentences"][:1]))
print(json.dumps({"resident": resident, "latency": latency}))
"""
)

TORCH_ENCODER = (
    "import json, sys\njob = json.loads(sys.argv[1])\n"
    + _TORCH_OPEN
    + _ENCODER_FEEDS
    + r"""
def run(texts):
    ids, mask = encoded(texts)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       token_type_ids=torch.zeros_like(torch.from_numpy(ids))).last_hidden_state.numpy()
    return mean_pool(hidden, mask)
run(job["sentences"][:1])
resident = rss() - before  # safetensors are mapped: their pages count once a forward has read them
pooled = np.concatenate([run(job["sentences"][i:i + 32]) for i in range(0, len(job["sentences"]), 32)])
np.save(job["out"], pooled)
latency = timed(lambda: run(job["sentences"][:1]))
print(json.dumps({"resident": resident, "latency": latency}))
"""
)

ORT_CAUSAL = (
    "import json, sys, time\njob = json.loads(sys.argv[1])\n"
    + ORT_OPEN
    + r"""
import numpy as np
from rbe_loaders.ort.run import greedy_ids, token_logprobs
logprobs = [float(token_logprobs(session, w).mean()) for w in job["windows"]]
greedy_ids(session, job["prompt"], 2)  # warm-up
start = time.perf_counter()
tokens = greedy_ids(session, job["prompt"], job["new_tokens"])
seconds = time.perf_counter() - start
print(json.dumps({"resident": resident, "mean_logprob": float(np.mean(logprobs)),
                  "tokens_per_s": len(tokens) / seconds, "tokens": tokens}))
"""
)

TORCH_CAUSAL = (
    "import json, sys, time\njob = json.loads(sys.argv[1])\n"
    + _TORCH_OPEN
    + r"""
import numpy as np
logprobs = []
with torch.no_grad():
    model(input_ids=torch.tensor([job["prompt"]]))
    resident = rss() - before  # safetensors are mapped: their pages count once a forward has read them
    for w in job["windows"]:
        ids = torch.tensor([w])
        logprobs.append(-float(model(input_ids=ids, labels=ids).loss))
    prompt = torch.tensor([job["prompt"]])
    greedy = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **greedy)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=job["new_tokens"], min_new_tokens=job["new_tokens"], **greedy)
    seconds = time.perf_counter() - start
tokens = out[0, len(job["prompt"]):].tolist()
print(json.dumps({"resident": resident, "mean_logprob": float(np.mean(logprobs)),
                  "tokens_per_s": len(tokens) / seconds, "tokens": tokens}))
"""
)


def child(script: str, job: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", script, json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {job['model']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- building the files -----------------------------------------------------------------


def rbe_convert(source: str, path: str, **options) -> None:
    """``rbe convert SOURCE PATH --force --quiet`` with ``options`` (``ConvertOptions``'s fields), in this
    process through the library; its warnings still print, any failure stops the bench."""
    from rbe_converters.pipeline import ConvertOptions, Reporter, convert_model

    class Warnings(Reporter):
        def warning(self, line: str) -> None:
            print(line, file=sys.stderr)

    result = convert_model(source, path, ConvertOptions(force=True, **options), Warnings())
    if result.larger_than_dense:
        print(f"rbe: warning: larger under their codec chain than dense: {result.larger_than_dense}", file=sys.stderr)


def rbe_export_onnx(container: str, path: str, on_the_fly: bool = False) -> None:
    """``rbe export-onnx CONTAINER PATH [--on-the-fly] --force``, through the library."""
    from rbe_converters.decode import decode_onnx_to, export_on_the_fly

    if on_the_fly:
        export_on_the_fly(container, path, force=True)
    else:
        decode_onnx_to(container, path, force=True)


def rbe_decode(container: str, path: str) -> None:
    """``rbe decode CONTAINER PATH --force``, through the library."""
    from rbe_converters.decode import decode_to

    decode_to(container, path, force=True)


def once(path: str, make) -> str:
    """``path``, made by ``make(path)`` unless it is already there (``--keep`` reuses a folder)."""
    if not os.path.exists(path):
        make(path)
    return path


def rbe_files(source: str, folder: str, tokenizer: str | None) -> dict[str, str]:
    """The dense fp32 graph and the on-the-fly graphs of rbe's presets, for an .onnx file or an HF directory."""
    files = {}
    onnx_input = source.endswith(".onnx")
    convert_extra = {"tokenizer": tokenizer} if onnx_input else {"onnx": True}
    calibrate = {"calibration_windows": ONNX_CALIBRATION_WINDOWS if onnx_input else CALIBRATION_WINDOWS}
    if onnx_input:
        files["fp32"] = source
    else:
        lossless = once(
            os.path.join(folder, "lossless.rbe"), lambda p: rbe_convert(source, p, preset="lossless", onnx=True)
        )
        files["fp32"] = once(os.path.join(folder, "fp32.onnx"), lambda p: rbe_export_onnx(lossless, p))
    for preset in PRESETS:
        packed = once(
            os.path.join(folder, f"{preset}.rbe"),
            lambda p, preset=preset: rbe_convert(source, p, preset=preset, **convert_extra, **calibrate),
        )
        files[preset] = packed
        files[f"{preset}-fly"] = once(
            os.path.join(folder, f"{preset}-fly.onnx"),
            lambda p, packed=packed: rbe_export_onnx(packed, p, on_the_fly=True),
        )
    return files


def ort_quantized(fp32: str, path: str, calibration: list[dict] | None) -> str:
    """ORT's MatMulNBitsQuantizer, 4-bit sym, block ``ORT_BLOCK``: RTN, or GPTQ fed ``calibration``."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = list(feeds)

        def get_next(self):
            return self.feeds.pop(0) if self.feeds else None

    if os.path.exists(path):
        return path
    model = onnx.load(fp32)
    if calibration is None:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=ORT_BLOCK, is_symmetric=True)
    else:
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Feeds(calibration))
    quantizer = mnq.MatMulNBitsQuantizer(model, block_size=ORT_BLOCK, is_symmetric=True, algo_config=config)
    quantizer.process()
    tmp = path + ".tmp"
    onnx.save(quantizer.model.model, tmp)
    os.replace(tmp, path)
    return path


def file_bytes(path: str) -> int:
    """A file, or a directory's weights and files, or an .onnx with its external data beside it."""
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))
        )
    extra = path + ".data" if os.path.exists(path + ".data") else None
    return os.path.getsize(path) + (os.path.getsize(extra) if extra else 0)


# -- measuring --------------------------------------------------------------------------


def measure_encoder(path: str, tokenizer: str, sentences: list[str], folder: str, torch_model: bool) -> dict:
    out = os.path.join(
        folder, "pooled-" + os.path.basename(os.path.normpath(path)) + (".torch" if torch_model else "") + ".npy"
    )
    job = {"model": path, "tokenizer": tokenizer, "sentences": sentences, "out": out, "runs": RUNS, "causal": False}
    results = [child(TORCH_ENCODER if torch_model else ORT_ENCODER, job) for _ in range(REPEATS)]
    row = {key: float(np.median([r[key] for r in results])) for key in results[0]}
    row["pooled"] = np.load(out).astype(np.float64)
    return row


def measure_causal(path: str, windows: list[list[int]], prompt: list[int], torch_model: bool) -> dict:
    job = {"model": path, "windows": windows, "prompt": prompt, "new_tokens": NEW_TOKENS, "causal": True}
    return child(TORCH_CAUSAL if torch_model else ORT_CAUSAL, job)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def nearest_others(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(1)


def encoder_quality(row: dict, reference: dict) -> str:
    cos = float(cosines(row["pooled"], reference["pooled"]).mean())
    nn = float(np.mean(nearest_others(row["pooled"]) == nearest_others(reference["pooled"])))
    return f"cos {cos:.4f} NN {nn:.3f}"


def causal_quality(row: dict, reference: dict) -> str:
    ppl, base = np.exp(-row["mean_logprob"]), np.exp(-reference["mean_logprob"])
    return f"ppl {ppl:.3f} ({100 * (ppl / base - 1):+.2f}%)"


# -- the models -------------------------------------------------------------------------


def encoder_calibration(tokenizer_path: str, names: set[str]) -> list[dict]:
    """Feeds of calibration sentences (the half rbe eval never scores) for ORT's GPTQ, one per run
    (no padding: its statistics take every position the model computes)."""
    from tokenizers import Tokenizer

    from rbe_converters.evaluate.quality import calibration_text, sentences_of

    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.enable_truncation(128)
    feeds = []
    for sentence in sentences_of(calibration_text())[:CALIBRATION_SENTENCES]:
        ids = np.array([tokenizer.encode(sentence).ids], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feeds.append({k: v for k, v in feed.items() if k in names})
    return feeds


def graph_inputs(path: str) -> list:
    import onnx

    return list(onnx.load(path, load_external_data=False).graph.input)


def causal_calibration(fp32: str, ids: list[int]) -> list[dict]:
    """4 windows of 512 calibration tokens, each run with an empty KV cache."""
    feeds = []
    for k in range(4):
        window = ids[k * WINDOW : (k + 1) * WINDOW]
        feed = {
            "input_ids": np.array([window], np.int64),
            "attention_mask": np.ones((1, WINDOW), np.int64),
            "position_ids": np.arange(WINDOW, dtype=np.int64)[None],
        }
        for arg in graph_inputs(fp32):
            if arg.name.startswith("past."):
                dims = arg.type.tensor_type.shape.dim
                feed[arg.name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
        feeds.append(feed)
    return feeds


def rows_for(name: str, folder: str) -> list[tuple[str, str, dict, str]]:
    """(row label, shipped file, measurement, quality) for one model, measured one after another."""
    from bench.models import minilm_dir, paraphrase_onnx, smollm2_dir

    os.makedirs(folder, exist_ok=True)
    source = {"paraphrase": paraphrase_onnx, "minilm": minilm_dir, "smollm2": smollm2_dir}[name]()
    tokenizer = os.path.join(minilm_dir() if name == "paraphrase" else source, "tokenizer.json")
    files = rbe_files(source, folder, tokenizer)
    fp32 = files["fp32"]
    causal = name == "smollm2"
    candidates = [("fp32 ORT", fp32, fp32)]
    if causal:
        from tokenizers import Tokenizer

        from rbe_converters.evaluate.quality import calibration_text, evaluation_text

        tok = Tokenizer.from_file(tokenizer)
        eval_ids = tok.encode(evaluation_text(), add_special_tokens=False).ids
        windows = [eval_ids[k * WINDOW : (k + 1) * WINDOW] for k in range(PPL_WINDOWS)]
        prompt = tok.encode(PROMPT, add_special_tokens=False).ids
        calibration = causal_calibration(fp32, tok.encode(calibration_text(), add_special_tokens=False).ids)
    else:
        sentences = default_sentences()
        calibration = encoder_calibration(tokenizer, {i.name for i in graph_inputs(fp32)})
    candidates += [
        ("ORT RTN 4b b32", ort_quantized(fp32, os.path.join(folder, "ort-rtn.onnx"), None), None),
        ("ORT GPTQ 4b b32", ort_quantized(fp32, os.path.join(folder, "ort-gptq.onnx"), calibration), None),
    ]
    candidates += [(f"rbe {p} on the fly", files[f"{p}-fly"], files[p]) for p in PRESETS]
    if name != "paraphrase":
        candidates.append(("fp32 PyTorch", source, source))
    rows, reference = [], None
    for label, path, shipped in candidates:
        torch_model = label == "fp32 PyTorch"
        start = time.perf_counter()
        if causal:
            row = measure_causal(path, windows, prompt, torch_model)
        else:
            row = measure_encoder(path, tokenizer, sentences, folder, torch_model)
        reference = reference or row
        quality = causal_quality(row, reference) if causal else encoder_quality(row, reference)
        rows.append((label, shipped or path, row, quality))
        print(f"  {name} {label}: {quality} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows


def default_sentences() -> list[str]:
    from rbe_converters.evaluate.quality import default_sentences as spread

    return spread(SENTENCES)


# -- the table --------------------------------------------------------------------------


def table(results: dict[str, list], reference: str = "fp32 ORT", load_seconds: bool = False) -> str:
    """The rows of every model (label, shipped bytes, measurement, quality); sizes and speeds against each
    model's first row (``reference``)."""
    load = f" {'load s':>7}" if load_seconds else ""
    header = (
        f"{'model':<11} {'session':<20} {'file MB':>8}{load} {'resident MB':>12} {'x fp32':>7} "
        f"{'speed':>14} {'x fp32':>7}  quality vs {reference}"
    )
    lines = [header, "-" * len(header)]
    for name, rows in results.items():
        base = rows[0][2]
        for label, shipped_bytes, row, quality in rows:
            speed, ratio = speed_of(row, base)
            load = f" {row['load_s']:>7.2f}" if load_seconds else ""
            lines.append(
                f"{name:<11} {label:<20} {shipped_bytes / 1e6:>8.1f}{load} "
                f"{row['resident'] / 1e6:>12.1f} {row['resident'] / base['resident']:>7.3f} "
                f"{speed:>14} {ratio:>7.2f}  {quality}"
            )
    return "\n".join(lines)


def speed_of(row: dict, base: dict) -> tuple[str, float]:
    """A row's batch-1 latency or tokens/s, and its ratio to the base row's (above 1: slower / faster)."""
    if "latency" in row:
        return f"{row['latency'] * 1e3:.2f} ms", row["latency"] / base["latency"]
    return f"{row['tokens_per_s']:.1f} tok/s", row["tokens_per_s"] / base["tokens_per_s"]


def measure_models(argv: list[str] | None, description: str, models: tuple[str, ...], rows_for, prefix: str):
    """Parses --models / --keep, runs ``rows_for(name, folder)`` per model; the results and the seconds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", default=",".join(models), help=f"comma-separated: {', '.join(models)}")
    parser.add_argument("--keep", metavar="DIR", help="write the files into DIR, keep them and reuse them next time")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in models]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(models)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        folder = args.keep or scratch
        results = {name: _sized(rows_for(name, os.path.join(folder, name))) for name in names}
    return results, time.perf_counter() - started


def _sized(rows: list[tuple]) -> list[tuple]:
    """Each row with its shipped file's bytes in place of its path: measured while the files exist (the
    scratch folder goes before the table is printed)."""
    return [(label, file_bytes(shipped), row, quality) for label, shipped, row, quality in rows]


def main(argv: list[str] | None = None) -> int:
    results, seconds = measure_models(argv, __doc__.splitlines()[0], MODELS, rows_for, "rbe-ort-sessions-")
    import onnxruntime

    print(
        f"onnxruntime {onnxruntime.__version__}, CPU, 1 intra-op thread per session; "
        f"{SENTENCES} evaluation sentences / {PPL_WINDOWS} windows of {WINDOW} evaluation tokens; "
        f"{seconds:.0f} s"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
