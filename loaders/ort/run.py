"""Run a model in ONNX Runtime, without torch: a Hugging Face model converted with ``rbe convert DIR OUT.rbe
--onnx``, or an encoder converted from an .onnx file with ``--tokenizer``.

>>> from rbe_loaders.ort import run                               # doctest: +SKIP
>>> run.embed("minilm.rbe", ["A sentence.", "Another one."])      # (2, 384) mean-pooled vectors
>>> run.embed("minilm.rbe", "A sentence.")                        # (384,): one text, one vector
>>> run.generate("smollm2.rbe", "The capital of France is", 8)    # the greedy continuation
>>> model = run.open_model("smollm2.rbe")                          # one session for several calls
>>> logprobs = run.token_logprobs(model.session, ids)             # perplexity: exp(-logprobs.mean())

The session is ``rbe_loaders.ort.session``'s: quantized weights stay compressed.
Every call into ONNX Runtime and tokenizers runs through ``guard.call``: a
stop signal ends it (``RunOptions.terminate`` stops even an endless ``Loop``),
``timeout`` (seconds, or one ``guard.Deadline`` shared by several calls;
None: no limit) bounds the build and the runs together, and the runtime's
errors come as InputError naming the container.
Texts are ``str``: ``embed`` takes one (one vector back) or a list or tuple
of them (one row each), as sentence-transformers' ``encode`` does; ``generate``
one prompt; ids are ints.  Anything else (bytes, a list holding a non-string)
is a ``UsageTypeError`` (a ``TypeError``), never a text read character by
character.
``embed`` mean-pools ``last_hidden_state`` over the attention mask, as
sentence-transformers' mean pooling does; the vectors are not L2-normalised
(models whose pipeline normalises, such as all-MiniLM-L6-v2, need
``v / np.linalg.norm(v, axis=1, keepdims=True)`` on top).  ``generate`` is
greedy, carries the KV cache from step to step and stops at the end-of-sequence
token(s) of the container's generation_config.json or config.json.
A container converted from a bare .onnx file has no config.json: with the
tokenizer.json that ``--tokenizer`` embeds, it runs as an encoder, its hidden
states ``last_hidden_state`` or else its one float output of rank 3 (as
``rbe eval`` reads such a graph); a graph with ``logits`` needs the config that
names its end tokens.

Imports numpy, onnx, onnxruntime, tokenizers and rbe's own packages only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from rbeformat import FormatError, Reader, UsageError, UsageTypeError
from rbeformat.embedded.config import is_causal_lm
from rbeformat.embedded.onnx import carries_onnx
from rbeformat.extras import ORT_RUN

from .. import TOKENIZER_FILE
from .. import tokenizer as container_tokenizer
from . import guard

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CONVERT_HINT = "convert the model's directory with rbe convert DIR OUT.rbe --onnx"
HIDDEN_STATES = "last_hidden_state"  # an encoder's output [batch, tokens, hidden], as transformers names it
PAST_PREFIX = "past."  # the causal graph's cache inputs: past.{i}.key, past.{i}.value


@dataclass
class LoadedModel:
    """One ONNX Runtime session on a container, with its tokenizer and config, for any number of calls."""

    path: str
    session: object  # onnxruntime.InferenceSession
    tokenizer: object  # tokenizers.Tokenizer
    config: dict
    eos_ids: frozenset[int]
    hidden_states: str = HIDDEN_STATES  # an encoder's output that embed pools

    @property
    def causal(self) -> bool:
        return is_causal_lm(self.config)


# -- opening a container ----------------------------------------------------------------


def open_model(path: str | os.PathLike, threads: int | None = None, timeout=None) -> LoadedModel:
    """The session, tokenizer, config and end tokens of a container converted with ``--onnx`` (or of an
    encoder converted from an .onnx file with ``--tokenizer``: no config.json).

    UsageError for a container without a graph or tokenizer.json; ``timeout``: seconds
    (or a ``guard.Deadline``) the session's build may take.  MissingExtraError (the ``ort`` extra) when
    onnx, onnxruntime or tokenizers is not installed, before the container is read.
    """
    ORT_RUN.require()  # all three at once: one message, one extra to install
    path = os.fspath(path)
    config, generation = _read_configs(path)  # config None: converted from a bare .onnx file
    from .build import session  # after the checks: building a session is the slow part

    deadline = guard.Deadline.of(timeout)
    sess, _ = session(path, quiet=True, timeout=deadline, sess_options=_session_options(threads))
    tokenizer = guard.call(
        lambda: container_tokenizer(path),
        path=path,
        doing="reading the embedded tokenizer",
        deadline=deadline,
        source="tokenizers",
    )
    if config is None:
        return LoadedModel(path, sess, tokenizer, {}, frozenset(), bare_encoder_output(sess, path))
    return LoadedModel(path, sess, tokenizer, config, eos_token_ids(config, generation))


def _read_configs(path: str) -> tuple[dict | None, dict]:
    """config.json (None when absent) and generation_config.json ({} when absent) of a container that
    carries a graph; UsageError when it carries neither config.json nor tokenizer.json."""
    with Reader(path) as r:
        if not carries_onnx(r):
            raise UsageError(f"{path}: holds no ONNX graph to run; {CONVERT_HINT}")
        files = r.files()
        if CONFIG_FILE not in files:
            if TOKENIZER_FILE not in files:
                raise UsageError(
                    f"{path}: holds no {TOKENIZER_FILE} to turn a text into token ids (it was converted from an "
                    ".onnx file without --tokenizer): convert the .onnx file again with --tokenizer "
                    f"TOKENIZER.json, or feed the graph yourself through rbe_loaders.ort.session({path!r})"
                )
            return None, {}
        config = _json_object(path, CONFIG_FILE, r.read_file(CONFIG_FILE))
        generation = {}
        if GENERATION_CONFIG_FILE in files:
            generation = _json_object(path, GENERATION_CONFIG_FILE, r.read_file(GENERATION_CONFIG_FILE))
    return config, generation


def bare_encoder_output(session, path: str) -> str:
    """The output holding the hidden states of a graph converted from a bare .onnx file:
    ``last_hidden_state``, else its one float output of rank 3; UsageError for a causal LM's graph (its
    end tokens are in a config it lacks) or one whose hidden states are not clear."""
    outputs = session.get_outputs()
    names = [arg.name for arg in outputs]
    if "logits" in names:
        raise UsageError(
            f"{path}: its graph gives logits, a causal LM's, and it holds no {CONFIG_FILE} naming the end "
            f"tokens to generate with; {CONVERT_HINT}"
        )
    if HIDDEN_STATES in names:
        return HIDDEN_STATES
    candidates = [arg.name for arg in outputs if arg.type == "tensor(float)" and len(arg.shape or ()) == 3]
    if len(candidates) != 1:
        raise UsageError(
            f"{path}: its graph has no {HIDDEN_STATES} output and {len(candidates)} float outputs of rank 3 "
            f"(of {', '.join(names)}), so which holds the hidden states is not clear: feed it yourself through "
            f"rbe_loaders.ort.session({path!r})"
        )
    return candidates[0]


def _json_object(path: str, name: str, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: the embedded {name} is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: the embedded {name} is not a JSON object")
    return value


def _session_options(threads: int | None):
    """Options without ONNX Runtime's own log lines: its errors come back as one-line InputErrors."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = guard.QUIET
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def eos_token_ids(config: dict, generation: dict) -> frozenset[int]:
    """The end-of-sequence ids: generation_config.json's when it names any (as transformers reads them), else
    config.json's (or its text_config's); an int or a list of ints each."""
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for source in (generation, config, text_config):
        value = source.get("eos_token_id")
        ids = [value] if isinstance(value, int) else value if isinstance(value, list) else []
        ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
        if ids:
            return frozenset(ids)
    return frozenset()


def _loaded(model: str | os.PathLike | LoadedModel, causal: bool, deadline=None) -> LoadedModel:
    """A path opened, or a LoadedModel as is; UsageError when the model is not of the kind asked for."""
    loaded = model if isinstance(model, LoadedModel) else open_model(model, timeout=deadline)
    if loaded.causal != causal:
        kind = "a causal LM (use generate)" if loaded.causal else "an encoder (use embed)"
        raise UsageError(f"{loaded.path}: is {kind}")
    return loaded


# -- encoders ---------------------------------------------------------------------------


def embed(model: str | os.PathLike | LoadedModel, texts: str | list[str] | tuple[str, ...], timeout=None) -> np.ndarray:
    """The mean-pooled hidden states (float32, not normalised, padded tokens left out): for one
    text a vector [hidden], for a list or tuple of texts one row per text [n, hidden]."""
    batch = text_batch(texts, "embed")  # checked before a session is built
    deadline = guard.Deadline.of(timeout)
    loaded = _loaded(model, causal=False, deadline=deadline)
    feed = encoder_feed(loaded, batch, deadline)
    (hidden,) = run_graph(loaded, [loaded.hidden_states], feed, deadline)
    if not _is_array(hidden, 3) or hidden.shape[:2] != feed["attention_mask"].shape:
        raise FormatError(
            f"{loaded.path}: the graph's {loaded.hidden_states} is {_form(hidden)}, not float "
            f"[batch, tokens, hidden] for inputs of {list(feed['attention_mask'].shape)}"
        )
    pooled = mean_pool(hidden, feed["attention_mask"])
    return pooled[0] if isinstance(texts, str) else pooled


def text_batch(texts, doing: str) -> list[str]:
    """``texts`` as a list of strings: one ``str``, or a non-empty list or tuple of them.

    UsageTypeError for anything else, so that a string is never taken for a sequence of one-character
    texts and bytes never for a sequence of numbers; UsageError for an empty list.
    """
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise UsageTypeError(f"{doing} takes a str or a list of str, not {_type_hint(texts)}")
    if not texts:
        raise UsageError(f"{doing} needs at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageTypeError(f"{doing}: text {i} of the list is {_type_hint(text)}, not a str")
    return list(texts)


def prompt_text(prompt, doing: str) -> str:
    """``prompt`` checked to be one ``str`` (UsageTypeError otherwise)."""
    if not isinstance(prompt, str):
        more = "; call it once per prompt" if isinstance(prompt, (list, tuple)) else ""
        raise UsageTypeError(f"{doing} takes one prompt, a str, not {_type_hint(prompt)}{more}")
    return prompt


def token_ids(ids, doing: str) -> list[int]:
    """``ids`` as a list of Python ints: a list, tuple or 1-D integer array of token ids (UsageTypeError
    otherwise: a text must be tokenized first)."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise UsageTypeError(f"{doing} takes token ids, a 1-D integer array, not {ids.dtype} {list(ids.shape)}")
        return [int(i) for i in ids]
    if not isinstance(ids, (list, tuple)):
        hint = " (tokenize it first: model.tokenizer.encode(text).ids)" if isinstance(ids, str) else ""
        raise UsageTypeError(f"{doing} takes token ids, a list of int, not {_type_hint(ids)}{hint}")
    for i, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageTypeError(f"{doing}: token id {i} is {_type_hint(value)}, not an int")
    return [int(i) for i in ids]


def _type_hint(value) -> str:
    """What a wrong argument is, for a message: its type, and for bytes how to make a str of them."""
    if isinstance(value, (bytes, bytearray)):
        return f"{type(value).__name__} (decode it first: data.decode('utf-8'))"
    return type(value).__name__


def _is_array(value, ndim: int) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == ndim and value.dtype.kind == "f"


def _form(value) -> str:
    return f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__


def run_graph(loaded: LoadedModel, outputs, feed: dict, deadline=None) -> list:
    """``loaded.session.run(outputs, feed)``: stoppable, time-limited, its errors as InputError (``guard``)."""
    return guard.run(loaded.session, outputs, feed, path=loaded.path, deadline=guard.Deadline.of(deadline))


def tokenizing(loaded: LoadedModel, fn, deadline=None, doing: str = "tokenizing the text"):
    """``fn()``, a call into the container's tokenizer, as ``guard.call`` runs it."""
    return guard.call(fn, path=loaded.path, doing=doing, deadline=guard.Deadline.of(deadline), source="tokenizers")


def decode_ids(loaded: LoadedModel, ids: list[int], timeout=None) -> str:
    """The text of token ids, special tokens left out, by the container's tokenizer."""
    ids = token_ids(ids, "decode_ids")
    return tokenizing(loaded, lambda: loaded.tokenizer.decode(ids), timeout, "decoding token ids")


def encoder_feed(loaded: LoadedModel, texts: list[str], deadline=None) -> dict[str, np.ndarray]:
    """The graph's inputs for a batch of texts, padded to the longest and cut at the model's position limit."""
    texts = text_batch(texts, "encoder_feed")
    tok = loaded.tokenizer

    def encode():
        if tok.padding is None:
            tok.enable_padding(pad_id=_pad_id(loaded))
        limit = loaded.config.get("max_position_embeddings")
        if tok.truncation is None and isinstance(limit, int):
            tok.enable_truncation(limit)  # beyond it the position table has no row
        return tok.encode_batch(texts)

    encodings = tokenizing(loaded, encode, deadline)
    feed = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
    }
    if "token_type_ids" in {i.name for i in loaded.session.get_inputs()}:
        feed["token_type_ids"] = np.array([e.type_ids for e in encodings], np.int64)
    return feed


def _pad_id(loaded: LoadedModel) -> int:
    pad = loaded.config.get("pad_token_id")
    return pad if isinstance(pad, int) else 0  # masked out either way; any id in range does


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling: the sum over unmasked tokens over their count (at least 1e-9)."""
    weights = mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


# -- causal LMs -------------------------------------------------------------------------


def empty_past(session) -> dict[str, np.ndarray]:
    """A zero-length KV cache for each ``past.*`` input, its head count and size read from the graph."""
    past = {}
    for arg in session.get_inputs():
        if arg.name.startswith(PAST_PREFIX):
            shape = list(arg.shape)
            heads, head_dim = (shape[1], shape[3]) if len(shape) == 4 else (None, None)
            if not (isinstance(heads, int) and isinstance(head_dim, int) and heads >= 0 and head_dim >= 0):
                raise FormatError(
                    f"the graph's {arg.name} is {shape}, not [batch, heads, past, head size] with "
                    "fixed heads and head size"
                )
            past[arg.name] = np.zeros((1, heads, 0, head_dim), np.float32)
    return past


def _session_of(model) -> tuple[object, str]:
    """(session, name for messages) of an InferenceSession or a LoadedModel."""
    if isinstance(model, LoadedModel):
        return model.session, model.path
    return model, "the graph"


def _step(session, ids: list[int], done: int, past: dict[str, np.ndarray], path: str = "the graph", deadline=None):
    """Runs ``ids`` after ``done`` cached positions; the logits [len(ids), vocab] and the grown cache."""
    feed = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, done + len(ids)), np.int64),
        "position_ids": np.arange(done, done + len(ids), dtype=np.int64)[None],
        **past,
    }
    outputs = guard.run(session, None, feed, path=path, deadline=deadline)
    logits, present = (outputs[0], outputs[1:]) if outputs else (np.zeros(0), [])
    if not _is_array(logits, 3) or logits.shape[:2] != (1, len(ids)) or logits.shape[2] < 1:
        raise FormatError(
            f"{path}: the graph's first output is {_form(logits)}, not float logits [1, {len(ids)}, vocabulary]"
        )
    return logits[0], dict(zip(past, present))  # present.{i}.* come in the order of past.{i}.*


def greedy_ids(session, prompt_ids: list[int], max_new_tokens: int, eos_ids=frozenset(), timeout=None) -> list[int]:
    """The greedy continuation's ids, the cache carried between steps; ends with an end token when one came
    (as transformers' generate does).  ``session``: an InferenceSession or a LoadedModel."""
    prompt_ids = token_ids(prompt_ids, "greedy_ids")
    if not prompt_ids:
        raise UsageError("generation needs a prompt of at least one token")
    session, path = _session_of(session)
    deadline = guard.Deadline.of(timeout)
    past, done, step_ids, tokens = empty_past(session), 0, list(prompt_ids), []
    for _ in range(max_new_tokens):
        logits, past = _step(session, step_ids, done, past, path, deadline)
        done += len(step_ids)
        tokens.append(int(logits[-1].argmax()))
        if tokens[-1] in eos_ids:
            break
        step_ids = [tokens[-1]]
    return tokens


def generate_ids(
    model: str | os.PathLike | LoadedModel, prompt: str, max_new_tokens: int = 32, timeout=None
) -> list[int]:
    """The ids of the greedy continuation of ``prompt`` (one str), as ``generate`` decodes them."""
    prompt = prompt_text(prompt, "generate")
    deadline = guard.Deadline.of(timeout)
    loaded = _loaded(model, causal=True, deadline=deadline)
    prompt_ids = tokenizing(loaded, lambda: loaded.tokenizer.encode(prompt).ids, deadline)
    return greedy_ids(loaded, prompt_ids, max_new_tokens, loaded.eos_ids, deadline)


def generate(model: str | os.PathLike | LoadedModel, prompt: str, max_new_tokens: int = 32, timeout=None) -> str:
    """The greedy continuation of ``prompt`` (one str; without it), special tokens left out."""
    prompt = prompt_text(prompt, "generate")
    deadline = guard.Deadline.of(timeout)
    loaded = _loaded(model, causal=True, deadline=deadline)
    return decode_ids(loaded, generate_ids(loaded, prompt, max_new_tokens, deadline), deadline)


def token_logprobs(session, ids: list[int], timeout=None) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1, one window run at once with an empty cache.

    ``session``: an InferenceSession or a LoadedModel.  A perplexity over the window is
    ``exp(-token_logprobs(session, ids).mean())``.  ``ids``: token ids (a list of int or a 1-D integer
    array), not a text.
    """
    ids = token_ids(ids, "token_logprobs")
    if len(ids) < 2:
        raise UsageError("token log-probabilities need a window of at least 2 tokens")
    session, path = _session_of(session)
    logits, _ = _step(session, list(ids), 0, empty_past(session), path, guard.Deadline.of(timeout))
    logits = logits[:-1].astype(np.float64)  # the last position predicts past the window
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return log_softmax[np.arange(len(ids) - 1), np.asarray(ids[1:])]
