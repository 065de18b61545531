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
(GPTQ) of each level; the model is streamed block by block, never loaded whole.
"""

from __future__ import annotations

import numpy as np

from rbeformat import UsageError

# Tokens of calibration input each drift is measured on: about 300 sentences for an
# encoder; a causal LM's runs cost more per token (logits over its vocabulary).
ENCODER_TOKENS = 8192
CAUSAL_TOKENS = 2048


class ModelProbe:
    """The original model, its outputs on a probe of the calibration text, and each tensor's drift.

    The model is streamed (``calibrate/stream.py``): its parts hold their weights only while they run.
    The probe's hidden states at every block boundary are kept (in a temporary file when large), so a
    tensor of block b is measured by running blocks b, b+1, ... only, one at a time, from them.
    """

    def __init__(self, model_dir: str, text, threads: int | None = None):
        from .calibrate import stream
        from .calibrate import torch as calibrate

        self.stream = stream
        self.torch, self.streamed, tokenizer, self.causal = stream.open_streamed(model_dir, threads)
        model = self.streamed.model
        windows = calibrate.calibration_windows(tokenizer, text, model, self.causal)
        self.batches = calibrate.batches_of(_first_tokens(windows, CAUSAL_TOKENS if self.causal else ENCODER_TOKENS))
        self.parameters = _parameters_by_name(model)
        self.blocks = stream.blocks_of(model)
        self.block_of = {id(p): index for index, block in enumerate(self.blocks) for p in block.parameters()}
        limit = stream.SPILL_BYTES // (len(self.blocks) + 1)  # all the boundaries together
        with self.torch.no_grad():
            inputs = stream.spilled(self._first_inputs(), limit)
            self.boundaries, self.as_tuple = [inputs], False
            for block in self.blocks:
                inputs, self.as_tuple = self._through(block, inputs)
                self.boundaries.append(stream.spilled(inputs, limit))
            self.reference = self._outputs(inputs)

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
        self.streamed.overrides[id(parameter)] = np.ascontiguousarray(decoded, dtype=np.float32)
        try:
            with self.torch.no_grad():
                start = self.block_of.get(id(parameter))
                inputs = self.boundaries[start] if start is not None else self._first_inputs()
                for block in self.blocks[start or 0 :]:
                    inputs, _ = self._through(block, inputs)
                changed = self._outputs(inputs)
            return float(np.mean([self._compare(ref, out) for ref, out in zip(self.reference, changed)]))
        finally:
            del self.streamed.overrides[id(parameter)]

    def _first_inputs(self) -> list:
        with self.streamed.loaded(self.streamed.front(self.blocks)):
            return self.stream.block_inputs(self.streamed.model, self.blocks[0], self.batches, self.torch)

    def _through(self, block, inputs) -> tuple[list, bool]:
        with self.streamed.loaded(self.streamed.slots([block])):
            return self.stream.run_block(block, inputs)

    def _outputs(self, finals: list) -> list:
        """What each batch gives (log-probabilities, or mean-pooled last hidden states) from the blocks'
        final hidden states ``finals``."""
        model, torch = self.streamed.model, self.torch
        outputs = []
        with self.streamed.loaded(self.streamed.outside(self.blocks)):
            with self.stream.blocks_pass_on(self.blocks, finals, self.as_tuple):
                for batch in self.batches:
                    ids = torch.tensor(batch)
                    if self.causal:
                        outputs.append(torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1))
                    else:  # equal lengths: no padding
                        outputs.append(model(input_ids=ids).last_hidden_state.mean(dim=1))
        return outputs

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
