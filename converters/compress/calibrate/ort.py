"""Calibration statistics of an ONNX model, from ONNX Runtime runs over the calibration text.

GPTQ (``rbeformat/codecs/encoders/gptq.py``) needs, for each weight W of a MatMul
y = x W (or a Gemm), the second moments H = E[x x^T] of the layer's input x.
An ONNX file carries no tokenizer, so the user names one (``--tokenizer``): the
calibration text's sentences are tokenized with it, as an encoder is used
(``torch.py`` cuts an encoder's text the same way), and run through the model in ONNX Runtime with each
calibrated MatMul's input added to the graph's outputs.  H is accumulated in
float64 over every token; layers that read one input (q, k, v) share one H.

The model's other inputs get the values a plain sentence has: an attention mask
of ones, token types of zero, positions 0, 1, ....  Graphs that want anything
else (a KV cache) are refused: calibrate them from their Hugging Face checkpoint.
"""

from __future__ import annotations

import contextlib

import numpy as np

from rbeformat import InputError, UsageError, extras
from rbeformat.codecs.core.tensor import Calibration
from rbeformat.onnx_safety import check_model

from .torch import CalibrationText, batches_of

# What each graph input is fed for a batch of token ids (batch x length).
_FEEDS = {
    "input_ids": lambda ids: ids,
    "attention_mask": lambda ids: np.ones_like(ids),
    "token_type_ids": lambda ids: np.zeros_like(ids),
    "position_ids": lambda ids: np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
}


def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json, or a folder holding one (checked as
    ``sources.onnx.read_tokenizer_file`` checks what it embeds)."""
    extras.ORT_CALIBRATION.require()
    from ...sources.onnx import read_tokenizer_file

    return tokenizer_from_json(read_tokenizer_file(path), path)


def tokenizer_from_json(data: bytes, where: str):
    """A ``tokenizers.Tokenizer`` from the bytes of a tokenizer.json; InputError naming ``where`` when the
    tokenizers package cannot build one."""
    extras.ORT_CALIBRATION.require()
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the library raises its own exception types for unreadable files
        raise InputError(f"{where}: not a tokenizer.json the tokenizers package reads ({str(exc)[:160]})") from None


def collect(
    model,
    methods: dict[str, str],
    text: CalibrationText,
    tokenizer,
    threads: int | None = None,
    source: str = "the ONNX model",
    stage=None,
) -> dict[str, Calibration]:
    """{initializer name: Calibration(method, H)} for the MatMul / Gemm weights named in ``methods``.

    ``model`` is the onnx.ModelProto with its initializers filled in; ``source`` names it in errors.
    The session runs as a container's does (``rbe_loaders.ort.guard``): no external data, its
    errors as InputError, a stop signal ends a run.  ``stage(total)`` (a context manager with
    ``update(n)``, as ``pipeline.Reporter.stage`` gives) shows the sentences run.
    """
    (ort, _) = extras.ORT_CALIBRATION.require()
    from onnx import TensorProto, helper

    from rbe_loaders.ort import guard as ort_guard

    check_model(model, source)  # convert checked the file; its data is inline now
    inputs = _layer_inputs(model.graph, methods)
    graph_inputs = _check_inputs(model.graph)
    extended = type(model)()
    extended.CopyFrom(model)
    known = {o.name for o in extended.graph.output}
    for name in sorted(set(inputs.values()) - known):
        extended.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    data = extended.SerializeToString()
    with ort_guard.session_options(options, quiet=True) as options:
        session = ort_guard.call(
            lambda: ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]),
            path=source,
            doing="building a session on the model for calibration",
        )
    wanted = sorted(set(inputs.values()))
    sums: dict[str, np.ndarray] = {}
    count = 0
    sentences = sentence_ids(tokenizer, text)
    with stage(len(sentences)) if stage else contextlib.nullcontext() as bar:
        for batch in batches_of(sentences):
            ids = np.array(batch, dtype=np.int64)
            feeds = {name: _FEEDS[name](ids).astype(dtype) for name, dtype in graph_inputs.items()}
            for name, x in zip(wanted, ort_guard.run(session, wanted, feeds, path=source, doing="calibrating")):
                x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
                sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            count += ids.size
            if bar is not None:
                bar.update(len(batch))
    if not count:
        raise UsageError(f"calibration text ({text.source}) holds no sentence to run")
    return {weight: Calibration(method, sums[inputs[weight]] / count) for weight, method in methods.items()}


def _layer_inputs(graph, methods: dict[str, str]) -> dict[str, str]:
    """{weight: the name of the activation its MatMul / Gemm multiplies}."""
    found = {}
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in methods:
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            if node.op_type == "Gemm" and trans_a:
                raise UsageError(f"calibration: {node.input[1]} feeds a Gemm with transA = 1, which it cannot measure")
            found.setdefault(node.input[1], node.input[0])
    missing = sorted(set(methods) - set(found))
    if missing:
        raise UsageError(f"calibration applies to MatMul and Gemm weights only; not one: {', '.join(missing[:3])}")
    return found


def _check_inputs(graph) -> dict[str, type]:
    """{graph input: its integer dtype}; refuses inputs a sentence does not give."""
    from onnx import TensorProto

    initializers = {t.name for t in graph.initializer}
    out = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        if value.name not in _FEEDS:
            raise UsageError(
                f"calibration feeds sentences (input_ids, attention_mask, token_type_ids, "
                f"position_ids); this graph also wants {value.name!r}"
            )
        elem = value.type.tensor_type.elem_type
        out[value.name] = np.int32 if elem == TensorProto.INT32 else np.int64
    if "input_ids" not in out:
        raise UsageError("calibration feeds token ids: this graph has no input named input_ids")
    return out


def sentence_ids(tokenizer, text: CalibrationText) -> list[list[int]]:
    """The text's sentences as token ids with the tokenizer's special tokens, until they hold as
    many tokens as ``text.windows`` windows would (as ``torch.py`` does for encoders)."""
    from ...evaluate.quality import sentences_of

    budget, out = text.windows * text.window, []
    for sentence in sentences_of(text.text):
        ids = tokenizer.encode(sentence).ids[: text.window]
        out.append(ids)
        budget -= len(ids)
        if budget <= 0:
            break
    return out
