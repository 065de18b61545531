"""How far one tensor's encoding moves the whole model's outputs (mixed precision's ``"model"`` measure).

The layer measure of ``converters/compress/mixed.py`` scores an upgrade by the error
it removes from the layer's own output.  Layers differ in how much of that
error reaches the model's output: a value projection's error passes through
every later block, a query's is damped by the softmax.  This measure runs the
model itself: the tensor alone takes the encoded values, the rest stays
original, and the drift of the outputs on the calibration text is its error:

- an encoder (sentence embeddings): 1 - mean cosine between the original and
  the changed mean-pooled last hidden states, one per calibration sentence;
- a causal LM: the mean over tokens of KL(original || changed) of the
  next-token distributions, on the first calibration windows.

Drifts of different tensors add up closely while they are small (measured on
all-MiniLM-L6-v2 at 3.5 and 4.5 bits per weight: the sum of the drifts
was within 2% of the drift of all tensors encoded together), so
``mixed.pick`` can trade them as it trades layer errors.  It costs one model
run over the probe per tensor and level, and the encoder's calibrated encode
(GPTQ) of each level.
"""

from __future__ import annotations

import numpy as np

from rbeformat import UsageError

# Tokens of calibration input each drift is measured on: about 300 sentences for an
# encoder; a causal LM's runs cost more per token (logits over its vocabulary).
ENCODER_TOKENS = 8192
CAUSAL_TOKENS = 2048


class ModelProbe:
    """The original model, its outputs on a probe of the calibration text, and each tensor's drift."""

    def __init__(self, model_dir: str, text, threads: int | None = None):
        from .calibrate import torch as calibrate

        self.torch, self.model, tokenizer, self.causal = calibrate.load_for_calibration(model_dir, threads)
        windows = calibrate.calibration_windows(tokenizer, text, self.model, self.causal)
        self.batches = calibrate.batches_of(_first_tokens(windows, CAUSAL_TOKENS if self.causal else ENCODER_TOKENS))
        self.parameters = _parameters_by_name(self.model)
        with self.torch.no_grad():
            self.reference = [self._outputs(batch) for batch in self.batches]

    def drift(self, name: str, decoded: np.ndarray) -> float:
        """The drift of the model's outputs when tensor ``name`` alone takes the values ``decoded``."""
        parameter = self.parameters.get(name)
        if parameter is None:
            raise UsageError(
                f'budget_sensitivity = "model": {name} is not a parameter of the model '
                "transformers builds from this directory"
            )
        if tuple(parameter.shape) != tuple(decoded.shape):
            raise UsageError(
                f'budget_sensitivity = "model": {name} has shape {tuple(decoded.shape)} in the '
                f"checkpoint but {tuple(parameter.shape)} in the model"
            )
        original = parameter.data
        parameter.data = self.torch.from_numpy(np.ascontiguousarray(decoded, dtype=np.float32))
        try:
            with self.torch.no_grad():
                return float(
                    np.mean(
                        [self._compare(ref, self._outputs(batch)) for ref, batch in zip(self.reference, self.batches)]
                    )
                )
        finally:
            parameter.data = original

    def _outputs(self, batch):
        ids = self.torch.tensor(batch)
        if self.causal:
            return self.torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)
        return self.model(input_ids=ids).last_hidden_state.mean(dim=1)  # equal lengths: no padding

    def _compare(self, reference, changed) -> float:
        if self.causal:  # KL(reference || changed) per token
            return float((reference.exp() * (reference - changed)).sum(dim=-1).mean())
        cosine = self.torch.nn.functional.cosine_similarity(reference, changed, dim=-1)
        return float(1.0 - cosine.mean())


def _first_tokens(windows: list[list[int]], tokens: int) -> list[list[int]]:
    """The first windows (or sentences) holding about ``tokens`` tokens, at least one."""
    out, held = [], 0
    for ids in windows:
        if out and held + len(ids) > tokens:
            break
        out.append(ids)
        held += len(ids)
    return out


def _parameters_by_name(model) -> dict:
    """Each parameter under its name with and without the base model's prefix (checkpoints use either)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        found[name] = parameter
        if prefix and name.startswith(prefix + "."):
            found.setdefault(name[len(prefix) + 1 :], parameter)
        elif prefix:
            found.setdefault(f"{prefix}.{name}", parameter)
    return found
