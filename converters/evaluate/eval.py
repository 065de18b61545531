"""``rbe eval``: what compressed files cost in model quality, beside what they save.

The original (a Hugging Face model directory, a .safetensors file inside one,
or an .rbe file) and every compressed .rbe file are loaded one at a time with
transformers, in float32 on the CPU, scored by the protocols of
``rbe_converters.evaluate.quality`` and freed again, so memory holds one model at a time.
transformers reads only a temporary folder holding what it needs (config and
tokenizer files, safetensors weights: an .rbe file's decoded there, a
directory's linked), never code or pickles, after its config.json passed the
checks of ``rbeformat.embedded.hf_guard``; nothing from the files runs.  Causal LMs
(``architectures`` ending in ``ForCausalLM``) are scored by perplexity, every
other model by its mean-pooled sentence embeddings.  All models use the
original's tokenizer; a container without config or tokenizer files (one made
from a lone .safetensors file) borrows the original's.

An ONNX original (an .onnx file, or an .rbe converted from one: a stored graph
and no config.json) and its compressed files run in ONNX Runtime instead
(``ort_eval``), by the same protocols.

Progress goes to stderr (``rbe_converters.progress``: a bar on a terminal, a line
at most every 10 s in a log, none with ``EvalOptions.quiet``), one stage per
file ("eval: scoring q4.rbe"); the results are returned, for stdout.

Each row puts a file's size and ratio beside its bits per weight and the
quality it measured, so no size is ever read without its cost:

* size: bytes on disk (decimal MB); for a directory or .safetensors original,
  the bytes of its safetensors files; for an .onnx original, the file and its
  external data;
* ratio: the original's safetensors bytes (an ONNX original's: ``ort_eval``) /
  this file's size (an .rbe file counts everything it holds: tensors, config
  and tokenizer files, manifest);
* bits/w: 8 x file size / weights, the weights of every tensor the model has;
* Linear bits/w: the stored bits of the Linear weights / their count, where
  the Linear weights are the 2-D tensors whose role (``rbe_converters.compress.roles``,
  from the original's names, shapes and config) is a projection: attention
  q / k / v / o, MLP up / gate / down, or another linear layer, never an
  embedding or the output head; for an .rbe file the bytes are those of the
  tensors' stored sections, as ``rbe info`` counts them.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from rbeformat import InputError, Reader, UsageError, extras
from rbeformat.embedded import hf_guard
from rbeformat.embedded.config import is_causal_lm

from .. import hf_folder
from . import quality
from .plot import check_plot_target, write_plot  # noqa: F401  (--plot's, importable from here as before)
from .report import human_bytes, tensor_rows, totals


@dataclass
class EvalOptions:
    """What the user asked for; None means the protocol's default."""

    text: str | None = None
    sentences: str | None = None
    window: int | None = None
    windows: int | None = None
    threads: int | None = None
    tokenizer: str | None = None  # ONNX models: a tokenizer.json, or a folder holding one
    quiet: bool = False  # no progress on stderr
    started: float | None = None  # when the command began (time.monotonic): a log's first line is due from it


# -- sizes ------------------------------------------------------------------------------


@dataclass
class Sizes:
    """What a file costs: its bytes, and each tensor's dtype, shape and stored bytes."""

    file_bytes: int
    tensors: dict  # name -> (dtype name, shape, stored bytes)

    @property
    def shapes(self) -> dict:
        return {name: shape for name, (_, shape, _) in self.tensors.items()}

    def row(self, reference_bytes: int, linear: set) -> dict:
        weights = sum(math.prod(shape) for _, shape, _ in self.tensors.values())
        linear_weights = sum(math.prod(self.tensors[name][1]) for name in linear)
        linear_bytes = sum(self.tensors[name][2] for name in linear)
        return {
            "file_bytes": self.file_bytes,
            "ratio": reference_bytes / self.file_bytes if self.file_bytes else None,
            "bits_per_weight": 8 * self.file_bytes / weights if weights else None,
            "linear_bits_per_weight": 8 * linear_bytes / linear_weights if linear_weights else None,
            "weights": weights,
            "linear_weights": linear_weights,
        }


def linear_weights(sizes: Sizes, config: dict) -> set:
    """The Linear layers' weights by tensor role: 2-D, neither embeddings nor the output head."""
    from ..compress.roles import classify

    return linear_by_role(
        classify({name: (dtype, shape) for name, (dtype, shape, _) in sizes.tensors.items()}, config), sizes
    )


def linear_by_role(roles: dict, sizes: Sizes) -> set:
    """The 2-D tensors of ``sizes`` whose role (``roles.TensorRole``) is a projection, not the output head."""
    from ..compress.roles import LINEAR_ROLES

    return {
        name
        for name, role in roles.items()
        if name in sizes.tensors
        and role.role in LINEAR_ROLES
        and role.role != "lm_head"
        and len(sizes.tensors[name][1]) == 2
    }


def safetensors_sizes(src: str) -> Sizes:
    """Sizes of a model directory or .safetensors file, from the safetensors headers."""
    from ..sources.safetensors import plan_conversion

    files = [st for _, st in plan_conversion(src).safetensors]
    return Sizes(
        file_bytes=sum(os.path.getsize(st.path) for st in files),
        tensors={t.name: (t.dtype, tuple(t.shape), t.end - t.begin) for st in files for t in st.tensors},
    )


def rbe_sizes(path: str) -> Sizes:
    """Sizes of an .rbe file: the file on disk and the stored sections of each tensor (not the small
    constants of an exported ONNX graph, which are no tensors of the model; the file size holds them)."""
    from ..decode import exported_graph_parts

    with Reader(path, verify_checksums=False) as r:
        _, graph_tensors = exported_graph_parts(r)
        rows = [row for row in tensor_rows(r) if not row["internal"] and row["name"] not in graph_tensors]
        file_bytes = totals(r)["file_bytes"]
    return Sizes(
        file_bytes=file_bytes,
        tensors={row["name"]: (row["dtype"], tuple(row["shape"]), row["stored_bytes"]) for row in rows},
    )


def check_same_model(path: str, sizes: Sizes, original: str, reference: Sizes) -> None:
    """A compressed file must hold exactly the original's tensors, shape for shape."""
    missing = sorted(set(reference.shapes) - set(sizes.shapes))
    extra = sorted(set(sizes.shapes) - set(reference.shapes))
    if missing or extra:
        parts = ([f"{len(missing)} of its tensors missing, e.g. {missing[0]!r}"] if missing else []) + (
            [f"{len(extra)} not in it, e.g. {extra[0]!r}"] if extra else []
        )
        raise InputError(
            f"{path}: holds other tensors than {original} ({'; '.join(parts)}); compare files "
            "converted from the same model"
        )
    for name, shape in reference.shapes.items():
        if sizes.shapes[name] != shape:
            raise InputError(
                f"{path}: tensor {name!r} has shape {list(sizes.shapes[name])}, {original} has "
                f"{list(shape)}; compare files converted from the same model"
            )


# -- model directories --------------------------------------------------------------

# What transformers reads is only ever a folder written here (``hf_guard``): the config and tokenizer files
# and the safetensors weights it would load, under names it loads; never code, never a pickle.


def stage_model_directory(model_dir: str, workdir: str) -> str:
    """A folder of links to what transformers needs of a model directory, and nothing else."""
    target = os.path.join(workdir, "original")
    os.makedirs(target)
    hf_folder.stage_directory(model_dir, target)
    return target


def stage_safetensors_file(path: str, workdir: str) -> str:
    """A model directory holding just this .safetensors file and its directory's config and tokenizer files."""
    target = os.path.join(workdir, "original")
    os.makedirs(target)
    os.symlink(os.path.abspath(path), os.path.join(target, hf_guard.WEIGHTS))
    hf_folder.link_data_files(os.path.dirname(os.path.abspath(path)), target)
    return target


def decode_to_directory(path: str, target: str, threads: int | None, borrow_from: str | None) -> str:
    """What transformers needs of an .rbe file, decoded into a new folder (``hf_folder.write_container_folder``),
    with the original's config and tokenizer files it does not carry."""
    os.makedirs(target)
    with Reader(path, threads=threads) as r:
        hf_folder.write_container_folder(r, target, path)
    if borrow_from is not None:
        hf_folder.link_data_files(borrow_from, target)
    return target


def check_container_config(path: str) -> None:
    """A container's own config.json (when it has one) checked against its tensors before any model loads."""
    with Reader(path, verify_checksums=False) as r:
        files = r.files()
        if hf_guard.CONFIG_FILE not in files:
            return
        config = hf_guard.parse_json(r.read_file(hf_guard.CONFIG_FILE), path, hf_guard.CONFIG_FILE)
        hf_guard.check_config(config, {name: tuple(r.entry(name).shape) for name in r.keys()}, path)
        if hf_guard.TOKENIZER_CONFIG in files:
            hf_guard.check_tokenizer_config(
                hf_guard.parse_json(r.read_file(hf_guard.TOKENIZER_CONFIG), path, hf_guard.TOKENIZER_CONFIG), path
            )


def container_safetensors_bytes(path: str) -> int:
    """The bytes of the safetensors files ``rbe decode`` writes for a container: what the ratios divide."""
    from ..decode import exported_graph_parts
    from ..safetensors_io import build_header

    with Reader(path, verify_checksums=False) as r:
        graph_files, graph_tensors = exported_graph_parts(r)
        shards = [(p, f) for p, f in r.files().items() if f.role == "safetensors-header" and p not in graph_files]
        dense = lambda names: sum(math.prod(r.entry(n).shape) * r.entry(n).dtype.itemsize for n in names)  # noqa: E731
        if not shards:  # one model.safetensors of every tensor
            names = [n for n in r.keys() if n not in graph_tensors]
            header = build_header([(n, r.entry(n).dtype.name, r.entry(n).shape) for n in names], r.metadata())
            return 8 + len(header) + dense(names)
        return sum(8 + f.blob.items + dense(f.tensors) for _, f in shards)


def safetensors_bytes(model_dir: str) -> int:
    """The bytes of a model directory's safetensors files: what the ratios divide."""
    return sum(
        os.path.getsize(os.path.join(d, n))
        for d, _, names in os.walk(model_dir)
        for n in names
        if n.endswith(".safetensors")
    )


# -- measures -----------------------------------------------------------------------

TRANSFORMERS_RUNTIME = "transformers (torch), float32, CPU"
ORT_RUNTIME = "ONNX Runtime, CPU"


class PerplexityMeasure:
    """Perplexity on consecutive windows of a text (``quality`` module doc).

    The text is tokenized without special tokens by the transformers ``tokenizer``, or by
    ``token_ids(text)`` for another runtime's tokenizer (``tokenizer`` None).  A transformers model
    is scored by ``score`` or ``score_streamed``; any other runtime's perplexity goes through ``scored``.
    """

    name = "perplexity"
    unit = "windows"

    def __init__(
        self,
        tokenizer,
        options: EvalOptions,
        token_ids: Callable[[str], list[int]] | None = None,
        runtime: str = TRANSFORMERS_RUNTIME,
    ):
        token_ids = token_ids or (lambda text: quality.token_ids(tokenizer, text))
        if options.text is None:
            text, self.source = (
                quality.evaluation_text(),
                (f"evaluation part of pydoc_data.topics (Python {platform.python_version()})"),
            )
        else:
            text, self.source = quality.read_text(options.text, "text"), options.text
        self.sha256 = quality.fingerprint(text)
        self.window = options.window or quality.DEFAULT_WINDOW
        self.runtime = runtime
        ids = token_ids(text)
        self.tokens = len(ids)
        count = min(options.windows or quality.DEFAULT_WINDOWS, len(ids) // self.window)
        if count == 0:
            raise InputError(
                f"{options.text or 'the evaluation text'}: holds {len(ids)} tokens, fewer than one "
                f"window of {self.window}; give a longer --text or a smaller --window"
            )
        self.parts = quality.windows(ids, self.window, count)
        self.largest_token_id = max(max(part) for part in self.parts)
        self.reference: float | None = None

    def score(self, model, advance=None) -> dict:
        return self.scored(quality.perplexity(model, self.parts, advance))

    def score_streamed(self, model_dir: str, label: str, progress=None) -> dict:
        """The score of the model in ``model_dir`` computed block by block (``calibrate.stream.perplexity``):
        memory holds one block's weights and every window's hidden states, whatever the model's size;
        ``progress(1)`` after each block."""
        from ..compress.calibrate import stream

        return self.scored(stream.perplexity(model_dir, self.parts, self.largest_token_id, label, progress))

    def scored(self, value: float) -> dict:
        if self.reference is None:
            self.reference = value
        return {"perplexity": value, "perplexity_change_pct": 100 * (value / self.reference - 1)}

    def protocol(self) -> dict:
        return {
            "measure": self.name,
            "text": self.source,
            "text_sha256": self.sha256,
            "tokens": self.tokens,
            "window": self.window,
            "windows": len(self.parts),
            "stride": self.window,
            "first_token": 0,
            "labels": "input_ids",
            "score": "exp of the mean loss over windows",
            "runtime": self.runtime,
        }

    def describe(self) -> str:
        return (
            f"perplexity: {len(self.parts)} windows of {self.window} tokens, stride {self.window} (no "
            f"overlap), from token 0 of {self.tokens:,}; labels = input_ids, exp of the mean loss over "
            f"windows; text: {self.source}, sha256 {self.sha256}"
        )


class EmbeddingMeasure:
    """Mean cosine and nearest-neighbour agreement of mean-pooled sentence embeddings.

    The sentences are tokenized by the transformers ``tokenizer``, or by ``token_ids(sentences)`` for
    another runtime's tokenizer (``tokenizer`` None), special tokens included.  A transformers model
    is scored by ``score``; any other runtime's embeddings go through ``compared``.  The first
    embeddings scored are the reference.
    """

    name = "embeddings"
    unit = "sentences"

    def __init__(
        self,
        tokenizer,
        options: EvalOptions,
        token_ids: Callable[[list[str]], list[list[int]]] | None = None,
        runtime: str = TRANSFORMERS_RUNTIME,
        hidden_state: str = "last_hidden_state",
    ):
        token_ids = token_ids or (lambda sentences: tokenizer(sentences)["input_ids"])
        self.tokenizer = tokenizer
        if options.sentences is None:
            self.sentences = quality.default_sentences()
            self.source = (
                f"{len(self.sentences)} sentences of the evaluation part of pydoc_data.topics "
                f"(Python {platform.python_version()})"
            )
        else:
            self.sentences, self.source = quality.read_sentences(options.sentences), options.sentences
        self.sha256 = quality.fingerprint("\n".join(self.sentences))
        self.runtime, self.hidden_state = runtime, hidden_state
        self.largest_token_id = max((max(ids, default=0) for ids in token_ids(self.sentences)), default=0)
        self.reference = None

    def score(self, model, advance=None) -> dict:
        return self.compared(quality.sentence_embeddings(model, self.tokenizer, self.sentences, advance=advance))

    def compared(self, embeddings) -> dict:
        if self.reference is None:
            self.reference = embeddings
        cosine = quality.mean_cosine(self.reference, embeddings)
        agreement = quality.neighbour_agreement(self.reference, embeddings)
        return {
            "mean_cosine": cosine,
            "cosine_change": cosine - 1.0,
            "nn_agreement": agreement,
            "nn_agreement_change": agreement - 1.0,
        }

    def pooling(self) -> str:
        return f"attention-mask weighted mean of {self.hidden_state}"

    def protocol(self) -> dict:
        return {
            "measure": self.name,
            "sentences": self.source,
            "sentences_sha256": self.sha256,
            "count": len(self.sentences),
            "pooling": self.pooling(),
            "similarity": "cosine",
            "runtime": self.runtime,
        }

    def describe(self) -> str:
        return (
            f"embeddings: mean cosine between the original's and each file's embedding of the same sentence, "
            f"and nearest-neighbour agreement (same nearest other sentence by cosine) over "
            f"{len(self.sentences)} sentences; {self.pooling()}; "
            f"sentences: {self.source}, sha256 {self.sha256}"
        )


def choose_measure(causal: bool, original: str, options: EvalOptions, not_causal_because: str):
    """The measure for the model's kind; options meant for the other kind are refused.
    ``not_causal_because`` says why a model is no causal LM ("its config names no *ForCausalLM
    architecture")."""
    if causal:
        if options.sentences is not None:
            raise UsageError(f"--sentences is for encoders; {original} is a causal LM, scored by perplexity on --text")
        return PerplexityMeasure
    given = [
        flag
        for flag, value in (("--text", options.text), ("--window", options.window), ("--windows", options.windows))
        if value is not None
    ]
    if given:
        verb = "is" if len(given) == 1 else "are"
        raise UsageError(
            f"{', '.join(given)} {verb} for causal LMs; {original} is not one ({not_causal_because}) "
            "and is scored by sentence embeddings: use --sentences"
        )
    return EmbeddingMeasure


def scoring_progress(path: str, total: int, unit: str, options: EvalOptions, after=None, position=(1, 1)):
    """The stderr progress of one file's scoring (``progress.progress``): "eval: scoring q4.rbe (file 2
    of 3)", the place said when there is more than one file.  Its first line comes after
    ``LINE_SECONDS``, so that a model refused as it loads is the one line: ``LINE_SECONDS`` after the
    last line of ``after``, the file scored before it (or after that one's start, when it printed none),
    so that a run of quick files never leaves a log quiet longer."""
    from ..progress import progress

    number, files = position
    label = f"eval: scoring {path}" + (f" (file {number} of {files})" if files > 1 else "")
    # the first file's line is due from the command's start; a terminal's bar keeps no such time
    last_line = getattr(after, "last", options.started)
    return progress(total, label, unit, quiet=options.quiet, announce=False, last_line=last_line)


# -- the run ------------------------------------------------------------------------


def require_runtime(original: str) -> None:
    """The packages scoring ``original`` needs (ONNX Runtime's or transformers'), or one error naming the
    extra that installs them: the first thing a user must fix, said before any other."""
    if runs_in_onnx_runtime(original):
        extras.ORT_EVAL.require()
    else:
        extras.TORCH_EVAL.require()


def runs_in_onnx_runtime(original: str) -> bool:
    """Whether ``original`` is an ONNX model: an .onnx file, or an .rbe converted from one (a graph and no
    config.json, which a Hugging Face directory converted with --onnx carries and transformers loads)."""
    if original.lower().endswith(".onnx"):
        return True
    if os.path.isdir(original) or original.endswith(".safetensors"):
        return False
    from rbeformat.embedded.onnx import carries_onnx

    with Reader(original, verify_checksums=False) as r:
        return carries_onnx(r) and hf_guard.CONFIG_FILE not in r.files()


def evaluate(
    original: str, compressed: list[str], options: EvalOptions, concerning: Callable[[str], None] = lambda path: None
) -> dict:
    """Measures every file; ``concerning`` hears which file a failure from now on is about.
    ONNX models run in ONNX Runtime (``ort_eval``), everything else in transformers."""
    concerning(original)
    if runs_in_onnx_runtime(original):
        from .ort_eval import evaluate_onnx

        return evaluate_onnx(original, compressed, options, concerning)
    if options.tokenizer is not None:
        raise UsageError(
            f"--tokenizer is for ONNX models (an .onnx file or an .rbe converted from one); {original} "
            "is scored with its own tokenizer"
        )
    return _evaluate_transformers(original, compressed, options, concerning)


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """No load-time progress bars or warnings between rbe's own lines."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _evaluate_transformers(
    original: str, compressed: list[str], options: EvalOptions, concerning: Callable[[str], None]
) -> dict:
    torch, transformers = quality.require_torch()
    if options.threads:
        torch.set_num_threads(options.threads)
    with _quiet_transformers(transformers), tempfile.TemporaryDirectory(prefix="rbe-eval-") as workdir:
        concerning(original)
        model_dir, reference, reference_bytes = _original_directory(original, workdir, options.threads)
        config = hf_folder.check_folder(model_dir, original)
        measure_kind = choose_measure(
            is_causal_lm(config), original, options, "its config names no *ForCausalLM architecture"
        )
        tokenizer = quality.load_tokenizer(model_dir, original)
        concerning(options.text or options.sentences or original)
        measure = measure_kind(tokenizer, options)
        linear = linear_weights(reference, config)
        baseline = _Baseline(measure, config, reference_bytes, linear, options, files=1 + len(compressed))
        sizes = {}
        for path in compressed:  # every file is checked before the first model loads
            concerning(path)
            sizes[path] = rbe_sizes(path)
            check_same_model(path, sizes[path], original, reference)
            check_container_config(path)
        concerning(original)
        with baseline.progress(original) as bar:
            rows = [baseline.scored_row(original, "original", reference, model_dir, bar)]
        for k, path in enumerate(compressed):
            concerning(path)
            with baseline.progress(path) as bar:
                bar.label("decoding")
                target = decode_to_directory(path, os.path.join(workdir, f"compressed-{k}"), options.threads, model_dir)
                rows.append(baseline.scored_row(path, "compressed", sizes[path], target, bar))
            shutil.rmtree(target)
    return {
        "measure": measure.name,
        "protocol": measure.protocol(),
        "description": measure.describe(),
        "runtime": TRANSFORMERS_RUNTIME,
        "ratio_divides": "the original's safetensors bytes (an .rbe original: those rbe decode writes)",
        "rows": rows,
    }


def _original_directory(original: str, workdir: str, threads: int | None) -> tuple[str, Sizes, int]:
    """The original as a folder transformers may read, its sizes, and its safetensors bytes."""
    if os.path.isdir(original):
        sizes = safetensors_sizes(original)
        return stage_model_directory(original, workdir), sizes, safetensors_bytes(original)
    if original.endswith(".safetensors"):
        if not os.path.isfile(original):
            raise InputError(f"{original}: no such file")
        return stage_safetensors_file(original, workdir), safetensors_sizes(original), os.path.getsize(original)
    sizes = rbe_sizes(original)
    with Reader(original, verify_checksums=False) as r:
        if "config.json" not in r.files():  # made from a lone .safetensors file
            raise InputError(
                f"{original}: holds no config.json, so transformers cannot load it; give the model "
                "directory (or an .rbe converted from it) as the original"
            )
    check_container_config(original)  # before anything is decoded
    target = decode_to_directory(original, os.path.join(workdir, "original"), threads, None)
    return target, sizes, container_safetensors_bytes(original)


def _block_count(config: dict) -> int:
    """A causal LM's decoder blocks, from its config (its text_config for a multimodal one); 0 unknown."""
    for source in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 0


@dataclass
class _Baseline:
    """What every row is measured and compared with: the measure, the original's bytes, its Linear weights."""

    measure: PerplexityMeasure | EmbeddingMeasure
    config: dict
    reference_bytes: int
    linear: set
    options: EvalOptions
    files: int = 1  # the original and the compressed files, each scored in turn
    previous: object = None  # the progress of the file scored last
    scored: int = 0  # files whose scoring has begun

    @property
    def causal(self) -> bool:
        return isinstance(self.measure, PerplexityMeasure)

    def progress(self, path: str):
        """A causal LM is scored block by block, an encoder a batch of sentences at a time."""
        if self.causal:
            total, unit = _block_count(self.config), "blocks"
        else:
            total, unit = len(self.measure.sentences), self.measure.unit
        self.scored += 1
        self.previous = scoring_progress(path, total, unit, self.options, self.previous, (self.scored, self.files))
        return self.previous

    def scored_row(self, path: str, role: str, sizes: Sizes, model_dir: str, bar) -> dict:
        if self.causal:  # a causal LM may be larger than memory: scored block by block
            bar.label("")
            scores = self.measure.score_streamed(model_dir, path, bar.update)
            return {"file": path, "role": role, **sizes.row(self.reference_bytes, self.linear), **scores}
        bar.label("loading the model")
        model = quality.load_model(model_dir, self.causal, path)
        try:
            rows = model.get_input_embeddings().weight.shape[0]
            if self.measure.largest_token_id >= rows:  # an index error deep in torch otherwise
                raise InputError(
                    f"{path}: the tokenizer gives token id {self.measure.largest_token_id}, but the "
                    f"model's token embedding has {rows} rows"
                )
            bar.label("")
            scores = self.measure.score(model, bar.update)
        finally:
            del model
            gc.collect()  # one model in memory at a time
        return {"file": path, "role": role, **sizes.row(self.reference_bytes, self.linear), **scores}


# -- output -------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _quality_cells(row: dict, measure: str) -> list[str]:
    if measure == "perplexity":
        return [f"{row['perplexity']:.3f}", f"{row['perplexity_change_pct']:+.2f}%"]
    return [
        f"{row['mean_cosine']:.4f}",
        f"{row['cosine_change']:+.4f}",
        f"{row['nn_agreement']:.3f}",
        f"{row['nn_agreement_change']:+.3f}",
    ]


def eval_table(result: dict) -> str:
    """One row per file, the original first, and the protocol under it."""
    measure = result["measure"]
    quality_head = (
        ["perplexity", "change"] if measure == "perplexity" else ["mean cosine", "change", "NN agreement", "change"]
    )
    head = ["file", "size", "ratio", "bits/w", "Linear bits/w"] + quality_head
    body = [
        [
            row["file"] + (" (original)" if row["role"] == "original" else ""),
            human_bytes(row["file_bytes"]),
            _fmt(row["ratio"], ".3f"),
            _fmt(row["bits_per_weight"], ".3f"),
            _fmt(row["linear_bits_per_weight"], ".3f"),
            *_quality_cells(row, measure),
        ]
        for row in result["rows"]
    ]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        for cells in [head, ["-" * w for w in widths], *body]
    ]
    return "\n".join(
        lines
        + [
            "",
            result["description"],
            "size: decimal MB (a directory or .safetensors original: its safetensors files; an .onnx "
            f"original: with its external data); ratio: {result['ratio_divides']} / file size; bits/w: 8 x "
            "file size / "
            "weights; Linear bits/w: stored bits of the Linear weights (by tensor role: attention "
            "and MLP projections, not embeddings or lm_head) / their weights; models run in "
            f"{result['runtime']}",
        ]
    )
