"""Calibration statistics for the encoders: each Linear layer's input second moments.

A calibration-aware encoder (``rbeformat.codecs.encoders.gptq``, Wanda pruning) needs,
for a Linear weight W (out x in), H = E[x x^T] over the inputs x the layer
sees on representative text.  This module builds the model with transformers
(the ``hf`` extra) without its weights and runs the calibration text through
it part by part (``stream.py``): the embeddings on every window, then each
block in turn on every window's hidden states, then what follows the blocks,
each part's weights read from the checkpoint only while it runs.  Forward
hooks accumulate H for the requested weights; nothing is stored but the H
matrices (layers that read the same input, such as q, k and v, share one).
The text is ``rbe_converters.evaluate.quality.calibration_text()`` by default,
the half of CPython's ``pydoc_data.topics`` that evaluation never uses, or a
file the user gives.

Memory (``survey`` and ``sequential``): the largest part in float32 (a block,
or the embedding and head), every window's hidden states at one block
boundary, one stage's H and GPTQ's factor of it (two n x n float64 matrices
while it is computed); ``collect`` also holds every H it returns.  The number
of blocks does not enter.  ``load_for_calibration`` (the model-level
sensitivity of the encoder presets) still loads the whole model in float32.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from rbeformat import InputError, UsageError
from rbeformat.codecs.core.tensor import Calibration
from rbeformat.embedded import hf_guard
from rbeformat.embedded.config import is_causal_lm

from ... import hf_folder
from . import stream

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
    from ...evaluate.quality import calibration_text

    return CalibrationText(calibration_text(), "pydoc_data.topics, calibration half")


def text_from_file(path: str) -> CalibrationText:
    try:
        with open(path, encoding="utf-8") as fh:
            return CalibrationText(fh.read(), os.path.basename(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the calibration text ({exc})") from None


def collect(
    model_dir: str, weights: dict[str, str], text: CalibrationText, threads: int | None = None, progress=None
) -> dict[str, Calibration]:
    """{weight name: Calibration(method, H)} for the Linear weights named in ``weights`` (name -> method),
    all held at once (``survey`` gives them one block at a time, and computes these)."""
    inside: dict[str, Calibration] = {}
    outside = survey(model_dir, weights, text, inside.__setitem__, threads, progress)
    return {name: inside[name] if name in inside else outside[name] for name in weights}


def survey(
    model_dir: str,
    weights: dict[str, str],
    text: CalibrationText,
    visit: Callable[[str, Calibration], None],
    threads: int | None = None,
    progress=None,
    label: Callable[[str], None] | None = None,
    start: int = 0,
    hidden: list[np.ndarray] | None = None,
    after_block: Callable[[int, list[np.ndarray]], None] | None = None,
) -> dict[str, Calibration]:
    """The original model's statistics block by block, never more than one block's at a time.

    ``visit(name, calibration)`` is called for each named weight inside the
    blocks as its block is reached (to score it; nothing is kept).  Returns the
    Calibrations of the weights outside the blocks (a tied embedding, an output
    head), which are few and small, from the final hidden states.  The model is
    streamed (``stream.py``): its embeddings, then one block at a time, then what
    follows the blocks hold their weights only while they run.  ``progress(n)``
    counts windows' worth of work, ``label(text)`` says which block and weight
    is reached.  ``after_block(index, hidden)`` is told of each block surveyed,
    with the hidden states the next block reads; a resumed survey passes them
    back as ``hidden`` with ``start`` the block to go on from.
    """
    label = label or (lambda text: None)
    torch, streamed, tokenizer, causal = stream.open_streamed(model_dir, threads)
    model = streamed.model
    modules = _linear_modules(model, weights)
    blocks = stream.blocks_of(model)
    owner = {name: _block_of(blocks, module) for name, module in modules.items()}
    windows = batches_of(calibration_windows(tokenizer, text, model, causal))
    outside = {name: module for name, module in modules.items() if owner[name] is None}
    # The progress reported adds up to text.windows: the blocks, about two whole-model runs' work,
    # then a run of what follows the blocks on each window (when weights lie outside the blocks).
    tail = 2 / len(blocks) if outside else 0  # what follows the blocks costs about a block's run
    share = text.windows / ((2 + tail) * len(windows))
    with torch.no_grad():
        with streamed.loaded(streamed.front(blocks)):
            inputs = stream.spilled(stream.block_inputs(model, blocks[0], windows, torch))
        if hidden is not None:
            inputs = stream.spilled(_resumed_inputs(inputs, hidden, torch))
            if progress:
                progress(share * 2 * len(windows) * start / len(blocks))
        for index, block in enumerate(blocks):
            if index < start:
                continue
            inside = {name: module for name, module in modules.items() if owner[name] == index}
            where = f"block {index + 1}/{len(blocks)}"
            label(f"{where}: running it")
            moments = _Moments(inside, weights)
            try:  # one run gives both the statistics and the next block's inputs
                with streamed.loaded(streamed.slots([block])):
                    inputs, as_tuple = stream.run_block(block, inputs, moments.next_window)
            finally:
                moments.close()
            # Scored with the block's weights released; a Hessian goes once its last weight is scored.
            calibrations = moments.calibrations()  # none for a block without weights to score
            moments = None
            for name in list(calibrations):
                calibration = calibrations.pop(name)
                label(f"{where}: scoring {_short(name)}")
                visit(name, calibration)
            calibration = None
            if after_block and index + 1 < len(blocks):  # a resume reruns the last block (what follows needs it)
                after_block(index, [stream.hidden_of(call).numpy() for call in inputs])
            if progress:
                progress(share * 2 * len(windows) / len(blocks))
        if not outside:
            return {}
        label("after the blocks: " + ", ".join(outside))
        with streamed.loaded(streamed.outside(blocks)), stream.blocks_pass_on(blocks, inputs, as_tuple):
            runs = _model_runs(model, windows, text, torch, progress and (lambda _: progress(share * tail)))
            return _moments(outside, weights, runs)


def _model_runs(model, windows, text: CalibrationText, torch, progress):
    """Runs the model on each batch of windows in turn, as it is iterated."""
    step = min(1.0, text.windows / len(windows))  # batches of sentences report their share of the windows
    for batch in windows:
        model(input_ids=torch.tensor(batch))
        if progress:
            progress(step)
        yield


def _moments(modules: dict, weights: dict[str, str], runs) -> dict[str, Calibration]:
    """E[x x^T] of each module's input over the runs (one matrix for layers that read one input)."""
    moments = _Moments(modules, weights)
    try:
        for _ in runs:
            moments.next_window()
    finally:
        moments.close()
    return moments.calibrations()


# A module's inputs themselves are kept beside their sum while their tokens are at most this share of
# its input width: an output error computed from them then costs at most that share of one from H.
SAMPLES_SHARE = 1 / 4


class _Moments:
    """Sums of x^T x of each module's input, added by hooks while the modules run (one sum for layers
    that read one input), and the inputs themselves while they are few (``SAMPLES_SHARE``);
    ``next_window()`` after each window's run, ``close()`` to remove the hooks."""

    def __init__(self, modules: dict, weights: dict[str, str]):
        self.modules, self.weights = modules, weights
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list | None] = {}  # by the module that owns the sum; None once too many
        self.owner: dict[str, str] = {}  # a module reading another's input -> that module
        # Input tensors seen in the current window's run -> the module that accumulated them.  The
        # tensor is kept so that its id cannot be reused by another tensor in this run.
        self.shared: dict[int, tuple[str, object]] = {}
        self.handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def accumulate(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features)
            first = self.shared.get(id(inputs[0]))
            if first is not None and first[0] != name:  # q, k, v read one tensor: accumulate once
                self.sums[name] = self.sums[first[0]]
                self.counts[name] = self.counts[first[0]]
                self.owner[name] = first[0]
                return
            self.shared[id(inputs[0])] = (name, inputs[0])
            self.sums[name] = add_moments(self.sums.get(name), x)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
            kept = self.samples.get(name, [])
            few = self.counts[name] <= SAMPLES_SHARE * module.in_features
            self.samples[name] = kept + [x.numpy().copy()] if few and kept is not None else None

        return accumulate

    def next_window(self) -> None:
        self.shared.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.shared.clear()

    def calibrations(self) -> dict[str, Calibration]:
        """E[x x^T] per module, the sums divided in place (no second copy of them)."""
        sums, counts = self.sums, self.counts
        missing = [name for name in self.modules if name not in sums]
        if missing:
            raise UsageError(f"calibration: {missing[0]} never ran on the calibration text")
        means: dict[int, tuple] = {}  # layers that share an input share one matrix, and its samples
        for name in self.modules:
            if id(sums[name]) not in means:
                kept = self.samples.get(self.owner.get(name, name))
                samples = np.concatenate(kept) if kept else None
                means[id(sums[name])] = (np.divide(sums[name], counts[name], out=sums[name]), samples)
        self.sums, self.counts, self.samples, self.owner = {}, {}, {}, {}
        return {name: Calibration(self.weights[name], *means[id(sums[name])]) for name in self.modules}


def load_for_calibration(model_dir: str, threads: int | None):
    torch, transformers = stream.import_torch(threads)
    if not os.path.isfile(os.path.join(model_dir, hf_guard.CONFIG_FILE)):
        raise InputError(f"{model_dir}: calibration needs a model directory with config.json")
    # transformers reads a folder of links to the directory's config, tokenizer and safetensors files alone
    # (hf_guard): nothing from the directory runs, no pickle is read, and config.json is checked first.
    with tempfile.TemporaryDirectory(prefix="rbe-calibrate-") as folder:
        shapes = hf_folder.stage_directory(model_dir, folder)
        config = hf_folder.check_folder(folder, model_dir, shapes)
        causal = is_causal_lm(config)
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = hf_folder.load_pretrained(cls, folder, model_dir, dtype=torch.float32).eval()
        tokenizer = hf_guard.load_tokenizer(folder, model_dir)
    return torch, model, tokenizer, causal


def _linear_modules(model, weights: dict[str, str]) -> dict:
    """The nn.Linear module of each named weight (names may carry or lack the base model prefix)."""
    import torch

    by_weight = {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            by_weight[f"{name}.weight"] = module
            if prefix and name.startswith(prefix + "."):
                by_weight.setdefault(f"{name[len(prefix) + 1 :]}.weight", module)
            elif prefix:
                by_weight.setdefault(f"{prefix}.{name}.weight", module)
    _add_tied_embeddings(model, by_weight, prefix)
    missing = sorted(set(weights) - set(by_weight))
    if missing:
        raise UsageError(
            f"calibration applies to Linear weights only (and to a token embedding tied to the "
            f"output head); not a Linear layer's weight: "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    return {name: by_weight[name] for name in weights}


def _add_tied_embeddings(model, by_weight: dict, prefix: str) -> None:
    """Maps an embedding whose weight is also a Linear layer's (a tied output head) to that layer.

    Its values are then calibrated for their use as the head, where an error
    reaches every logit; a lookup just passes the row on.
    """
    import torch

    linears = {id(m.weight): m for m in by_weight.values()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) in linears:
            head = linears[id(module.weight)]
            by_weight.setdefault(f"{name}.weight", head)
            if prefix and name.startswith(prefix + "."):
                by_weight.setdefault(f"{name[len(prefix) + 1 :]}.weight", head)


def calibration_windows(tokenizer, text: CalibrationText, model, causal: bool):
    """What calibration runs the model on: for a causal LM, up to ``text.windows``
    consecutive windows of tokens (shorter for models with fewer positions); for an
    encoder, sentences, as encoders are used (see ``_sentences``)."""
    limit = getattr(model.config, "max_position_embeddings", None) or text.window
    window = min(text.window, limit)
    if not causal:
        sentences = _sentences(tokenizer, text, window)
        if sentences:
            return sentences
    ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
    count = min(text.windows, len(ids) // window)
    if count < 1:
        raise UsageError(f"calibration text ({text.source}) holds {len(ids)} tokens, fewer than one window of {window}")
    return [ids[k * window : (k + 1) * window] for k in range(count)]


BATCH_TOKENS = 512  # per model call: a window of a causal LM alone, or some twenty sentences


def batches_of(windows: list[list[int]]) -> list[list[list[int]]]:
    """The windows in batches of equal length (at most BATCH_TOKENS tokens each, at least one
    window), so that no padding enters the statistics: one model call per batch instead of per
    sentence, and activations (a causal LM's logits) bounded as with one window."""
    by_length: dict[int, list[list[list[int]]]] = {}
    out = []
    for ids in windows:
        groups = by_length.setdefault(len(ids), [])
        if not groups or (len(groups[-1]) + 1) * len(ids) > BATCH_TOKENS:
            groups.append([])
            out.append(groups[-1])
        groups[-1].append(ids)
    return out


def _sentences(tokenizer, text: CalibrationText, window: int) -> list[list[int]]:
    """The text's prose sentences, each with the tokenizer's special tokens, until they hold as
    many tokens as ``text.windows`` windows would: an encoder embeds short inputs framed by its
    special tokens, which long windows of running text never show it.  Empty when the text has
    fewer than 8 sentences (then it is read in windows)."""
    from ...evaluate.quality import sentences_of

    found = sentences_of(text.text)
    if len(found) < 8:
        return []
    budget, out = text.windows * window, []
    for sentence in found:
        ids = tokenizer(sentence, truncation=True, max_length=window)["input_ids"]
        out.append(ids)
        budget -= len(ids)
        if budget <= 0:
            break
    return out


# -- sequential calibration: block by block, on the inputs the encoded blocks before give ----

# Stores a stage's weights (their names and calibrations, in the order they run), yielding
# (name, decoded values) as each is done; ``per_tensor`` makes one of a function encoding one weight.
Encode = Callable[[dict[str, Calibration]], Iterator[tuple[str, np.ndarray]]]


def per_tensor(encode_one: Callable[[str, Calibration], np.ndarray]) -> Encode:
    """An ``Encode`` that stores a stage's weights one after the other with ``encode_one``: one
    decoded weight at a time is alive."""
    return lambda stage: ((name, encode_one(name, calibration)) for name, calibration in stage.items())


def sequential(
    model_dir: str,
    weights: dict[str, str],
    text: CalibrationText,
    encode: Encode,
    before: dict[str, Calibration],
    threads: int | None = None,
    progress=None,
    start: int = 0,
    hidden: list[np.ndarray] | None = None,
    after_block: Callable[[int, list[np.ndarray]], None] | None = None,
) -> None:
    """Encodes the named weights block by block, each on the inputs the already encoded model gives.

    GPTQ as published quantizes a model this way: a block's Hessians come from
    running the calibration windows through the blocks before it *as encoded*,
    so each layer compensates the errors upstream of it.  Within a block the
    layers go in the order they run, a stage at a time (q, k and v read one
    input and form one stage; then o; then gate and up; then down), the block
    being run again after each stage.  ``encode(name, calibration)`` stores a
    weight and returns its decoded values, which replace the weight in the
    running model.  Weights outside the blocks (a token embedding tied to the
    output head, the head itself) are encoded first with their statistics
    from ``before`` (``collect`` on the original model), which loses them as they are used.  Memory: the model,
    every window's hidden states at one block boundary, and one stage's H.

    ``after_block(index, hidden)`` is told of each block encoded, with the
    hidden states the next block reads; a resumed conversion passes them back
    as ``hidden`` with ``start`` the block to go on from (the weights outside
    the blocks and the blocks before ``start`` are then written already).
    """
    torch, streamed, tokenizer, causal = stream.open_streamed(model_dir, threads)
    model = streamed.model
    modules = _linear_modules(model, weights)
    blocks = stream.blocks_of(model)
    owner = {name: _block_of(blocks, module) for name, module in modules.items()}
    front = streamed.front(blocks)
    read_in_front = {id(module._parameters[name]) for module, name in front}
    with torch.no_grad():
        for name in [n for n in modules if owner[n] is None]:
            # taken out of ``before`` even when written before an interruption: an untied head's H
            # (134 MB at 7 B shapes) is not kept for the blocks' hours
            calibration = before.pop(name, None)
            if start == 0:
                if progress:
                    progress.label(f"encoding {name}")
                _encode_outside(streamed, name, modules[name], encode({name: calibration}), read_in_front)
            del calibration
        if progress:
            progress.update(0)  # the weights outside the blocks are done: the pace per block starts here
        windows = batches_of(calibration_windows(tokenizer, text, model, causal))
        with streamed.loaded(front):
            inputs = stream.spilled(stream.block_inputs(model, blocks[0], windows, torch))
        streamed.overrides.clear()
        if hidden is not None:
            inputs = stream.spilled(_resumed_inputs(inputs, hidden, torch))
        for index, block in enumerate(blocks):
            if index < start:
                continue
            slots = streamed.slots([block])
            pending = [n for n in modules if owner[n] == index]
            where = f"block {index + 1}/{len(blocks)}"
            while pending:
                if progress:
                    progress.label(f"{where}: running it")
                with streamed.loaded(slots):
                    stage = _next_stage(block, {n: modules[n] for n in pending}, inputs, weights)
                # The block's weights are released while a stage encodes (GPTQ's largest moment);
                # the weights encoded so far wait in their stored dtype for the block's next run.
                if progress:
                    progress.label(f"{where}: encoding {', '.join(_short(n) for n in stage)}")
                _replace_all(streamed, modules, encode(stage))
                pending = [n for n in pending if n not in stage]
                stage = None  # its Hessian (and GPTQ's factor of it) is not kept into the next run
            with streamed.loaded(slots):
                inputs, _ = stream.run_block(block, inputs)
            streamed.forget_replaced()
            if after_block:
                after_block(index, [stream.hidden_of(call).numpy() for call in inputs])
            if progress:
                progress.update(1)


def _encode_outside(streamed, name: str, module, encoded: Iterator, read_in_front: set) -> None:
    """Keeps the decoded values of a weight outside the blocks only where the blocks' inputs read them
    (a tied embedding); an output head's (as large as the embedding) are dropped at once."""
    ((_, decoded),) = encoded
    decoded = _checked(name, decoded, module.weight)
    if id(module.weight) in read_in_front:
        streamed.overrides[id(module.weight)] = np.ascontiguousarray(decoded, np.float32)


def _resumed_inputs(inputs: list, hidden: list[np.ndarray], torch) -> list:
    """The first block's calls (masks, positions) with the hidden states a resumed conversion saved."""
    if len(hidden) != len(inputs) or any(
        tuple(h.shape) != tuple(stream.hidden_of(call).shape) or h.dtype != np.float32
        for call, h in zip(inputs, hidden)
    ):
        raise UsageError("--resume: the saved hidden states do not fit this model's calibration windows")
    return [stream.with_hidden(call, torch.from_numpy(h)) for call, h in zip(inputs, hidden)]


def _short(name: str) -> str:
    """A weight's name within its block, for progress: ``self_attn.q_proj`` of ``model.layers.3.self_attn.q_proj.weight``."""
    parts = name.removesuffix(".weight").split(".")
    return ".".join(parts[-2:])


def sequential_steps(model_dir: str) -> int:
    """How many progress steps ``sequential`` reports: one per block."""
    import transformers

    with hf_guard.content_errors(model_dir, hf_guard.CONFIG_FILE):
        config = transformers.AutoConfig.from_pretrained(model_dir, **hf_guard.NO_CODE)
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))


def _block_of(blocks, module) -> int | None:
    for index, block in enumerate(blocks):
        if any(m is module for m in block.modules()):
            return index
    return None


def _replace_all(streamed, modules: dict, encoded: Iterator) -> None:
    """Makes each weight's decoded values the ones its module runs with from now on, as they come
    (one decoded weight at a time is alive)."""
    for name, decoded in encoded:
        streamed.replace(modules[name].weight, _checked(name, decoded, modules[name].weight))


def _checked(name: str, decoded: np.ndarray, weight) -> np.ndarray:
    if tuple(decoded.shape) != tuple(weight.shape):
        raise UsageError(f"{name}: the encoded weight has shape {decoded.shape}, the model's {tuple(weight.shape)}")
    return decoded


MOMENT_ROWS = 1024  # rows of x^T x computed at a time (the float32 product holds rows x width)


def add_moments(total: np.ndarray | None, x) -> np.ndarray:
    """``total`` (float64, or None for a new sum) plus x^T x, added in place a band of rows at a time:
    only one band of the float32 product lives beside the sum (the whole product of a 7 B model's
    down projection input is 0.48 GB).  Each band's values equal those rows of the whole product."""
    width = x.shape[1]
    first_window = total is None
    if first_window:
        total = np.empty((width, width))
    for first in range(0, width, MOMENT_ROWS):
        rows = slice(first, first + MOMENT_ROWS)
        band = (x[:, rows].T @ x).numpy()
        if first_window:
            total[rows] = band  # widened exactly, as astype would
        else:
            total[rows] += band
    return total


def _next_stage(block, modules: dict, inputs, weights: dict[str, str]) -> dict[str, Calibration]:
    """Runs the block on every window; returns the Calibrations of the first layers to run that read one input."""
    lead: list[str] = []  # the first of ``modules`` to run
    stage: list[str] = []  # the layers that read the lead's input
    total, count = [None], [0]
    seen: dict = {}  # per window: the lead's input, kept alive so its id stays unique

    def hook(name):
        def accumulate(module, args):
            if not lead:
                lead.append(name)
            if name == lead[0]:
                seen["input"] = args[0]
                x = args[0].detach().reshape(-1, module.in_features)
                total[0] = add_moments(total[0], x)
                count[0] += x.shape[0]
            elif seen.get("input") is args[0] and name not in stage:
                stage.append(name)

        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for args, kwargs in inputs:
            seen.clear()
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not lead:
        raise UsageError(f"calibration: none of {sorted(modules)[:2]} runs when its block runs")
    hessian = np.divide(total[0], count[0], out=total[0])  # in place: no second copy of the sum
    return {name: Calibration(weights[name], hessian) for name in lead + stage}
