"""What each tensor of a checkpoint does: its role, its layer, the orientation of its weight.

Recipes choose codecs by role (``role = "attn_v"``) and layer, and encoders
that group along an axis need to know which axis of a weight is its input.
``classify`` works from tensor names, shapes and, where the model directory has
one, ``config.json``; it knows the naming of

* BERT-family encoders (``attention.self.query``, ``intermediate.dense``,
  ``word_embeddings``, ``LayerNorm``; RoBERTa and the like share it),
* Llama-family decoders (``self_attn.q_proj`` ... ``mlp.down_proj``,
  ``embed_tokens``, ``input_layernorm``; also Mistral and Qwen, with biases),
* GPT-2-family decoders, whose Linear layers are transformers' ``Conv1D``:
  weights stored transposed, input x output (``attn.c_attn`` is the fused
  q/k/v projection, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``; ``wte``,
  ``wpe``; ``ln_1``, ``ln_2``, ``ln_f``),

and falls back to shapes for names it does not know: a 2-D tensor with a
dimension of the vocabulary size is a token embedding, any other 2-D tensor a
generic ``linear``, a 1-D tensor a norm or a bias by its name, the rest
``other``.  Integer tensors (position ids) are always ``other``.

>>> roles = classify({"model.layers.3.self_attn.v_proj.weight": ("F32", (192, 576)),
...                   "transformer.h.0.attn.c_attn.weight": ("F32", (64, 192))}, None)
>>> roles["model.layers.3.self_attn.v_proj.weight"]
TensorRole(role='attn_v', layer=3, input_last=True, num_layers=4)
>>> roles["transformer.h.0.attn.c_attn.weight"].input_last
False
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rbeformat.spec import DTYPES

ROLES = (
    "token_embedding",
    "tied_embedding",
    "position_embedding",
    "token_type_embedding",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "attn_qkv",
    "mlp_up",
    "mlp_gate",
    "mlp_down",
    "norm_weight",
    "norm_bias",
    "linear_bias",
    "lm_head",
    "linear",
    "other",
)

# Roles of weights used as y = x W^T (or x W for Conv1D): the ones with an input axis.
LINEAR_ROLES = frozenset(
    {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_up", "mlp_gate", "mlp_down", "lm_head", "linear"}
)
# Which side of these weights has the model's hidden size: it tells the input axis apart
# from the output axis whenever exactly one axis has that size.
_INPUT_IS_HIDDEN = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_up", "mlp_gate", "lm_head"})
_OUTPUT_IS_HIDDEN = frozenset({"attn_o", "mlp_down"})


@dataclass(frozen=True)
class TensorRole:
    """A tensor's role; ``layer`` is its block index (None outside the blocks) of
    ``num_layers`` blocks; ``input_last`` (Linear-like weights only, else None) says
    whether the input axis is the last one (False: stored input x output, as Conv1D)."""

    role: str
    layer: int | None = None
    input_last: bool | None = None
    num_layers: int | None = None


# Module-path suffixes of Linear layers, longest first; "#" stands for a layer index.
# The flag is the storage convention: True for nn.Linear (out x in), False for Conv1D.
_LINEAR_SUFFIXES: list[tuple[tuple[str, ...], str, bool]] = sorted(
    [
        # BERT family
        (("attention", "self", "query"), "attn_q", True),
        (("attention", "self", "key"), "attn_k", True),
        (("attention", "self", "value"), "attn_v", True),
        (("attention", "output", "dense"), "attn_o", True),
        (("#", "intermediate", "dense"), "mlp_up", True),
        (("#", "output", "dense"), "mlp_down", True),
        # Llama family (Mistral, Qwen, ...)
        (("q_proj",), "attn_q", True),
        (("k_proj",), "attn_k", True),
        (("v_proj",), "attn_v", True),
        (("o_proj",), "attn_o", True),
        (("qkv_proj",), "attn_qkv", True),
        (("gate_proj",), "mlp_gate", True),
        (("up_proj",), "mlp_up", True),
        (("down_proj",), "mlp_down", True),
        # GPT-2 family: transformers' Conv1D stores input x output
        (("attn", "c_attn"), "attn_qkv", False),
        (("attn", "c_proj"), "attn_o", False),
        (("mlp", "c_fc"), "mlp_up", False),
        (("mlp", "c_proj"), "mlp_down", False),
    ],
    key=lambda entry: -len(entry[0]),
)

_EMBEDDINGS = {
    "embed_tokens": "token_embedding",
    "word_embeddings": "token_embedding",
    "wte": "token_embedding",
    "tok_embeddings": "token_embedding",
    "position_embeddings": "position_embedding",
    "wpe": "position_embedding",
    "embed_positions": "position_embedding",
    "token_type_embeddings": "token_type_embedding",
}
_LM_HEADS = {"lm_head", "embed_out"}
_LM_HEAD_PARENTS = {"predictions", "lm_head"}  # BERT's cls.predictions.decoder, RoBERTa's lm_head.decoder
_NORM = re.compile(r"norm|^ln(_\w+)?$", re.IGNORECASE)  # LayerNorm, input_layernorm, norm, ln_1, ln_f
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")


def classify(tensors: dict[str, tuple[str, tuple[int, ...]]], config: dict | None) -> dict[str, TensorRole]:
    """The role of every tensor, from ``{name: (dtype, shape)}`` and the model's config.json (or None)."""
    sizes = _sizes(config if isinstance(config, dict) else {})
    layers = {name: layer_index(name) for name in tensors}
    found = [i for i in layers.values() if i is not None]
    num_layers = max(found) + 1 if found else None
    out = {}
    for name, (dtype, shape) in tensors.items():
        role, input_last = _role(name, dtype, tuple(shape), sizes)
        layer = layers[name]
        out[name] = TensorRole(role, layer, input_last, num_layers if layer is not None else None)
    return _mark_tied(out, config if isinstance(config, dict) else {})


def _mark_tied(roles: dict[str, TensorRole], config: dict) -> dict[str, TensorRole]:
    """A causal LM without a stored head whose config ties the head to the embedding: the
    token embedding is then also the output head (``tied_embedding``), where an error
    reaches every logit."""
    causal = any(str(a).endswith(DECODER_ARCHITECTURES) for a in config.get("architectures") or [])
    tied = config.get("tie_word_embeddings", True) is True  # transformers' default is to tie
    embeddings = [name for name, r in roles.items() if r.role == "token_embedding"]
    if not (causal and tied and len(embeddings) == 1) or any(r.role == "lm_head" for r in roles.values()):
        return roles
    name = embeddings[0]
    roles[name] = TensorRole("tied_embedding", roles[name].layer, True, roles[name].num_layers)
    return roles


# Decoders by architecture: a causal LM's head class (``LlamaForCausalLM``, ``GPT2LMHeadModel``).
DECODER_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")
# Encoders by ``model_type``: the BERT family, whose naming this module knows, and the like.
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet", "albert", "deberta", "deberta-v2"}
)


@dataclass(frozen=True)
class ModelFamily:
    """Whether a model is an ``encoder`` (sentence embeddings) or a ``decoder`` (a causal LM), and
    ``name``, the architecture (or ``model_type``) of its config.json that says so."""

    kind: str
    name: str


def model_family(config: dict | None) -> ModelFamily | None:
    """The family config.json declares: a decoder by a causal LM architecture or ``is_decoder``; an
    encoder by a BERT-family ``model_type`` or a masked-LM architecture.  None when it does not say:
    no config, an encoder-decoder model (``is_encoder_decoder``), a model type this module does not know.
    """
    if not isinstance(config, dict) or config.get("is_encoder_decoder") is True:
        return None
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    name = architectures[0] if architectures else model_type
    if any(a.endswith(DECODER_ARCHITECTURES) for a in architectures) or config.get("is_decoder") is True:
        return ModelFamily("decoder", name or "decoder")
    if model_type in ENCODER_MODEL_TYPES or any(a.endswith("ForMaskedLM") for a in architectures):
        return ModelFamily("encoder", name)
    return None


def layer_index(name: str) -> int | None:
    """The block index in a name (``layers.7.``, ``layer.7.``, ``h.7.``), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _sizes(config: dict) -> dict[str, int | None]:
    """The sizes the shapes are compared with, under the names the families use."""

    def first(*keys):
        values = [config.get(k) for k in keys]
        return next((v for v in values if type(v) is int and v > 0), None)

    return {
        "hidden": first("hidden_size", "n_embd", "d_model", "dim"),
        "vocab": first("vocab_size", "n_vocab"),
        "positions": first("max_position_embeddings", "n_positions", "n_ctx"),
    }


def _role(name: str, dtype: str, shape: tuple[int, ...], sizes: dict) -> tuple[str, bool | None]:
    if dtype not in DTYPES or not DTYPES[dtype].is_float:
        return "other", None  # position ids, masks, counters
    path = name.split(".")
    param, modules = path[-1], path[:-1]
    leaf = modules[-1] if modules else ""
    if len(shape) == 2 and param == "weight":
        named = _named_weight(modules, leaf)
        if named is not None:
            role, stored_input_last = named
            if role in LINEAR_ROLES:
                return role, _input_last(role, shape, sizes["hidden"], stored_input_last)
            return role, None
    if len(shape) == 1 and param in ("weight", "bias") and _NORM.search(leaf):
        return ("norm_weight" if param == "weight" else "norm_bias"), None
    if len(shape) == 1 and param == "bias":
        return "linear_bias", None
    return _by_shape(name, shape, sizes)


def _named_weight(modules: list[str], leaf: str) -> tuple[str, bool] | None:
    """(role, stored input-last) of a 2-D weight whose module name is known."""
    for suffix, role, input_last in _LINEAR_SUFFIXES:
        if _ends_with(modules, suffix):
            return role, input_last
    if leaf in _EMBEDDINGS:
        return _EMBEDDINGS[leaf], True
    if leaf in _LM_HEADS or (leaf == "decoder" and len(modules) > 1 and modules[-2] in _LM_HEAD_PARENTS):
        return "lm_head", True
    return None


def _ends_with(modules: list[str], suffix: tuple[str, ...]) -> bool:
    if len(modules) < len(suffix):
        return False
    tail = modules[len(modules) - len(suffix) :]
    return all(part.isdigit() if want == "#" else part == want for part, want in zip(tail, suffix))


def _input_last(role: str, shape: tuple[int, ...], hidden: int | None, convention: bool) -> bool:
    """Whether the input axis is the last one: from the hidden size where exactly one
    axis has it, else the storage convention of the module's naming."""
    rows, cols = shape
    if hidden is None or rows == cols or hidden not in shape:
        return convention
    if role in _INPUT_IS_HIDDEN:
        return cols == hidden
    if role in _OUTPUT_IS_HIDDEN:
        return rows == hidden
    return convention


def _by_shape(name: str, shape: tuple[int, ...], sizes: dict) -> tuple[str, bool | None]:
    """The fallback for names no family uses."""
    lower = name.lower()
    if len(shape) == 2:
        if sizes["vocab"] is not None and sizes["vocab"] in shape:
            if "head" in lower:
                return "lm_head", shape[-1] != sizes["vocab"]
            return "token_embedding", None
        if "pos" in lower and shape[0] == sizes["positions"] and shape[1] == sizes["hidden"]:
            return "position_embedding", None
        return "linear", True  # nn.Linear's out x in is the common layout
    if len(shape) == 1 and _NORM.search(lower):
        return ("norm_bias" if lower.endswith("bias") else "norm_weight"), None
    return "other", None
