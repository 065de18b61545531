"""``rbe eval`` of an ONNX model: the original and every compressed file run in ONNX Runtime.

The original is an .onnx file or an .rbe converted from one (``rbe convert
model.onnx out.rbe``: a stored graph and no config.json); every compressed
file is an .rbe converted from the same model, holding the same tensors and a
graph with the same inputs and outputs.  The .onnx file runs as checked by
``sources.onnx.plan_conversion`` (external data read by rbe from checked paths,
never by the runtime); an .rbe runs as ``rbe_loaders.ort.session`` builds it,
its quantized weights kept compressed.  One session at a time, freed before the
next; every call into ONNX Runtime and tokenizers through ``rbe_loaders.ort.guard``.

What the graph is, from its interface:

* a causal LM when it has an output named ``logits`` ([batch, tokens,
  vocabulary]): perplexity, as ``quality`` defines it, each window run once
  from an empty KV cache;
* else an encoder whose hidden states are the output ``last_hidden_state``, or
  the one float output of rank 3 ([batch, tokens, hidden]; a graph that pools
  itself may give more outputs beside it): mean cosine and nearest-neighbour
  agreement of the attention-mask weighted means, as ``quality`` defines them.

The graph's inputs are fed as a sentence has them: ``input_ids``,
``attention_mask`` (1 on tokens, 0 on padding), ``token_type_ids`` (the
tokenizer's), ``position_ids`` (0, 1, ...), and any KV-cache input (a float
input of rank 4 whose name holds "past", with fixed heads and head size) an
empty cache; a graph that wants another input is refused.

An ONNX file carries no tokenizer: ``--tokenizer`` names one (a tokenizer.json, or
a folder holding one), else the original's or a compressed file's embedded
tokenizer.json is used, else the run stops with a usage error saying what to pass.
Sentences are tokenized with the tokenizer's special tokens, padded to the
longest of each batch of ``quality.EMBEDDING_BATCH`` and cut at the tokenizer's
own limit or the graph's position table, whichever is shorter; the perplexity text
without special tokens and uncut.

Sizes: an .onnx original's size is the file and its external data, and ratios
divide that; an .rbe original's ratios divide its dense bytes (every tensor as
its dtype stores it, and the stored graph), near the .onnx that ``rbe decode``
writes.  The Linear weights are those the graph multiplies (MatMul, Gemm:
``sources.onnx.graph_roles``), not the output head.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field

import numpy as np

from rbeformat import FormatError, InputError, Reader, UsageError, extras

from . import quality
from .eval import (
    ORT_RUNTIME,
    EmbeddingMeasure,
    EvalOptions,
    PerplexityMeasure,
    Sizes,
    check_same_model,
    choose_measure,
    linear_by_role,
    rbe_sizes,
    scoring_progress,
)

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
LOGITS = "logits"
HIDDEN_STATE = "last_hidden_state"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_HINT = "--tokenizer tokenizer.json (or a folder holding one)"
FLOAT_TYPES = (1, 10, 11, 16)  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
INT32 = 6  # onnx TensorProto INT32; every other integer input is fed int64


def require_runtime() -> None:
    """onnx, onnxruntime and tokenizers, or one error naming the extra that installs them."""
    extras.ORT_EVAL.require()


# -- what the graph takes and gives -----------------------------------------------------


@dataclass(frozen=True)
class GraphInterface:
    """How a graph is fed and read: its text inputs (name -> integer dtype), its KV-cache inputs
    (name -> (heads, head size)), the output scored and whether it is a causal LM's logits."""

    causal: bool
    output: str
    inputs: tuple[tuple[str, type], ...]
    past: tuple[tuple[str, int, int], ...] = field(default=())


def _dims(value) -> list:
    """A graph value's dimensions: ints where fixed, None where not."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _elem_type(value) -> int:
    return value.type.tensor_type.elem_type


def graph_interface(graph, source: str) -> GraphInterface:
    """The interface of a GraphProto (module doc); UsageError for a graph ``rbe eval`` cannot feed or read."""
    initializers = {t.name for t in graph.initializer}
    inputs, past = [], []
    for value in graph.input:
        if value.name in initializers:
            continue
        if value.name in TEXT_INPUTS:
            inputs.append((value.name, np.int32 if _elem_type(value) == INT32 else np.int64))
        elif "past" in value.name and _elem_type(value) in FLOAT_TYPES and len(_dims(value)) == 4:
            dims = _dims(value)
            if dims[1] is None or dims[3] is None:
                raise UsageError(
                    f"{source}: its KV-cache input {value.name!r} has no fixed heads and head size "
                    f"({dims}), so rbe eval cannot give it an empty cache"
                )
            past.append((value.name, dims[1], dims[3]))
        else:
            raise UsageError(
                f"{source}: its graph wants the input {value.name!r}; rbe eval feeds text models only "
                f"({', '.join(TEXT_INPUTS)} and an empty KV cache)"
            )
    if "input_ids" not in dict(inputs):
        raise UsageError(f"{source}: its graph has no input named input_ids; rbe eval feeds it token ids")
    return GraphInterface(*_scored_output(graph, source), tuple(inputs), tuple(past))


def _scored_output(graph, source: str) -> tuple[bool, str]:
    """(causal, the output scored): ``logits``, else ``last_hidden_state``, else the one float output of rank 3."""
    outputs = {value.name: value for value in graph.output}
    if LOGITS in outputs:
        return True, LOGITS
    if HIDDEN_STATE in outputs:
        return False, HIDDEN_STATE
    hidden = [name for name, value in outputs.items() if _elem_type(value) in FLOAT_TYPES and len(_dims(value)) == 3]
    if len(hidden) != 1:
        found = f"{len(hidden)} ({', '.join(repr(n) for n in hidden[:3])})" if hidden else "none"
        raise UsageError(
            f"{source}: rbe eval scores a graph output named logits (causal LMs) or last_hidden_state "
            f"(encoders), else the one float output of rank 3; this graph has neither name, and {found} "
            "of rank 3"
        )
    return False, hidden[0]


def feed(interface: GraphInterface, ids: np.ndarray, mask: np.ndarray, type_ids: np.ndarray | None = None) -> dict:
    """The graph's inputs for token ids [batch, tokens] with their attention mask."""
    values = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids) if type_ids is None else type_ids,
        "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
    }
    out = {name: np.ascontiguousarray(values[name], dtype=dtype) for name, dtype in interface.inputs}
    for name, heads, head_size in interface.past:
        out[name] = np.zeros((ids.shape[0], heads, 0, head_size), np.float32)
    return out


# -- the original -------------------------------------------------------------------------


@dataclass
class OnnxOriginal:
    """The original's sizes, the bytes ratios divide, its graph, its tensors' roles and, for an .onnx
    file, its checked plan (``sources.onnx``) until its session is built."""

    path: str
    sizes: Sizes
    reference_bytes: int
    reference_means: str  # what reference_bytes counts, for the table
    graph: object  # onnx.ModelProto, initializers without data
    roles: dict
    plan: object | None = None

    def token_rows(self) -> int | None:
        """The rows of the token embedding table: the largest token id + 1 the model takes."""
        return self._rows_of("token_embedding")

    def positions(self) -> int | None:
        """The rows of the position table: the longest sequence the model takes."""
        return self._rows_of("position_embedding")

    def _rows_of(self, role: str) -> int | None:
        rows = [self.sizes.tensors[name][1][0] for name, r in self.roles.items() if r.role == role]
        return min(rows) if rows else None


def read_original(path: str) -> OnnxOriginal:
    if path.lower().endswith(".onnx"):
        return _onnx_file(path)
    return _onnx_container(path)


def _onnx_file(path: str) -> OnnxOriginal:
    import onnx

    from ..sources.onnx import plan_conversion

    plan = plan_conversion(path)  # every initializer and external data path checked
    file_bytes = os.path.getsize(path) + sum(os.path.getsize(f) for f in plan.external_files)
    sizes = Sizes(file_bytes, {i.name: (i.dtype, i.shape, i.size) for i in plan.initializers})
    return OnnxOriginal(
        path,
        sizes,
        file_bytes,
        "the original's bytes (the .onnx file and its external data)",
        onnx.ModelProto.FromString(plan.graph),
        plan.roles,
        plan,
    )


def _onnx_container(path: str) -> OnnxOriginal:
    from rbeformat.embedded.onnx import GRAPH_KEY, read_graph

    from ..sources.onnx import Initializer, graph_roles

    sizes = rbe_sizes(path)
    with Reader(path, verify_checksums=False) as r:
        graph = read_graph(r)
        graph_bytes = r.files()[r.metadata()[GRAPH_KEY]].blob.items
        dense = sum(math.prod(r.entry(name).shape) * r.entry(name).dtype.itemsize for name in sizes.tensors)
    roles = graph_roles(
        graph.graph, {name: Initializer(name, dtype, shape) for name, (dtype, shape, _) in sizes.tensors.items()}
    )
    means = "the original's dense bytes (its tensors as their dtypes store them, and its graph)"
    return OnnxOriginal(path, sizes, dense + graph_bytes, means, graph, roles)


# -- the files compared -----------------------------------------------------------------


def check_compressed(path: str, original: OnnxOriginal, interface: GraphInterface) -> Sizes:
    """A compressed file's sizes, once it holds the original's tensors and a graph fed and read the same."""
    from rbeformat.embedded.onnx import carries_onnx, read_graph

    with Reader(path, verify_checksums=False) as r:
        if not carries_onnx(r):
            raise InputError(
                f"{path}: holds no ONNX graph, so ONNX Runtime cannot run it; compare .rbe files converted "
                f"from the same .onnx model as {original.path}"
            )
        graph = read_graph(r)
    if graph_interface(graph.graph, path) != interface:
        raise InputError(
            f"{path}: its graph's inputs or outputs differ from {original.path}'s; compare files converted "
            "from the same model"
        )
    sizes = rbe_sizes(path)
    check_same_model(path, sizes, original.path, original.sizes)
    return sizes


def _session_options(threads: int | None):
    import onnxruntime

    from rbe_loaders.ort import guard

    options = onnxruntime.SessionOptions()
    options.log_severity_level = guard.QUIET  # its errors come back as one-line InputErrors
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def container_session(path: str, threads: int | None):
    """ONNX Runtime's session on an .rbe file's graph, its quantized weights kept compressed."""
    from rbe_loaders.ort.build import session

    built, _ = session(path, quiet=True, sess_options=_session_options(threads))
    return built


def onnx_file_session(original: OnnxOriginal, threads: int | None):
    """ONNX Runtime's session on a checked .onnx file, its weights handed over in memory."""
    import onnxruntime

    from rbe_loaders.ort import guard
    from rbe_loaders.ort.build import fits_one_proto

    from ..sources.onnx import filled_model

    model = filled_model(original.plan)
    original.plan = None  # its inline weights are in ``model`` now
    if not fits_one_proto(model):
        raise UsageError(
            f"{original.path}: holds 2 GB or more, which ONNX Runtime takes only as external data; convert "
            f"it losslessly (rbe convert {original.path} original.rbe) and give that .rbe as the original"
        )
    data = model.SerializeToString()
    del model
    with guard.session_options(_session_options(threads), quiet=True) as options:
        return guard.call(
            lambda: onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"]),
            path=original.path,
            doing="building a session on the model",
        )


# -- the tokenizer ------------------------------------------------------------------------


def eval_tokenizer(option: str | None, original: str, compressed: list[str]) -> tuple[object, str]:
    """(``tokenizers.Tokenizer``, where it came from): ``--tokenizer``, else the first embedded
    tokenizer.json of the original and the compressed files; UsageError when there is none."""
    if option is not None:
        from ..compress.calibrate.ort import load_tokenizer

        return load_tokenizer(option), option
    for path in [original, *compressed]:
        if path.lower().endswith(".onnx"):
            continue
        with Reader(path, verify_checksums=False) as r:
            embedded = TOKENIZER_FILE in r.files()
        if embedded:
            from rbe_loaders import tokenizer

            return tokenizer(path), f"{path} (its {TOKENIZER_FILE})"
    raise UsageError(
        f"{original}: an ONNX model carries no tokenizer, and scoring it needs one to turn text into "
        f"token ids: pass {TOKENIZER_HINT} of the model it was exported from"
    )


def tokenizing(fn, source: str, doing: str):
    """``fn()``, a call into the tokenizer, as ``rbe_loaders.ort.guard`` runs it (its errors name ``source``)."""
    from rbe_loaders.ort import guard

    return guard.call(fn, path=source, doing=doing, source="tokenizers")


def check_token_ids(largest: int, original: OnnxOriginal, tokenizer_source: str) -> None:
    """Every token id has a row in the model's token embedding (ONNX Runtime's Gather fails deep otherwise)."""
    rows = original.token_rows()
    if rows is not None and largest >= rows:
        raise InputError(
            f"{tokenizer_source}: gives token id {largest}, but {original.path}'s token embedding has {rows} "
            f"rows; pass {TOKENIZER_HINT} of the model it was exported from"
        )


class SentenceBatches:
    """The sentences as graph inputs, ``quality.EMBEDDING_BATCH`` at a time, tokenized once for every model.
    Called with the sentences (as ``EmbeddingMeasure`` calls it), it returns their token ids."""

    def __init__(self, tokenizer, source: str, limit: int | None):
        self.tokenizer, self.source = tokenizer, source
        padding = tokenizer.padding or {}
        # pad to the longest of each batch, with the tokenizer's pad token (masked out either way)
        tokenizer.enable_padding(pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]"))
        own = (tokenizer.truncation or {}).get("max_length")
        cut = min((n for n in (own, limit) if n), default=None)
        if cut is not None:
            tokenizer.enable_truncation(cut)
        self.batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, sentences: list[str]) -> list[list[int]]:
        step = quality.EMBEDDING_BATCH
        self.batches = [self._encoded(sentences[first : first + step]) for first in range(0, len(sentences), step)]
        return [row for ids, _, _ in self.batches for row in ids.tolist()]

    def _encoded(self, part: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        encodings = tokenizing(lambda: self.tokenizer.encode_batch(part), self.source, "tokenizing the sentences")
        return tuple(
            np.array([getattr(e, name) for e in encodings], np.int64) for name in ("ids", "attention_mask", "type_ids")
        )


def text_token_ids(tokenizer, source: str):
    """``token_ids(text)`` for perplexity: no special tokens, no padding, no cut."""

    def token_ids(text: str) -> list[int]:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizing(lambda: tokenizer.encode(text, add_special_tokens=False).ids, source, "tokenizing the text")

    return token_ids


# -- scoring -----------------------------------------------------------------------------


def _float_array(value, ndim: int) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == ndim and value.dtype.kind == "f"


def _form(value) -> str:
    return f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__


def embeddings(session, path: str, interface: GraphInterface, batches: SentenceBatches, advance) -> np.ndarray:
    """Attention-mask weighted means of the hidden-state output, one float64 row per sentence."""
    from rbe_loaders.ort import guard

    rows = []
    for ids, mask, type_ids in batches.batches:
        (hidden,) = guard.run(session, [interface.output], feed(interface, ids, mask, type_ids), path=path)
        if not _float_array(hidden, 3) or hidden.shape[:2] != mask.shape:
            raise FormatError(
                f"{path}: the graph's {interface.output!r} is {_form(hidden)}, not float [batch, tokens, hidden] "
                f"for inputs of {list(mask.shape)}"
            )
        weights = mask[..., None].astype(np.float64)
        rows.append((hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0))
        advance(len(ids))
    return np.concatenate(rows)


def window_loss(session, path: str, interface: GraphInterface, window: list[int]) -> float:
    """The mean next-token loss over one window, labels = input_ids, from an empty cache."""
    from rbe_loaders.ort import guard

    ids = np.array([window], np.int64)
    (logits,) = guard.run(session, [interface.output], feed(interface, ids, np.ones_like(ids)), path=path)
    if not _float_array(logits, 3) or logits.shape[:2] != ids.shape or logits.shape[2] <= max(window):
        raise FormatError(
            f"{path}: the graph's {interface.output!r} is {_form(logits)}, not float logits [1, {len(window)}, "
            f"vocabulary of more than {max(window)}]"
        )
    logits = logits[0, :-1].astype(np.float64)  # the last position predicts past the window
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(window) - 1), window[1:]].mean())


@dataclass
class OrtScorer:
    """Scores one session after another by the measure, with the original's figures as the reference."""

    measure: PerplexityMeasure | EmbeddingMeasure
    interface: GraphInterface
    batches: SentenceBatches | None
    original: OnnxOriginal
    options: EvalOptions
    files: int = 1  # the original and the compressed files, each scored in turn
    linear: set = field(init=False)
    previous: object = field(default=None, init=False)  # the progress of the session scored last
    scored: int = field(default=0, init=False)  # sessions whose scoring has begun

    def __post_init__(self):
        self.linear = linear_by_role(self.original.roles, self.original.sizes)

    def row(self, path: str, role: str, sizes: Sizes) -> dict:
        causal = isinstance(self.measure, PerplexityMeasure)
        total = len(self.measure.parts) if causal else len(self.measure.sentences)
        self.scored += 1
        position = (self.scored, self.files)
        self.previous = scoring_progress(path, total, self.measure.unit, self.options, self.previous, position)
        with self.previous as bar:
            bar.label("building the ONNX Runtime session")
            if role == "original" and self.original.plan is not None:
                session = onnx_file_session(self.original, self.options.threads)
            else:
                session = container_session(path, self.options.threads)
            bar.label("")
            try:
                if causal:
                    losses = []
                    for window in self.measure.parts:
                        losses.append(window_loss(session, path, self.interface, window))
                        bar.update(1)
                    scores = self.measure.scored(math.exp(sum(losses) / len(losses)))
                else:
                    scores = self.measure.compared(embeddings(session, path, self.interface, self.batches, bar.update))
            finally:
                del session
                gc.collect()  # one session in memory at a time
        return {"file": path, "role": role, **sizes.row(self.original.reference_bytes, self.linear), **scores}


def evaluate_onnx(original: str, compressed: list[str], options: EvalOptions, concerning) -> dict:
    """``evaluate`` for an ONNX original (module doc); ``concerning`` hears which file a failure is about."""
    require_runtime()
    concerning(original)
    model = read_original(original)
    interface = graph_interface(model.graph.graph, original)
    measure_kind = choose_measure(interface.causal, original, options, "its graph gives no logits")
    sizes = {}
    for path in compressed:  # every file is checked before the first session is built
        concerning(path)
        sizes[path] = check_compressed(path, model, interface)
    concerning(options.tokenizer or original)
    tokenizer, tokenizer_source = eval_tokenizer(options.tokenizer, original, compressed)
    concerning(options.text or options.sentences or tokenizer_source)
    batches = None
    if measure_kind is PerplexityMeasure:
        measure = PerplexityMeasure(None, options, text_token_ids(tokenizer, tokenizer_source), ORT_RUNTIME)
    else:
        batches = SentenceBatches(tokenizer, tokenizer_source, model.positions())
        hidden = (
            HIDDEN_STATE
            if interface.output == HIDDEN_STATE
            else f"the hidden states [batch, tokens, hidden] (the graph's output {interface.output!r})"
        )
        measure = EmbeddingMeasure(None, options, batches, ORT_RUNTIME, hidden)
    check_token_ids(measure.largest_token_id, model, tokenizer_source)
    scorer = OrtScorer(measure, interface, batches, model, options, files=1 + len(compressed))
    concerning(original)
    rows = [scorer.row(original, "original", model.sizes)]
    for path in compressed:
        concerning(path)
        rows.append(scorer.row(path, "compressed", sizes[path]))
    return {
        "measure": measure.name,
        "protocol": {**measure.protocol(), "tokenizer": tokenizer_source},
        "description": f"{measure.describe()}; tokenizer: {tokenizer_source}",
        "runtime": ORT_RUNTIME,
        "ratio_divides": model.reference_means,
        "rows": rows,
    }
