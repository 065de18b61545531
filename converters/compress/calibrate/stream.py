"""A transformers model that holds the weights of one part at a time.

Calibration runs a model on text, but never needs all of it at once: the
embeddings run, then each block in turn, then the final norm and the head.
``open_streamed`` builds the model from its config.json on the meta device
(no parameter allocated), makes its buffers (rope tables, position ids) as
transformers does after a load, and ``StreamedModel.loaded(part)`` fills the
parameters of that part from the checkpoint's tensors, in float32, for as long
as the part runs; they go back to the meta device afterwards.  Peak memory is
then the largest part in float32 beside the calibration's own state, whatever
the number of blocks.

Each tensor is read in its stored dtype (bf16 as its bits) and widened only
for the part that runs: the model's arithmetic is float32, as it was when the
whole model was loaded in float32, so the statistics are the same numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import tempfile

import numpy as np

from rbeformat import UsageError, extras
from rbeformat.embedded import hf_guard
from rbeformat.embedded.config import is_causal_lm
from rbeformat.values import from_float32, to_float32

from ... import hf_folder


class StreamedModel:
    """A model on the meta device whose parts are filled from ``source`` while they run.

    ``overrides`` holds values that replace a tensor's stored ones (an encoded
    tied embedding, which the blocks must see as encoded); ``replace`` keeps
    such values in the tensor's stored dtype (a weight encoded by the
    sequential calibration, whose decoded values that dtype holds exactly).
    """

    def __init__(self, model, source, torch):
        self.model = model
        self.source = source
        self.torch = torch
        self.tensor_of = _stored_names(model, {t.name for t in source.tensors})
        self.overrides: dict[int, np.ndarray] = {}
        self.replaced: dict[int, tuple[np.ndarray, str]] = {}

    @contextlib.contextmanager
    def loaded(self, slots: list[tuple[object, str]]):
        """Fills the parameters at ``slots`` ((module, parameter name) pairs) for the ``with`` body."""
        torch = self.torch
        filled = []
        made: dict[int, object] = {}  # a tied parameter (embedding and head) is read once
        release_freed_memory()
        try:
            for module, name in slots:
                meta = module._parameters[name]
                if id(meta) not in made:
                    made[id(meta)] = torch.nn.Parameter(torch.from_numpy(self.values_of(meta)), requires_grad=False)
                module._parameters[name] = made[id(meta)]
                filled.append((module, name, meta))
            made.clear()
            yield
        finally:
            for module, name, meta in reversed(filled):
                module._parameters[name] = meta
            del made, filled
            release_freed_memory()

    def replace(self, parameter, decoded: np.ndarray) -> None:
        """From now on the (meta) ``parameter`` runs with ``decoded``, float32 values its stored dtype
        holds exactly (a reader's values of an encoded tensor), kept in that dtype until
        ``forget_replaced``."""
        dtype = self.source.tensor(self.tensor_of[id(parameter)]).dtype
        self.replaced[id(parameter)] = (from_float32(decoded, dtype), dtype)

    def forget_replaced(self) -> None:
        self.replaced.clear()

    def values_of(self, parameter) -> np.ndarray:
        """A parameter's float32 values: its override or replaced values, or its stored tensor widened."""
        if id(parameter) in self.overrides:
            return self.overrides[id(parameter)]
        if id(parameter) in self.replaced:
            stored, dtype = self.replaced[id(parameter)]
            values = to_float32(stored, dtype)
            return values if values is not stored else values.copy()  # widened, or float32 ones copied
        name = self.tensor_of[id(parameter)]
        values = np.ascontiguousarray(to_float32(self.source.read(name), self.source.tensor(name).dtype))
        return values if values.flags.writeable else values.copy()  # torch.from_numpy wants a writeable array

    def slots(self, modules) -> list[tuple[object, str]]:
        """Every (module, parameter name) inside ``modules``, each once."""
        out, seen = [], set()
        for top in modules:
            for module in top.modules():
                for name, parameter in module._parameters.items():
                    if parameter is not None and (id(module), name) not in seen:
                        seen.add((id(module), name))
                        out.append((module, name))
        return out

    def outside(self, blocks) -> list[tuple[object, str]]:
        """The parameters outside the stack of blocks: embeddings, final norm, head, pooler."""
        inside = {id(m) for m in blocks.modules()}
        return [(m, n) for m, n in self.slots([self.model]) if id(m) not in inside]

    def front(self, blocks) -> list[tuple[object, str]]:
        """The parameters outside the blocks that run before them: all but the output head's
        (a tied head's weight is filled where the embedding reads it)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return [(m, n) for m, n in self.outside(blocks) if m is not head]


def _stored_names(model, stored: set[str]) -> dict[int, str]:
    """{id of each parameter: the checkpoint tensor that fills it}, by name with or without the base
    model's prefix (a tied parameter is filled from whichever of its names the checkpoint holds)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[int, str] = {}
    names: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), name)
        for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if candidate in stored and id(parameter) not in found:
                found[id(parameter)] = candidate
    missing = [names[key] for key in names if key not in found]
    if missing:
        raise UsageError(
            f"calibration: the checkpoint holds no tensor for the model's parameter {missing[0]!r} "
            f"({len(missing)} missing); rbe calibrates models whose tensors carry transformers' names"
        )
    return found


# glibc's malloc serves requests below a threshold from its heap, and the threshold grows to the
# largest block freed so far (up to 32 MiB): a block's run frees many activations of 10-30 MB, and
# the heap keeps what they held.  At Llama-2-7B's shapes it kept 0.9 GB of freed memory into GPTQ.
# malloc_trim gives it back whenever a part's weights are filled or released, at the cost of a walk
# over the heap (fixing the threshold instead cost a fifth of the encoding time in page faults).
def release_freed_memory() -> None:
    """Returns the memory malloc keeps freed to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def open_streamed(model_dir: str, threads: int | None):
    """(torch, StreamedModel, tokenizer, causal) for the model directory, no weight loaded yet.

    As ``load_for_calibration``: transformers reads links to the directory's
    config and tokenizer files alone, config.json checked first, no code run.
    ``model_dir`` may also be a folder of config and tokenizer files whose
    tensors lie elsewhere (an .rbe input: ``_staged``).
    """
    torch, transformers = import_torch(threads)
    label = getattr(model_dir, "label", model_dir)
    if not os.path.isfile(os.path.join(model_dir, hf_guard.CONFIG_FILE)):
        from rbeformat import InputError

        raise InputError(f"{label}: calibration needs a model directory with config.json")
    with tempfile.TemporaryDirectory(prefix="rbe-calibrate-") as folder:
        shapes, tensors = _staged(model_dir, folder)
        config = hf_folder.check_folder(folder, label, shapes)
        causal = is_causal_lm(config)
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        with hf_guard.content_errors(label, hf_guard.CONFIG_FILE):
            hf_config = transformers.AutoConfig.from_pretrained(folder, **hf_guard.NO_CODE)
        model = hf_guard.meta_model(auto, hf_config, torch.float32, label)
        hf_guard.check_shapes(model, shapes, label)
        tokenizer = hf_guard.load_tokenizer(folder, label)
    _make_buffers(model, torch)
    return torch, StreamedModel(model.eval(), tensors, torch), tokenizer, causal


def _staged(model_dir: str, folder: str) -> tuple[dict[str, tuple], object]:
    """Fills ``folder`` with links to what transformers reads of the model; returns {tensor name: shape}
    and the reader of its tensors (``tensors``, ``tensor(name)``, ``read(name)``).

    A model directory's tensors are its safetensors files'.  A path with ``weights`` (an .rbe input:
    ``sources/rbe.py``'s ``ContainerModel``) is a folder of the model's config and tokenizer files
    whose tensors ``weights`` reads, one at a time, from where they lie.
    """
    weights = getattr(model_dir, "weights", None)
    if weights is None:
        shapes = hf_folder.stage_directory(model_dir, folder)
        shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        return shapes, CheckpointTensors(model_dir, shards)
    hf_folder.link_data_files(model_dir, folder)
    return {t.name: tuple(t.shape) for t in weights.tensors}, weights


class CheckpointTensors:
    """The tensors of the safetensors files ``shards`` of ``model_dir`` (those transformers would load), read
    one at a time by name."""

    def __init__(self, model_dir: str, shards: list[str]):
        from ...safetensors_io import read_header

        self._by_name = {}
        for shard in shards:
            st = read_header(os.path.join(model_dir, shard))
            self._by_name.update({t.name: (st, t) for t in st.tensors})

    @property
    def tensors(self) -> list:
        return [t for _, t in self._by_name.values()]

    def tensor(self, name: str):
        return self._by_name[name][1]

    def read(self, name: str) -> np.ndarray:
        from ...sources.safetensors import read_tensor

        return read_tensor(*self._by_name[name])


def _make_buffers(model, torch) -> None:
    """Gives every buffer real memory and the values transformers gives it after a load
    (``_init_weights`` of the module that owns it: rope frequencies, position ids)."""
    owners = []
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
                owners.append(module)
    for module in {id(m): m for m in owners}.values():
        if not any(p is not None for p in module._parameters.values()):  # nothing on the meta device to touch
            model._init_weights(module)
        else:
            raise UsageError(
                f"calibration: {type(module).__name__} holds both parameters and buffers; rbe cannot "
                "stream its model block by block"
            )


def import_torch(threads: int | None):
    """torch and transformers, set to ``threads`` and quiet (MissingExtraError naming the extra without them)."""
    torch, transformers = extras.CALIBRATION.require()
    if threads:
        torch.set_num_threads(threads)
    # rbe reports its own progress and errors; transformers' load reports would bury them.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


# -- running a model part by part ------------------------------------------------------


class InputsCaught(Exception):
    """Stops a forward pass once the first block's inputs are caught."""


SPILL_BYTES = 512 * 2**20  # every window's hidden states at one block boundary beyond this go to a file


def run_block(block, inputs, after_each=None) -> tuple[list, bool]:
    """The next block's inputs: each window's call with the block's output as its hidden states; and
    whether the block returns a tuple (so that ``blocks_pass_on`` returns what it did).  When the
    windows' hidden states together pass ``SPILL_BYTES`` they are written, window by window as the
    block gives them, to a temporary file mapped back (``spill_sink``): memory then holds one window's.
    ``after_each()`` is called after each window's run."""
    out, as_tuple = [], False
    sink = spill_sink(inputs)
    for index, call in enumerate(inputs):
        output = block(*call[0], **call[1])
        if after_each:
            after_each()
        as_tuple = isinstance(output, (tuple, list))
        states = hidden(output)
        out.append(with_hidden(call, sink(index, states) if sink else states))
    return out, as_tuple


def spill_sink(inputs, limit: int | None = None):
    """None when the hidden states of ``inputs`` (float32, the shapes a block's outputs have) fit in
    ``limit`` bytes (default ``SPILL_BYTES``); else ``sink(index, states)``, which copies window
    ``index``'s states into a new temporary file and returns a tensor mapped onto them.  The file is
    unlinked at once: its space returns when the last tensor mapped onto it is dropped."""
    import torch

    shapes = [tuple(hidden_of(call).shape) for call in inputs]
    sizes = [math.prod(shape) for shape in shapes]
    if 4 * sum(sizes) <= (SPILL_BYTES if limit is None else limit):
        return None
    fd, path = tempfile.mkstemp(prefix="rbe-hidden-", suffix=".f32")
    try:
        mapped = np.memmap(path, np.float32, "w+", shape=(sum(sizes),))
    finally:
        os.close(fd)
        os.unlink(path)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    def sink(index: int, states):
        view = mapped[offsets[index] : offsets[index + 1]].reshape(shapes[index])
        view[...] = states.detach().to(torch.float32).numpy()
        return torch.from_numpy(view)

    return sink


def spilled(inputs, limit: int | None = None) -> list:
    """``inputs`` with their hidden states in a temporary file when they pass the limit (``spill_sink``)."""
    sink = spill_sink(inputs, limit)
    if sink is None:
        return inputs
    return [with_hidden(call, sink(index, hidden_of(call))) for index, call in enumerate(inputs)]


@contextlib.contextmanager
def blocks_pass_on(blocks, finals, as_tuple: bool):
    """For the ``with`` body, the first block returns the final hidden states of ``finals`` (one call per
    model run, in order) and the others return their input: a model run then computes what follows the
    blocks (final norm, head, pooler) with no block's weights in memory."""

    def shaped(values):
        return (values,) if as_tuple else values

    queue = iter(finals)
    try:
        blocks[0].forward = lambda *args, **kwargs: shaped(hidden_of(next(queue)))
        for block in list(blocks)[1:]:
            block.forward = lambda *args, **kwargs: shaped(hidden_of((args, kwargs)))
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def hidden_of(call: tuple[tuple, dict]):
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def blocks_of(model):
    """The model's stack of blocks: the ModuleList holding the most Linear layers."""
    import torch

    best, most = None, 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 1:
            count = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
            if count > most:
                best, most = module, count
    if best is None:
        raise UsageError("sequential calibration needs a model made of a stack of blocks with Linear layers")
    return best


def block_inputs(model, first, windows, torch) -> list[tuple[tuple, dict]]:
    """(positional, keyword) arguments the first block receives, one pair per batch of windows."""
    caught = []

    def catch(module, args, kwargs):
        caught.append((tuple(args), dict(kwargs)))
        raise InputsCaught

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in windows:
            try:
                model(input_ids=torch.tensor(batch), use_cache=False)
            except InputsCaught:
                pass
    finally:
        handle.remove()
    return caught


def hidden(output):
    """A block's hidden states: its output, or the first item of the tuple it returns."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(call: tuple[tuple, dict], hidden) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden,) + args[1:], kwargs
    return args, {**kwargs, "hidden_states": hidden}


# -- perplexity in bounded memory ------------------------------------------------------------


def perplexity(model_dir: str, parts: list[list[int]], largest_token_id: int, label: str, progress=None) -> float:
    """exp of the mean next-token loss over the windows ``parts``, as ``evaluate.quality.perplexity``
    computes it on the whole model, with one part of the model in memory at a time: every window's
    hidden states go through a block before the next block is read.  ``progress(n)`` counts blocks.
    InputError (naming ``label``) when a token id has no row in the model's embedding."""
    torch, streamed, _, _ = open_streamed(model_dir, None)
    model = streamed.model
    rows = model.get_input_embeddings().weight.shape[0]
    if largest_token_id >= rows:  # an index error deep in torch otherwise
        from rbeformat import InputError

        raise InputError(
            f"{label}: the tokenizer gives token id {largest_token_id}, but the model's token embedding has {rows} rows"
        )
    blocks = blocks_of(model)
    windows = [[part] for part in parts]  # one window a run, as the whole model is scored
    with torch.no_grad():
        with streamed.loaded(streamed.front(blocks)):
            inputs = spilled(block_inputs(model, blocks[0], windows, torch))
        as_tuple = False
        for block in blocks:
            with streamed.loaded(streamed.slots([block])):
                inputs, as_tuple = run_block(block, inputs)
            if progress:
                progress(1)
        losses = []
        with streamed.loaded(streamed.outside(blocks)), blocks_pass_on(blocks, inputs, as_tuple):
            for part in parts:
                ids = torch.tensor([part], dtype=torch.long)
                losses.append(float(model(input_ids=ids, labels=ids).loss))
    return math.exp(sum(losses) / len(losses))
