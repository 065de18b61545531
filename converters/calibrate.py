"""Calibration statistics for the encoders: each Linear layer's input second moments.

A calibration-aware encoder (``rbeformat.codecs.gptq``, Wanda pruning) needs,
for a Linear weight W (out x in), H = E[x x^T] over the inputs x the layer
sees on representative text.  This module loads the model with transformers
(the ``hf`` extra), runs the calibration text through it in windows, and
accumulates H for the requested weights with forward hooks; nothing is
stored but the H matrices (layers that read the same input, such as q, k and
v, share one).  The text is ``rbe_converters.quality.calibration_text()`` by
default, the half of CPython's ``pydoc_data.topics`` that evaluation never
uses, or a file the user gives.

Memory: the model in float32, one window's activations, and the H matrices
(for SmolLM2-135M about 0.8 GB in float64).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from rbeformat import InputError, UsageError
from rbeformat.codecs.tensor import Calibration

DEFAULT_WINDOW = 512
DEFAULT_WINDOWS = 32


@dataclass(frozen=True)
class CalibrationText:
    """Where the calibration tokens come from, and how many."""

    text: str
    source: str
    window: int = DEFAULT_WINDOW
    windows: int = DEFAULT_WINDOWS


def default_text() -> CalibrationText:
    from .quality import calibration_text

    return CalibrationText(calibration_text(), "pydoc_data.topics, calibration half")


def text_from_file(path: str) -> CalibrationText:
    try:
        with open(path, encoding="utf-8") as fh:
            return CalibrationText(fh.read(), os.path.basename(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the calibration text ({exc})") from None


def collect(model_dir: str, weights: dict[str, str], text: CalibrationText, threads: int | None = None,
            progress=None) -> dict[str, Calibration]:
    """{weight name: Calibration(method, H)} for the Linear weights named in ``weights`` (name -> method)."""
    torch, model, tokenizer = _load(model_dir, threads)
    modules = _linear_modules(model, weights)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    # Input tensors seen in the current window -> the module that accumulated them.  The
    # tensor is kept so that its id cannot be reused by another tensor in this window.
    shared: dict[int, tuple[str, object]] = {}

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features)
            first = shared.get(id(inputs[0]))
            if first is not None and first[0] != name:  # q, k, v read one tensor: accumulate once
                sums[name] = sums[first[0]]
                counts[name] = counts[first[0]]
                return
            shared[id(inputs[0])] = (name, inputs[0])
            product = (x.T @ x).double().numpy()
            sums[name] = sums[name] + product if name in sums else product
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for ids in _windows(tokenizer, text, model):
                shared.clear()
                model(input_ids=torch.tensor([ids]))
                if progress:
                    progress(1)
    finally:
        for handle in handles:
            handle.remove()
    means: dict[int, np.ndarray] = {}  # layers that share an input share one matrix
    for name in modules:
        if id(sums[name]) not in means:
            means[id(sums[name])] = sums[name] / counts[name]
    return {name: Calibration(weights[name], means[id(sums[name])]) for name in modules}


def _load(model_dir: str, threads: int | None):
    try:
        import torch
        import transformers
    except ImportError:
        raise UsageError("calibration needs torch and transformers: pip install 'rbe[hf]'") from None
    if threads:
        torch.set_num_threads(threads)
    # rbe reports its own progress and errors; transformers' load reports would bury them.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"{model_dir}: calibration needs a model directory with config.json")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{model_dir}: transformers cannot load the model and tokenizer that calibration "
                         f"runs ({first[:200]})") from None
    return torch, model, tokenizer


def _linear_modules(model, weights: dict[str, str]) -> dict:
    """The nn.Linear module of each named weight (names may carry or lack the base model prefix)."""
    import torch

    by_weight = {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            by_weight[f"{name}.weight"] = module
            if prefix and name.startswith(prefix + "."):
                by_weight.setdefault(f"{name[len(prefix) + 1:]}.weight", module)
            elif prefix:
                by_weight.setdefault(f"{prefix}.{name}.weight", module)
    missing = sorted(set(weights) - set(by_weight))
    if missing:
        raise UsageError(f"calibration applies to Linear weights only; not a Linear layer's weight: "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return {name: by_weight[name] for name in weights}


def _windows(tokenizer, text: CalibrationText, model):
    """Up to ``text.windows`` consecutive windows of tokens (shorter for models with fewer positions)."""
    limit = getattr(model.config, "max_position_embeddings", None) or text.window
    window = min(text.window, limit)
    ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
    count = min(text.windows, len(ids) // window)
    if count < 1:
        raise UsageError(f"calibration text ({text.source}) holds {len(ids)} tokens, fewer than one window "
                         f"of {window}")
    return [ids[k * window : (k + 1) * window] for k in range(count)]
