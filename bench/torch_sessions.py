"""rbe's on-the-fly PyTorch models (``rbe_loaders.torch.load_model``) beside dense transformers.

One run, one table.  Per model (SmolLM2-135M, all-MiniLM-L6-v2) and preset
(``q4`` and the lower ``q3``, calibrated on ``CALIBRATION_WINDOWS`` = 8 windows
as in ``bench.ort_sessions``, so that one ``--keep`` folder serves both benches):

* ``fp32 transformers``: ``from_pretrained`` on the fp32 safetensors directory;
* ``rbe <preset> decoded``: the same .rbe decoded to dense first (``rbe decode``
  to a directory), then ``from_pretrained``;
* ``rbe <preset> on the fly``: ``load_model(path)``, its quantized weights
  kept as codec parts and decoded at each forward.

Each row is measured in a fresh child process with one torch thread:

* load s: wall time of the load call;
* resident MB: RSS after the load and one forward, minus RSS before the load
  (torch, transformers and the model's modeling module already imported: that
  code alone is ~130 MB of RSS, the same for every row, and is not the model's;
  nor are torch's kernels, mapped in at their first call: a one-layer model of
  the same architecture and the int4 kernel run once before the measurement);
* speed: the median batch-1 forward on one sentence (MiniLM), or tokens/s of
  64 greedy new tokens after a short prompt (SmolLM2);
* quality against ``fp32 transformers``: mean cosine and nearest-neighbour
  agreement of mean-pooled embeddings of sentences from the evaluation half of
  the text, or perplexity on windows of 512 tokens of it; plus, for on-the-fly
  rows, the same figure against the decoded row (how far decoding on the fly
  is from the reference decoder).

    python -m bench.torch_sessions                      # the whole table
    python -m bench.torch_sessions --models minilm
    python -m bench.torch_sessions --keep DIR           # keep (and reuse) the converted files
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from bench.ort_sessions import (
    CALIBRATION_WINDOWS,
    NEW_TOKENS,
    PPL_WINDOWS,
    PROMPT,
    RUNS,
    SENTENCES,
    WINDOW,
    causal_quality,
    child,
    default_sentences,
    encoder_quality,
    measure_models,
    once,
    rbe_convert,
    rbe_decode,
    table,
)

MODELS = ("smollm2", "minilm")
PRESETS = ("q4", "q3")

_OPEN = r"""
import json, os, sys, time
job = json.loads(sys.argv[1])
import numpy as np
import torch, transformers
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
import importlib
for module in job["modules"]:  # the model's Python code is not its memory: import it before measuring
    importlib.import_module(module)
# So is the machine code of torch's kernels, mapped in at their first call: run every kernel once,
# on a tiny model of the same architecture and on the int4 kernel, before measuring.
tiny_config = transformers.AutoConfig.for_model(**job["tiny"])
tiny_auto = transformers.AutoModelForCausalLM if job["causal"] else transformers.AutoModel
with torch.no_grad():
    tiny = tiny_auto.from_config(tiny_config).eval()
    tiny(input_ids=torch.tensor([[1, 2, 3]]))
    if job["causal"]:
        tiny.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 1)
    torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), packed, 32,
                                               torch.zeros(2, 16, 2, dtype=torch.bfloat16))
del tiny, packed
before = rss()
start = time.perf_counter()
if job["kind"] == "fly":
    from rbe_loaders.torch import load_model
    model = load_model(job["model"])
else:
    auto = transformers.AutoModelForCausalLM if job["causal"] else transformers.AutoModel
    model = auto.from_pretrained(job["model"], dtype=torch.float32, trust_remote_code=False,
                                  use_safetensors=True).eval()
load_s = time.perf_counter() - start
"""

ENCODER = (
    _OPEN
    + r"""
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(job["tokenizer"])
tokenizer.enable_padding()
tokenizer.enable_truncation(128)
def run(texts):
    rows = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in rows])
    mask = torch.tensor([e.attention_mask for e in rows])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    w = mask[..., None].float()
    return ((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)).numpy()
run(job["sentences"][:1])
resident = rss() - before
pooled = np.concatenate([run(job["sentences"][i:i + 32]) for i in range(0, len(job["sentences"]), 32)])
np.save(job["out"], pooled)
times = []
for _ in range(job["runs"]):
    start = time.perf_counter()
    run(job["sentences"][:1])
    times.append(time.perf_counter() - start)
print(json.dumps({"load_s": load_s, "resident": resident, "latency": float(np.median(times))}))
"""
)

CAUSAL = (
    _OPEN
    + r"""
with torch.no_grad():
    prompt = torch.tensor([job["prompt"]])
    greedy = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **greedy)  # the first forward
    resident = rss() - before
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=job["new_tokens"], min_new_tokens=job["new_tokens"], **greedy)
    seconds = time.perf_counter() - start
    logprobs = []
    for w in job["windows"]:
        ids = torch.tensor([w])
        logprobs.append(-float(model(input_ids=ids, labels=ids).loss))
tokens = out[0, len(job["prompt"]):].tolist()
print(json.dumps({"load_s": load_s, "resident": resident, "mean_logprob": float(np.mean(logprobs)),
                  "tokens_per_s": len(tokens) / seconds, "tokens": tokens}))
"""
)


def files_for(source: str, folder: str, causal: bool) -> dict[str, str]:
    """Per preset: the .rbe and its dense decode as a directory."""
    files = {}
    calibrate = {"calibration_windows": CALIBRATION_WINDOWS}  # as bench.ort_sessions: --keep may share files
    for preset in PRESETS:
        packed = once(
            os.path.join(folder, f"{preset}.rbe"),
            lambda p, preset=preset: rbe_convert(source, p, preset=preset, **calibrate),
        )
        files[preset] = packed
        files[f"{preset}-decoded"] = once(
            os.path.join(folder, f"{preset}-decoded"), lambda p, packed=packed: rbe_decode(packed, p)
        )
    return files


def rows_for(name: str, folder: str) -> list[tuple[str, str, dict, str]]:
    from bench.models import minilm_dir, smollm2_dir

    os.makedirs(folder, exist_ok=True)
    causal = name == "smollm2"
    source = smollm2_dir() if causal else minilm_dir()
    tokenizer_path = os.path.join(source, "tokenizer.json")
    files = files_for(source, folder, causal)
    candidates = [("fp32 transformers", "hf", source, source)]
    for preset in PRESETS:
        candidates += [
            (f"rbe {preset} decoded", "hf", files[f"{preset}-decoded"], files[preset]),
            (f"rbe {preset} on the fly", "fly", files[preset], files[preset]),
        ]
    if causal:
        from tokenizers import Tokenizer

        from rbe_converters.evaluate.quality import evaluation_text

        tok = Tokenizer.from_file(tokenizer_path)
        ids = tok.encode(evaluation_text(), add_special_tokens=False).ids
        base_job = {
            "causal": True,
            "windows": [ids[k * WINDOW : (k + 1) * WINDOW] for k in range(PPL_WINDOWS)],
            "prompt": tok.encode(PROMPT, add_special_tokens=False).ids,
            "new_tokens": NEW_TOKENS,
        }
    else:
        base_job = {"causal": False, "tokenizer": tokenizer_path, "sentences": default_sentences(), "runs": RUNS}
    model_type = "llama" if causal else "bert"
    base_job["modules"] = [f"transformers.models.{model_type}.modeling_{model_type}", "transformers.generation"]
    base_job["tiny"] = {
        "model_type": model_type,
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        **({"num_key_value_heads": 2} if causal else {}),
    }
    rows, measured = [], {}
    for label, kind, path, shipped in candidates:
        start = time.perf_counter()
        job = {
            **base_job,
            "kind": kind,
            "model": path,
            "out": os.path.join(folder, f"pooled-{label.replace(' ', '-')}.npy"),
        }
        row = child(CAUSAL if causal else ENCODER, job)
        if not causal:
            row["pooled"] = np.load(job["out"]).astype(np.float64)
        measured[label] = row
        quality_of = causal_quality if causal else encoder_quality
        quality = quality_of(row, measured["fp32 transformers"])
        if kind == "fly":
            decoded = measured[label.replace("on the fly", "decoded")]
            quality += f"; vs decoded: {quality_of(row, decoded)}"
        rows.append((label, shipped, row, quality))
        print(f"  {name} {label}: {quality} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    results, seconds = measure_models(argv, __doc__.splitlines()[0], MODELS, rows_for, "rbe-torch-sessions-")
    import torch

    device = "CPU" if not torch.cuda.is_available() else f"CPU (a {torch.cuda.get_device_name()} is present, unused)"
    print(
        f"torch {torch.__version__}, {device}, 1 thread; {SENTENCES} evaluation sentences / {PPL_WINDOWS} "
        f"windows of {WINDOW} evaluation tokens; {seconds:.0f} s"
    )
    print(table(results, "fp32 transformers", load_seconds=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
