"""Measurement protocols shared by ``rbe eval``, the benches and the tests.

Texts.  Both come from CPython's ``pydoc_data.topics`` (the help texts of the
language reference, shipped with every Python), every topic sorted by key and
joined by blank lines (``topic_text``).  That text is cut once, at the first
paragraph boundary ("\\n\\n") at or after its middle character:
``calibration_text()`` is everything before the cut, ``evaluation_text()``
everything after it.  They are disjoint by construction and, with the blank
line between them, make up the whole text.  An encoder that calibrates reads
only the first part; ``rbe eval`` measures on the second by default, so what it
reports is generalization, not fit.  The topics change between Python versions,
so every report names the text by the sha256 of its UTF-8 bytes.

Perplexity (causal language models).  The text is tokenized once, without
special tokens, and cut into ``count`` consecutive windows of ``window``
tokens from its first token: stride = window, no overlap.  Each window is
scored on its own with labels = input_ids (the model predicts tokens 2..window
from those before), and the perplexity is exp of the mean loss over the
windows (all of equal length, so it is the mean over tokens too).

Sentence embeddings (encoders).  A sentence's embedding is the mean of the
model's ``last_hidden_state`` over its tokens, weighted by the attention mask.
sentence-transformers models may end in a Normalize module; it is not applied,
because both figures below depend only on directions: the mean cosine between
the original's and the compressed model's embedding of each sentence, and the
nearest-neighbour agreement, the share of sentences whose nearest other
sentence (by cosine) is the same under both models.  Both are computed in
float64 with numpy, from embeddings of either runtime (transformers or ONNX
Runtime), so equal embeddings give exactly 1.0.  The default sentences
(``default_sentences``) come from ``evaluation_text()``: its prose paragraphs
(headings and their underlines left out) with lines joined, split after ".",
"?" or "!" before a capital or a quote, each kept once if it has 5-40 words
and ends in such a mark; of those, every k-th from the first, k chosen so that
256 sentences spread over the whole part.

torch and transformers (the ``hf`` extra) are imported only by the functions
that need them; the figures need numpy alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re

import numpy as np

from rbeformat import InputError, extras

DEFAULT_WINDOW = 512
DEFAULT_WINDOWS = 16
DEFAULT_SENTENCES = 256
SENTENCE_WORDS = (5, 40)
EMBEDDING_BATCH = 32
PARAGRAPH = "\n\n"
COSINE_EPS = 1e-12  # a zero row has cosine 0 with anything, not NaN


# -- optional dependencies ----------------------------------------------------------


def require_torch():
    """torch and transformers, or one error that names the extra that installs them."""
    torch, transformers = extras.TORCH_EVAL.require()
    return torch, transformers


# -- texts --------------------------------------------------------------------------


@functools.cache
def topic_text() -> str:
    """Every topic of ``pydoc_data.topics``, sorted by key, joined by blank lines."""
    import pydoc_data.topics

    return PARAGRAPH.join(text for _, text in sorted(pydoc_data.topics.topics.items()))


def _cut(text: str) -> int:
    """Where the calibration part ends: the first paragraph boundary from the middle on."""
    return text.index(PARAGRAPH, len(text) // 2)


def calibration_text() -> str:
    """The first part of the topic text: what calibration-aware encoders may read."""
    text = topic_text()
    return text[: _cut(text)]


def evaluation_text() -> str:
    """The second part of the topic text, disjoint from ``calibration_text()``."""
    text = topic_text()
    return text[_cut(text) + len(PARAGRAPH) :]


def fingerprint(text: str) -> str:
    """A short sha256 of a text, to tell which text a number was measured on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def read_text(path: str, what: str) -> str:
    """A user's UTF-8 text file, or one error naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a {what} file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); the {what} file must be UTF-8") from None


# -- perplexity ---------------------------------------------------------------------


def token_ids(tokenizer, text: str | None = None) -> list[int]:
    """A text (by default the evaluation text) as the model's tokens, no special tokens added."""
    return tokenizer(evaluation_text() if text is None else text, add_special_tokens=False)["input_ids"]


def windows(ids: list[int], window: int, count: int, start: int = 0) -> list[list[int]]:
    """``count`` consecutive windows of ``window`` tokens from token ``start``."""
    if window < 2 or count < 1 or start < 0 or start + window * count > len(ids):
        raise ValueError(f"{count} windows of {window} tokens from {start} need more than {len(ids)} tokens")
    return [ids[start + k * window : start + (k + 1) * window] for k in range(count)]


def perplexity(model, parts: list[list[int]], advance=None) -> float:
    """exp of the mean next-token loss of ``model`` over the windows ``parts``; ``advance(1)`` after each."""
    import torch

    losses = []
    with torch.no_grad():
        for part in parts:
            ids = torch.tensor([part], dtype=torch.long)
            losses.append(float(model(input_ids=ids, labels=ids).loss))
            if advance is not None:
                advance(1)
    return math.exp(sum(losses) / len(losses))


# -- sentences ----------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'‘“])")
_UNDERLINE = set("*=-~^#")


def sentences_of(text: str) -> list[str]:
    """The distinct prose sentences of 5-40 words in a text, in order (see the module doc)."""
    found, seen = [], set()
    low, high = SENTENCE_WORDS
    for paragraph in text.split(PARAGRAPH):
        lines = [line.strip() for line in paragraph.splitlines()]
        if any(line and set(line) <= _UNDERLINE for line in lines):  # a heading
            continue
        for sentence in _SENTENCE_END.split(" ".join(" ".join(lines).split())):
            if low <= len(sentence.split()) <= high and sentence[-1] in ".!?" and sentence not in seen:
                seen.add(sentence)
                found.append(sentence)
    return found


def default_sentences(count: int = DEFAULT_SENTENCES) -> list[str]:
    """``count`` sentences spread evenly over the evaluation text: every k-th from the first."""
    found = sentences_of(evaluation_text())
    step = max(1, len(found) // count)
    return found[::step][:count]


def read_sentences(path: str) -> list[str]:
    """A sentence file: one sentence per line; blank lines are skipped."""
    sentences = [line.strip() for line in read_text(path, "sentences").splitlines() if line.strip()]
    if len(sentences) < 2:
        raise InputError(
            f"{path}: holds {len(sentences)} sentence(s); nearest-neighbour agreement needs at least 2, one per line"
        )
    return sentences


def sentence_embeddings(model, tokenizer, sentences: list[str], batch: int = EMBEDDING_BATCH, advance=None):
    """Attention-mask weighted means of ``last_hidden_state``, one row per sentence (float32);
    ``advance(n)`` hears of each batch of ``n`` sentences done."""
    import torch

    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512) or 512)
    rows = []
    with torch.no_grad():
        for first in range(0, len(sentences), batch):
            part = sentences[first : first + batch]
            encoded = tokenizer(part, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
            if advance is not None:
                advance(len(part))
    return torch.cat(rows).float()


def _rows(embeddings) -> np.ndarray:
    """Embeddings (a numpy array or a torch tensor, one row each) as float64."""
    return np.asarray(embeddings, dtype=np.float64)


def mean_cosine(a, b) -> float:
    """Mean cosine between row i of ``a`` and row i of ``b``, in float64.

    dot / sqrt(|a|^2 |b|^2): for equal rows the square root of the rounded square gives the dot
    product back exactly, so equal embeddings score exactly 1.0.
    """
    a, b = _rows(a), _rows(b)
    dots = (a * b).sum(axis=1)
    norms = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return float(np.mean(dots / np.maximum(norms, COSINE_EPS)))


def nearest_neighbours(embeddings) -> list[int]:
    """For each row, the index of the most similar other row by cosine."""
    rows = _rows(embeddings)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), COSINE_EPS)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -math.inf)  # a sentence is not its own neighbour
    return similarity.argmax(axis=1).tolist()


def neighbour_agreement(a, b) -> float:
    """The share of rows whose nearest other row is the same in ``a`` and in ``b``."""
    same = sum(x == y for x, y in zip(nearest_neighbours(a), nearest_neighbours(b)))
    return same / len(a)


# -- models -------------------------------------------------------------------------


def read_config(model_dir: str) -> dict:
    """A model directory's config.json, or one error naming it."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{model_dir}: no config.json; a model needs its Hugging Face config to be loaded") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object")
    return config


def load_model(model_dir: str, causal: bool, source: str | None = None):
    """The model of a HF directory in float32 on the CPU, in eval mode.

    Only as ``rbeformat.embedded.hf_guard`` allows: its config.json checked against
    its safetensors weights and the model's memory against the limit first, no
    code from the directory, never a pickle; errors name ``source`` (default:
    the directory).
    """
    torch, transformers = require_torch()
    from .. import hf_folder

    source = source or model_dir
    hf_folder.check_folder(model_dir, source)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return hf_folder.load_pretrained(auto, model_dir, source, dtype=torch.float32).eval()


def load_tokenizer(model_dir: str, source: str | None = None):
    """The tokenizer of a HF directory (no code from it), or one error naming ``source`` (default: the
    directory)."""
    require_torch()
    from rbeformat.embedded import hf_guard

    return hf_guard.load_tokenizer(model_dir, source or model_dir)
