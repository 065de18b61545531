"""Small ONNX text models built with onnx.helper, and a word-level tokenizer.json for them (no torch).

``encoder_model``: input_ids, attention_mask -> token table -> MatMul -> Relu -> MatMul -> ``hidden``
[batch, tokens, HIDDEN] and a pooled ``pooled`` [batch, HIDDEN] (a graph that pools itself, as
exported sentence-transformers models do), the mask read by no node.
``causal_model``: input_ids, attention_mask, position_ids -> token table + position table -> MatMul
-> Relu -> MatMul -> ``logits`` [batch, tokens, vocabulary].  Each token's output depends on that
token (and its position) alone, so ``numpy_hidden`` and ``numpy_logits`` compute them by hand.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from rbe_converters.evaluate import quality

HIDDEN, INNER, POSITIONS = 16, 32, 64


def word_tokenizer(path, words: int = 200) -> tuple[str, int]:
    """A word-level tokenizer.json over the evaluation text's commonest words (id 0 pads, 1 is unknown);
    (its path, the vocabulary size)."""
    import tokenizers

    common = [w for w, _ in Counter(quality.evaluation_text().split()).most_common(words)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *common])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path), len(vocab)


def _model(nodes, inputs, outputs, weights):
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        nodes, "tiny", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ids(name: str):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "tokens"])


def encoder_model(vocab: int, seed: int = 0):
    """(onnx.ModelProto, its weights) of the encoder in the module doc."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weights = {
        "embeddings.word_embeddings.weight": rng.standard_normal((vocab, HIDDEN)).astype(np.float32),
        "w_up": (rng.standard_normal((HIDDEN, INNER)) * 0.3).astype(np.float32),
        "w_down": (rng.standard_normal((INNER, HIDDEN)) * 0.3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["embeddings.word_embeddings.weight", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w_up"], ["up"]),
        helper.make_node("Relu", ["up"], ["act"]),
        helper.make_node("MatMul", ["act", "w_down"], ["hidden"]),
        helper.make_node("ReduceMean", ["hidden"], ["pooled"], axes=[1], keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "tokens", HIDDEN]),
        helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HIDDEN]),
    ]
    return _model(nodes, [_ids("input_ids"), _ids("attention_mask")], outputs, weights), weights


def causal_model(vocab: int, seed: int = 1):
    """(onnx.ModelProto, its weights) of the causal LM in the module doc."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weights = {
        "embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)).astype(np.float32),
        "pos_embeddings.weight": (rng.standard_normal((POSITIONS, HIDDEN)) * 0.1).astype(np.float32),
        "w_up": (rng.standard_normal((HIDDEN, INNER)) * 0.3).astype(np.float32),
        "w_out": (rng.standard_normal((INNER, vocab)) * 0.3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["pos_embeddings.weight", "position_ids"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["h"]),
        helper.make_node("MatMul", ["h", "w_up"], ["up"]),
        helper.make_node("Relu", ["up"], ["act"]),
        helper.make_node("MatMul", ["act", "w_out"], ["logits"]),
    ]
    inputs = [_ids("input_ids"), _ids("attention_mask"), _ids("position_ids")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "tokens", vocab])]
    return _model(nodes, inputs, outputs, weights), weights


def numpy_hidden(weights: dict, ids: np.ndarray) -> np.ndarray:
    h = weights["embeddings.word_embeddings.weight"][ids].astype(np.float64)
    return np.maximum(h @ weights["w_up"], 0) @ weights["w_down"]


def numpy_logits(weights: dict, ids: np.ndarray) -> np.ndarray:
    h = weights["embed_tokens.weight"][ids] + weights["pos_embeddings.weight"][np.arange(len(ids))]
    return np.maximum(h.astype(np.float64) @ weights["w_up"], 0) @ weights["w_out"]
