"""A Hugging Face model's architecture as an ONNX graph, exported at conversion (``rbe convert --onnx``).

torch's exporter (``torch.onnx.export(..., dynamo=True)``) writes the graph with
the weights as initializers: embeddings, norms and biases under their HF names,
each Linear weight as a new initializer (``val_N``) holding W^T, the B of a
MatMul.  The container keeps one copy of the weights, the HF tensors as the
normal conversion stores them (``pipeline.convert``), and wires the graph to them:

* each initializer equal bit for bit to a stored HF tensor, as is or transposed,
  maps to it (the HF tensor of the same name first, then any whose bytes match;
  tied weights are stored once, so they match once).  The graph is float32
  (ONNX Runtime's CPU kernels do not run bf16 graphs): a bf16 or fp16 tensor
  maps to the initializer its values widened to float32 equal, "widened";
* each other initializer (small constants, buffers such as ``inv_freq``) is a
  lossless rbe tensor of its own, ``onnx/<name>`` (``OWN_PREFIX``);
* the graph with its initializers' data removed is the embedded file named by
  ``onnx.graph``; the mapping, {initializer: {"tensor": name, "transposed": bool}}
  (with ``"widened": true`` where widened),
  is the embedded JSON file named by ``onnx.initializers`` (spec/rbe-v1.md,
  "ONNX graphs exported from Hugging Face checkpoints").

Encoders (``AutoModel``) take ``input_ids``, ``attention_mask`` and, when the
model has token types, ``token_type_ids``, and give ``last_hidden_state``
(pooling is the caller's).  Causal LMs (``AutoModelForCausalLM``) take
``input_ids``, ``attention_mask`` [batch, past + seq], ``position_ids`` and the
KV cache as flat tensors ``past.{i}.key`` / ``past.{i}.value`` [batch, kv_heads,
past, head_dim] (past may be 0 for the first step), and give ``logits`` and
``present.{i}.key`` / ``present.{i}.value``.  Batch, sequence and past lengths
are dynamic.  torch and transformers are imported only here.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rbe_loaders.ort.graph import WIDENS, Source, graph_initializers, initializer_values, stored_graph
from rbeformat import InputError, UsageError, Writer, extras
from rbeformat.embedded.onnx import GRAPH_KEY, GRAPH_PATH, MAPPING_KEY, MAPPING_PATH, ONNX_DTYPES, OWN_PREFIX
from rbeformat.onnx_safety import check_model
from rbeformat.values import to_float32

from .sources.onnx import DATA_FIELDS, Initializer

if TYPE_CHECKING:
    import onnx

    from .sources import TensorSource

WRAPPED = "model"  # the attribute holding the HF model in the export wrappers: a prefix of initializer names
# Example sizes for the export: at least 2 each, or the exporter fixes the dimension to its value.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 5, 3


@dataclass
class ExportedGraph:
    """The stripped graph, its initializer mapping and the constants it alone needs."""

    kind: str  # "encoder" or "causal-lm"
    graph: bytes
    mapping: dict[str, dict]
    own: list[Initializer]  # named OWN_PREFIX + the initializer's name

    def add_to(self, w: Writer) -> dict[str, str]:
        """Writes the graph, the mapping and the own constants; returns the metadata that names them."""
        for init in self.own:
            read_at, close = init.reader()
            try:
                w.add_tensor(init.name, init.dtype, init.shape, read_at)
            finally:
                close()
        w.add_file(GRAPH_PATH, self.graph)
        w.add_file(MAPPING_PATH, json.dumps(self.mapping, indent=1, sort_keys=True).encode())
        return {GRAPH_KEY: GRAPH_PATH, MAPPING_KEY: MAPPING_PATH}

    def summary(self) -> str:
        transposed = sum(entry["transposed"] for entry in self.mapping.values())
        widened = sum("widened" in entry for entry in self.mapping.values())
        return (
            f"ONNX graph ({self.kind}): {len(self.mapping)} initializers, {len(self.mapping) - len(self.own)} "
            f"wired to the HF tensors ({transposed} transposed, {widened} widened to float32), "
            f"{len(self.own)} stored as tensors of their own, named {OWN_PREFIX}<initializer>"
        )


def export_graph(plan: TensorSource, threads: int | None = None) -> ExportedGraph:
    """Exports the model of a HF directory and wires its initializers to the directory's tensors."""
    if plan.config() is None:
        raise UsageError(
            f"{plan.root or '.'}: --onnx exports the model's architecture, which needs a model "
            "directory with its config.json"
        )
    model, kind = export_model(plan.root, threads)
    return wire(model, plan, kind)


# -- exporting --------------------------------------------------------------------------


def export_model(root: str, threads: int | None = None):
    """The ONNX graph of the HF model in ``root`` (an ``onnx_ir.Model``, its weights the torch model's own
    tensors, not copied) and its kind."""
    torch, transformers, _, _ = extras.ONNX_EXPORT.require()  # onnxscript: torch's exporter writes with it
    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # rbe reports its own progress and errors
    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar among rbe's lines
    from rbeformat.embedded import hf_guard

    from . import hf_folder

    # transformers reads links to the directory's config, tokenizer and safetensors files alone, after
    # config.json passed hf_guard's checks: nothing from the directory runs, no pickle is read.
    with tempfile.TemporaryDirectory(prefix="rbe-export-") as folder:
        hf_folder.check_folder(folder, root, hf_folder.stage_directory(root, folder))
        with hf_guard.content_errors(root, hf_guard.CONFIG_FILE):
            config = transformers.AutoConfig.from_pretrained(folder, **hf_guard.NO_CODE)
        kind = model_kind(config)
        auto = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
        # float32, which ONNX Runtime's CPU kernels run: a bf16 or fp16 checkpoint's tensors are wired widened
        model = hf_folder.load_pretrained(auto, folder, root, dtype=torch.float32).eval()
    module, args, names = _causal_lm(model) if kind == "causal-lm" else _encoder(model)
    inputs, outputs, dynamic = names
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dynamic,
                verbose=False,
            )
    except Exception as exc:  # the exporter fails in many ways, each about this architecture
        raise InputError(
            f"{root}: torch.onnx.export could not export this {kind} ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    return program.model, kind


# The exporter records, on every node, the Python stack that made it: absolute paths of the converting
# machine's files and line numbers of torch, transformers and rbe.  A container must not carry them,
# and its bytes must not depend on where or with which library versions' line numbers it was made.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(model) -> None:
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs:
        graph = graphs.pop()
        nodes += graph.node
        for node in graph.node:
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
    for node in nodes:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def model_kind(config) -> str:
    """ "causal-lm" for a decoder-only LM, "encoder" for an encoder (BERT-like); UsageError for others."""
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"--onnx exports encoders and causal LMs, not encoder-decoder models ({config.model_type})")
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if (
        any(
            a.endswith(("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification"))
            for a in architectures
        )
        or not architectures
    ):
        return "encoder"
    raise UsageError(f"--onnx exports encoders and causal LMs; {architectures[0]} is neither")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress to stdout, which belongs to rbe's own output, and logs
    warnings about optional packages (torchvision) that say nothing about this model."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        exporter_log.setLevel(level)


def _encoder(model):
    import torch

    with_types = getattr(model.config, "type_vocab_size", 0) > 0 and _accepts(model, "token_type_ids")
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])

    class Encoder(torch.nn.Module):
        """input_ids, attention_mask[, token_type_ids] -> last_hidden_state."""

        def __init__(self):
            super().__init__()
            setattr(self, WRAPPED, model)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            types = {"token_type_ids": token_type_ids} if with_types else {}
            return getattr(self, WRAPPED)(input_ids=input_ids, attention_mask=attention_mask, **types).last_hidden_state

    ids = torch.randint(0, model.config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ))
    args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if with_types else ())
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = tuple({0: batch, 1: seq} for _ in names)
    return Encoder(), args, (names, ["last_hidden_state"], dynamic)


def _accepts(model, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder's KV cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim


def cache_names(layers: int, kind: str = "past") -> list[str]:
    return [f"{kind}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def _causal_lm(model):
    import torch
    from transformers import DynamicCache

    layers, kv_heads, head_dim = cache_geometry(model.config)
    cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5

    class CausalLM(torch.nn.Module):
        """input_ids, attention_mask, position_ids, flat past -> logits, flat present."""

        def __init__(self):
            super().__init__()
            setattr(self, WRAPPED, model)

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=model.config)
            out = getattr(self, WRAPPED)(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_argument: cache},
            )
            present = out.cache if "cache" in out else out.past_key_values
            return (out.logits, *[t for layer in present.layers for t in (layer.keys, layer.values)])

    ids = torch.randint(0, model.config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ))
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_PAST + EXAMPLE_SEQ, dtype=torch.int64)
    positions = torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + EXAMPLE_SEQ).expand(EXAMPLE_BATCH, -1).contiguous()
    dtype = next(model.parameters()).dtype
    past = [torch.randn(EXAMPLE_BATCH, kv_heads, EXAMPLE_PAST, head_dim, dtype=dtype) for _ in range(2 * layers)]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_len, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past_len}] * (2 * layers),
    }
    inputs = ["input_ids", "attention_mask", "position_ids", *cache_names(layers)]
    outputs = ["logits", *cache_names(layers, "present")]
    return CausalLM(), (ids, mask, positions, past), (inputs, outputs, dynamic)


def dense_model(r) -> onnx.ModelProto:
    """The stored graph with every initializer's data filled from the tensor the mapping names
    (checked by ``graph_initializers``), transposed and widened where it says: a plain .onnx model."""
    model = stored_graph(r)
    wiring = graph_initializers(r)
    for t in model.graph.initializer:
        if t.name in wiring:  # bf16 and fp8 come as their bits, which raw_data holds
            t.raw_data = initializer_values(r, wiring[t.name]).tobytes()
    return model


# -- wiring the weights -----------------------------------------------------------------


def wire(model, plan: TensorSource, kind: str) -> ExportedGraph:
    """Maps each initializer of the exported ``onnx_ir.Model`` to the HF tensor it equals (as is or
    transposed) or to a constant of its own, and returns the graph without the initializers' data.

    The data is dropped from the model before it becomes a ModelProto, one initializer at a time: the
    weights are never copied into the proto, whose 2 GB limit a large model would pass."""
    import onnx_ir as ir

    _refuse_prefix_in_use(plan)
    by_content, by_name = tensor_index(plan)
    mapping, own = {}, []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or int(tensor.dtype) not in ONNX_DTYPES:
            continue  # strings and the like stay in the graph, data and all (as for ONNX input)
        dtype, shape, data = ONNX_DTYPES[int(tensor.dtype)], tuple(int(d) for d in tensor.shape), tensor.tobytes()
        key = content_key(dtype, shape, data)
        found = _same_named(value.name, key, by_name) or by_content.get(key)
        if found is None:
            own.append(Initializer(OWN_PREFIX + value.name, dtype, shape, inline=data))
            found = Source(OWN_PREFIX + value.name)
        mapping[value.name] = {"tensor": found.tensor, "transposed": found.transposed}
        if found.widened:  # written only when true: a graph of the checkpoint's dtype maps as before
            mapping[value.name]["widened"] = True
        # a reference to nowhere in its place: serializing it copies no data (its fields are cleared below)
        value.const_value = ir.ExternalTensor(STRIPPED, 0, len(data), tensor.dtype, shape=tensor.shape, name=value.name)
        del tensor, data
    proto = ir.serde.serialize_model(model)
    for t in proto.graph.initializer:
        if t.name in mapping:
            for field in DATA_FIELDS:
                t.ClearField(field)
            t.ClearField("data_location")
    _drop_stack_traces(proto)
    check_model(proto, f"{plan.root or '.'}: the graph torch exported")  # what every reader of the container checks
    return ExportedGraph(kind, proto.SerializeToString(), mapping, own)


STRIPPED = "rbe-stripped"  # the external location of an initializer whose data the container holds apart


def content_key(dtype: str, shape, data) -> tuple:
    return dtype, tuple(shape), hashlib.sha256(data).digest()


def tensor_index(plan: TensorSource) -> tuple[dict, dict]:
    """({content key: Source}, {tensor: {content key: Source}}) over every HF tensor as stored and, for
    bf16 and fp16, widened to float32, each also transposed when a matrix (the second dict holds the
    untransposed ones); the first tensor with given content keeps it (tied weights count once)."""
    import numpy as np

    by_content, by_name = {}, {}
    for t in plan.tensors:
        stored = plan.read(t.name)
        forms = [(t.dtype, stored, False)]
        if t.dtype in WIDENS:
            forms.append(("F32", to_float32(stored, t.dtype), True))
        by_name[t.name] = {}
        for dtype, values, widened in forms:
            key = content_key(dtype, t.shape, values.tobytes())
            by_name[t.name][key] = Source(t.name, False, widened)
            by_content.setdefault(key, Source(t.name, False, widened))
            if values.ndim == 2:
                flipped = np.ascontiguousarray(values.T)
                by_content.setdefault(
                    content_key(dtype, flipped.shape, flipped.tobytes()), Source(t.name, True, widened)
                )
    return by_content, by_name


def _same_named(name: str, key: tuple, by_name: dict) -> Source | None:
    """The HF tensor the initializer is named after (less the wrapper's prefix), when its content is the same:
    preferred over another tensor that happens to hold equal bytes (a norm's ones)."""
    for candidate in (name, name.removeprefix(WRAPPED + ".")):
        found = by_name.get(candidate, {}).get(key)
        if found is not None:
            return found
    return None


def _refuse_prefix_in_use(plan: TensorSource) -> None:
    for t in plan.tensors:
        if t.name.startswith(OWN_PREFIX):
            raise InputError(
                f"tensor {t.name!r} uses the prefix {OWN_PREFIX!r}, which --onnx keeps for the "
                "graph's own constants; convert without --onnx"
            )
