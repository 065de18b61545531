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

Each row puts a file's size and ratio beside its bits per weight and the
quality it measured, so no size is ever read without its cost:

* size: bytes on disk (decimal MB); for a directory or .safetensors original,
  the bytes of its safetensors files;
* ratio: the original's safetensors bytes / this file's size (an .rbe file
  counts everything it holds: tensors, config and tokenizer files, manifest);
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

from rbeformat import InputError, Reader, UsageError
from rbeformat.atomic import atomic_file, check_parent, check_target
from rbeformat.embedded import hf_guard
from rbeformat.embedded.config import is_causal_lm

from .. import hf_folder
from . import quality
from .report import human_bytes, tensor_rows, totals


@dataclass
class EvalOptions:
    """What the user asked for; None means the protocol's default."""

    text: str | None = None
    sentences: str | None = None
    window: int | None = None
    windows: int | None = None
    threads: int | None = None


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
    from ..compress.roles import LINEAR_ROLES, classify

    roles = classify({name: (dtype, shape) for name, (dtype, shape, _) in sizes.tensors.items()}, config)
    return {
        name
        for name, role in roles.items()
        if role.role in LINEAR_ROLES and role.role != "lm_head" and len(sizes.tensors[name][1]) == 2
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


class PerplexityMeasure:
    """Perplexity on consecutive windows of a text (``quality`` module doc)."""

    name = "perplexity"

    def __init__(self, tokenizer, options: EvalOptions):
        if options.text is None:
            text, self.source = (
                quality.evaluation_text(),
                (f"evaluation part of pydoc_data.topics (Python {platform.python_version()})"),
            )
        else:
            text, self.source = quality.read_text(options.text, "text"), options.text
        self.sha256 = quality.fingerprint(text)
        self.window = options.window or quality.DEFAULT_WINDOW
        ids = quality.token_ids(tokenizer, text)
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

    def score(self, model) -> dict:
        return self.scored(quality.perplexity(model, self.parts))

    def score_streamed(self, model_dir: str, label: str) -> dict:
        """The score of the model in ``model_dir`` computed block by block (``calibrate.stream.perplexity``):
        memory holds one block's weights and every window's hidden states, whatever the model's size."""
        from ..compress.calibrate import stream

        return self.scored(stream.perplexity(model_dir, self.parts, self.largest_token_id, label))

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
        }

    def describe(self) -> str:
        return (
            f"perplexity: {len(self.parts)} windows of {self.window} tokens, stride {self.window} (no "
            f"overlap), from token 0 of {self.tokens:,}; labels = input_ids, exp of the mean loss over "
            f"windows; text: {self.source}, sha256 {self.sha256}"
        )


class EmbeddingMeasure:
    """Mean cosine and nearest-neighbour agreement of mean-pooled sentence embeddings."""

    name = "embeddings"

    def __init__(self, tokenizer, options: EvalOptions):
        if options.sentences is None:
            self.sentences = quality.default_sentences()
            self.source = (
                f"{len(self.sentences)} sentences of the evaluation part of pydoc_data.topics "
                f"(Python {platform.python_version()})"
            )
        else:
            self.sentences, self.source = quality.read_sentences(options.sentences), options.sentences
        self.sha256 = quality.fingerprint("\n".join(self.sentences))
        self.tokenizer = tokenizer
        self.largest_token_id = max((max(ids, default=0) for ids in tokenizer(self.sentences)["input_ids"]), default=0)
        self.reference = None

    def score(self, model) -> dict:
        embeddings = quality.sentence_embeddings(model, self.tokenizer, self.sentences)
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

    def protocol(self) -> dict:
        return {
            "measure": self.name,
            "sentences": self.source,
            "sentences_sha256": self.sha256,
            "count": len(self.sentences),
            "pooling": "attention-mask weighted mean of last_hidden_state",
            "similarity": "cosine",
        }

    def describe(self) -> str:
        return (
            f"embeddings: mean cosine between the original's and each file's embedding of the same sentence, "
            f"and nearest-neighbour agreement (same nearest other sentence by cosine) over "
            f"{len(self.sentences)} sentences; attention-mask weighted mean of last_hidden_state; "
            f"sentences: {self.source}, sha256 {self.sha256}"
        )


def choose_measure(config: dict, original: str, options: EvalOptions):
    """The measure for the model's kind; options meant for the other kind are refused."""
    if is_causal_lm(config):
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
            f"{', '.join(given)} {verb} for causal LMs; {original} is not one (its config names no "
            "*ForCausalLM architecture) and is scored by sentence embeddings: use --sentences"
        )
    return EmbeddingMeasure


# -- the run ------------------------------------------------------------------------


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


def evaluate(
    original: str, compressed: list[str], options: EvalOptions, concerning: Callable[[str], None] = lambda path: None
) -> dict:
    """Measures every file; ``concerning`` hears which file a failure from now on is about."""
    torch, transformers = quality.require_torch()
    if options.threads:
        torch.set_num_threads(options.threads)
    with _quiet_transformers(transformers), tempfile.TemporaryDirectory(prefix="rbe-eval-") as workdir:
        concerning(original)
        model_dir, reference, reference_bytes = _original_directory(original, workdir, options.threads)
        config = hf_folder.check_folder(model_dir, original)
        measure_kind = choose_measure(config, original, options)
        tokenizer = quality.load_tokenizer(model_dir, original)
        concerning(options.text or options.sentences or original)
        baseline = _Baseline(
            measure_kind(tokenizer, options),
            measure_kind is PerplexityMeasure,
            reference_bytes,
            linear_weights(reference, config),
        )
        sizes = {}
        for path in compressed:  # every file is checked before the first model loads
            concerning(path)
            sizes[path] = rbe_sizes(path)
            check_same_model(path, sizes[path], original, reference)
            check_container_config(path)
        concerning(original)
        rows = [baseline.scored_row(original, "original", reference, model_dir)]
        for k, path in enumerate(compressed):
            concerning(path)
            target = decode_to_directory(path, os.path.join(workdir, f"compressed-{k}"), options.threads, model_dir)
            rows.append(baseline.scored_row(path, "compressed", sizes[path], target))
            shutil.rmtree(target)
    measure = baseline.measure
    return {"measure": measure.name, "protocol": measure.protocol(), "description": measure.describe(), "rows": rows}


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


@dataclass
class _Baseline:
    """What every row is measured and compared with: the measure, the original's bytes, its Linear weights."""

    measure: PerplexityMeasure | EmbeddingMeasure
    causal: bool
    reference_bytes: int
    linear: set

    def scored_row(self, path: str, role: str, sizes: Sizes, model_dir: str) -> dict:
        if self.causal:  # a causal LM may be larger than memory: scored block by block
            scores = self.measure.score_streamed(model_dir, path)
            return {"file": path, "role": role, **sizes.row(self.reference_bytes, self.linear), **scores}
        model = quality.load_model(model_dir, self.causal, path)
        try:
            rows = model.get_input_embeddings().weight.shape[0]
            if self.measure.largest_token_id >= rows:  # an index error deep in torch otherwise
                raise InputError(
                    f"{path}: the tokenizer gives token id {self.measure.largest_token_id}, but the "
                    f"model's token embedding has {rows} rows"
                )
            scores = self.measure.score(model)
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
            "size: decimal MB (a directory or .safetensors original: its safetensors files); "
            "ratio: the original's safetensors bytes / file size; bits/w: 8 x file size / "
            "weights; Linear bits/w: stored bits of the Linear weights (by tensor role: attention "
            "and MLP projections, not embeddings or lm_head) / their weights; models run in "
            "float32 on the CPU",
        ]
    )


def check_plot_target(path: str, force: bool) -> None:
    """Before any measuring: matplotlib is there and the plot may be written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which rbe's 'bench' extra installs: pip install 'rbe[bench]'"
        ) from None
    check_target(path, force)
    check_parent(path)


def _point_label(row: dict, measure: str) -> str:
    name = os.path.basename(os.path.normpath(row["file"])) + (" (original)" if row["role"] == "original" else "")
    if measure == "perplexity":
        return f"{name}: {row['perplexity']:.2f}"
    return f"{name}: {row['mean_cosine']:.4f}, NN {row['nn_agreement']:.3f}"


def _plot_title(result: dict) -> str:
    p = result["protocol"]
    if result["measure"] == "perplexity":
        return (
            f"perplexity, {p['windows']} windows of {p['window']} tokens (stride {p['stride']}), "
            f"text sha256 {p['text_sha256']}"
        )
    return f"mean cosine and NN agreement of mean-pooled embeddings, {p['count']} sentences, sha256 {p['sentences_sha256']}"


def write_plot(result: dict, path: str, force: bool) -> None:
    """Quality against bits per weight (whole file and Linear layers), one labelled point per file."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    key, label = (
        ("perplexity", "perplexity (lower is better)")
        if result["measure"] == "perplexity"
        else ("mean_cosine", "mean cosine to the original's embeddings")
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, x_key, x_label in (
        (axes[0], "bits_per_weight", "bits per weight, whole file"),
        (axes[1], "linear_bits_per_weight", "bits per weight, Linear weights"),
    ):
        for row in result["rows"]:
            original = row["role"] == "original"
            ax.scatter(
                row[x_key],
                row[key],
                marker="*" if original else "o",
                s=180 if original else 50,
                color="black" if original else "tab:blue",
                zorder=3,
            )
            ax.annotate(
                _point_label(row, result["measure"]),
                (row[x_key], row[key]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
        ax.set_xlabel(x_label)
        ax.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(label)
    fig.suptitle(_plot_title(result), fontsize=9)
    fig.tight_layout()
    with atomic_file(path, force) as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
