"""One conversion pipeline for every input: a tensor source to one rbe file.

``convert`` writes a ``TensorSource`` (``converters/sources/``: a safetensors
file, a Hugging Face model directory, an .onnx file, an .rbe file) into a container: each
tensor's chain chosen by the policy (``compress/plan.py``), calibrated where
the rules ask, the shared state of codecs that share it stored first, the
tensors in the source's order, then the source's own entries.

``convert_model`` is what ``rbe convert`` does with its options, as a library
function: the lossless codec (``LOSSLESS_CODECS``) and the policy from
--codec / --recipe / --preset (``policy_from_options``), calibration (with
torch for a model directory, with ONNX Runtime for an .onnx file and a
tokenizer), the --onnx graph export (``onnx_export.py``), the atomic write and
the numbers the result line prints (``ConvertResult``).  What it tells the user
on the way goes through a ``Reporter``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rbeformat import OutputExistsError, Reader, UsageError, Writer, extras
from rbeformat.atomic import check_parent, check_target, remove_stale_partials
from rbeformat.chain import Chain
from rbeformat.codecs.blob.byteplane import DEFAULT_SPLIT_GAIN, Byteplane
from rbeformat.codecs.blob.raw import Raw
from rbeformat.codecs.core.base import Codec
from rbeformat.codecs.util import parallel
from rbeformat.values import to_float32

from .compress.plan import Statistics, calibrate_for, calibration_methods, choose_chains, mixed_precision, prune_heads
from .compress.recipe import Policy, encoder_variant, lossless_policy, policy_for_model
from .outputs import check_input_exists, check_not_input, check_rbe_output_name, stale_partials_note
from .progress import NoProgress
from .sources import TensorSource, is_onnx_input, is_rbe_input, load, open_source
from .sources.rbe import holds_onnx_model
from .sources.safetensors import SafetensorsSource

Progress = Callable[[int], None]

# --lossless: how tensors without a chain are stored, by option value (the first is the default)
LOSSLESS_CODECS = {
    "byteplane": lambda level, split_gain: Byteplane(level=level, split_gain=split_gain),
    "raw": lambda level, split_gain: Raw(),
}


def lossless_codec(name: str = "byteplane", level: int = 0, max_ratio: bool = False) -> Codec:
    """The codec of tensors without a chain: ``LOSSLESS_CODECS[name]``; byteplane at zstd ``level``
    (0: rbe's preset), conditioning mantissas on exponents wherever it saves anything with ``max_ratio``."""
    return LOSSLESS_CODECS[name](level=level, split_gain=0.0 if max_ratio else DEFAULT_SPLIT_GAIN)


def policy_from_options(chain: str | None = None, recipe: str | None = None, preset: str | None = None) -> Policy:
    """The policy of --codec CHAIN, --recipe FILE or --preset NAME (at most one); lossless without any."""
    from .compress.recipe import policy_from_codec, policy_from_preset, policy_from_recipe

    if chain is not None:  # an empty --codec "" is an error, not a lossless file
        return policy_from_codec(chain)
    if recipe is not None:
        return policy_from_recipe(recipe)
    if preset is not None:
        return policy_from_preset(preset)
    return lossless_policy()


# -- the pipeline -----------------------------------------------------------------------


def convert(
    src: str | TensorSource,
    dst: str,
    *,
    force: bool = False,
    codec: Codec | None = None,
    policy: Policy | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    calibration_text=None,
    calibrations: dict | None = None,
    sequential: bool = True,
    blocks_progress=None,
    extra: Callable[[Writer], dict[str, str]] | None = None,
    plan: TensorSource | None = None,
    resume=None,
    encoders=None,
    reporter: Reporter | None = None,
    encoding_seconds: float | None = None,
) -> list[str]:
    """Converts a tensor source (or the path of one: ``sources.open_source``) into one rbe file.

    ``codec`` is the lossless codec; ``policy`` picks a codec chain per tensor
    (default: everything lossless), adapted to what the source can do
    (``check_policy``: an .onnx file calibrates only with ``calibrations`` given).
    Rules that ask for calibration get the statistics of the original model on
    ``calibration_text`` (default: the calibration half of pydoc's topics)
    before anything is written: a survey block by block that keeps only the
    decisions of mixed precision and head pruning (``calibrate_for``), or
    ``calibrations`` given (a ``Statistics``, or ``calibrate.collect``'s dict).
    With ``sequential`` (the default) a model transformers loads has its
    calibrated tensors encoded block by block, each block's statistics measured
    on what the blocks before it decode to (``calibrate.sequential``;
    ``blocks_progress``, a bar's ``update(n)`` and ``label(text)``, is told of each block and
    stage); otherwise all from the original
    model's statistics.  ``extra`` adds entries of its own after the source's
    (an exported ONNX graph, ``onnx_export.ExportedGraph.add_to``) and returns
    metadata to add.  ``resume`` (a ``resume.ResumeState``) keeps a checkpoint
    after each block encoded sequentially, and goes on from the last one it
    holds.  ``encoders`` (a ``ray_encode.RayEncoders``) encodes the tensors
    elsewhere, several at once, the writer placing them in order: the same
    file.  ``reporter`` (a ``Reporter``) shows the stages that follow the
    calibration: mixed precision's scoring, the blocks, the bytes written; it
    takes the place of ``progress`` and ``blocks_progress``; ``encoding_seconds``
    is how long the blocks are expected to take (from the survey's pace), their
    estimate until the first is done.  Returns notes for the user (a changed
    policy, what head pruning removed).
    """
    source = plan if plan is not None else src if not isinstance(src, str) else open_source(src)
    policy = policy or lossless_policy()
    source.check_output(dst)
    policy, note = source.check_policy(policy, calibrating=calibrations is not None)
    alone, groups = choose_chains(source, policy)
    if calibrations is None:
        calibrations = calibrate_for(source, policy, calibration_text, threads, sequential=sequential)
    stats = calibrations if isinstance(calibrations, Statistics) else Statistics.of(calibrations)
    pruned, pruning = prune_heads(source, policy, stats)
    scoring = _ScoringStage(reporter, source, sequential and bool(stats.methods)) if reporter is not None else None
    alone.update(mixed_precision(source, policy, stats, set(alone), pruned, calibration_text, threads, scoring))
    if encoding_seconds is None and scoring is not None:
        encoding_seconds = scoring.encoding_seconds()
    written = _BytesWritten(progress)
    with Writer(dst, force=force, codec=codec, threads=threads, progress=written) as w:
        checkpoint = resume.load_block() if resume is not None else None
        if checkpoint is not None:
            w.resume(checkpoint[1])
        if resume is not None:
            resume.own_partial(w.partial_name)
        chains = store_shared(w, source, alone, groups)
        done = set()
        if sequential and stats.methods and source.transformers_model:
            with _blocks_stage(reporter, blocks_progress, source, encoding_seconds) as blocks:
                done = _encode_sequentially(
                    w, source, chains, stats, calibration_text, threads, blocks, pruned, resume, checkpoint, encoders
                )
        elif stats.methods and set(stats.methods) - set(stats.kept):
            raise UsageError(
                "the calibration statistics of a survey hold no Hessians for the blocks; encode them sequentially"
            )

        def add_tensor(t, read_at) -> None:
            if t.name in done:  # stored already, block by block
                return
            chain, refs = chains.get(t.name, (None, None))
            if encoders is not None:
                w.add_later(
                    t.name, _encode_elsewhere(encoders, source, t, w, chain, refs, stats, pruned), encoders.window
                )
                return
            if chain is None:
                w.add_tensor(t.name, t.dtype, t.shape, read_at)
                return
            original = load(read_at, t)
            values = pruned[t.name] if pruned and t.name in pruned else original
            w.add_transformed(
                t.name, t.dtype, values, chain, refs=refs, calibration=stats.kept.get(t.name), reference=original
            )

        with reporter.bar(source.tensor_bytes, "convert") if reporter else contextlib.nullcontext() as bar:
            if bar is not None:
                if written.n:  # the blocks' bytes are written: the pace is the rest's
                    bar.resumed(written.n)
                written.forward = bar.update
            metadata = source.add_entries(w, add_tensor)
            if extra is not None:
                metadata.update(extra(w))
        for name, before in _lossy_input_stats(source).items():
            w.set_input_stats(name, before)
        w.set_metadata(metadata)
    if resume is not None:
        resume.clear()
    return [note for note in (note, pruning) if note]


# The block by block encoding after mixed precision measured on the model takes about this many block
# runs of the scoring's pace per block (encoder-q4 on all-MiniLM-L6-v2, 2 cores: 22 s for 6 blocks
# after 240 s for 1077 block runs).
ENCODE_BLOCK_RUNS_PER_BLOCK = 16


class _ScoringStage:
    """``reporter.stage`` for mixed precision's scoring: counted in block runs (scores measured on the
    model), its lines also predict the block by block encoding after it, which that stage then shows
    until its first block is done."""

    def __init__(self, reporter: Reporter, source: TensorSource, blocks_after: bool):
        self.reporter, self.source, self.blocks_after = reporter, source, blocks_after
        self.seconds_per_run, self.blocks = None, 0

    def __call__(self, total, desc, unit, *args, **kw):
        later = None
        if unit == "block runs" and self.blocks_after and self.source.transformers_model:
            from .compress.calibrate import torch as calibrate

            self.blocks, later = calibrate.sequential_steps(self.source.root), self._later
        return self.reporter.stage(total, desc, unit, *args, later=later, **kw)

    def _later(self, seconds_per_run: float) -> float:
        self.seconds_per_run = seconds_per_run
        return seconds_per_run * ENCODE_BLOCK_RUNS_PER_BLOCK * self.blocks

    def encoding_seconds(self) -> float | None:
        return None if self.seconds_per_run is None else self._later(self.seconds_per_run)


class _BytesWritten:
    """The writer's progress: counts the bytes written and passes them on to ``forward``."""

    def __init__(self, forward: Progress | None):
        self.n, self.forward = 0, forward

    def __call__(self, n: int) -> None:
        self.n += n
        if self.forward is not None:
            self.forward(n)


def _blocks_stage(reporter: Reporter | None, blocks_progress, source: TensorSource, expected: float | None):
    """The stage of block by block encoding: the reporter's, or the ``blocks_progress`` given."""
    if reporter is None:
        return contextlib.nullcontext(blocks_progress)
    from .compress.calibrate import torch as calibrate

    return reporter.blocks_bar(calibrate.sequential_steps(source.root), expected)


def _encode_elsewhere(encoders, source: TensorSource, t, w: Writer, chain, refs, stats: Statistics, pruned):
    """What ``Writer.add_later`` waits on: one tensor encoded by ``encoders`` as ``add_tensor`` would."""
    if chain is None:
        return encoders.lossless(source, t, w.codec)
    values = pruned.get(t.name) if pruned else None
    return encoders.transformed(source, t.name, chain, values=values, refs=refs, calibration=stats.kept.get(t.name))


def store_shared(w: Writer, source: TensorSource, alone: dict, groups: dict) -> dict:
    """Stores each group's shared state as internal tensors, first; returns {name: (chain, refs)}.

    The members of a group are loaded together, once, to build their state.
    """
    chosen = {name: (chain, None) for name, chain in alone.items()}
    for (_, dtype, shape, _), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        values = [to_float32(source.read(t.name), dtype) for t, _ in members]
        shared = members[0][1].codec.build_shared(values, dtype, shape)
        for name, array in shared.items():
            if not w.has(name):  # a resumed conversion wrote it before
                w.add_array(name, np.ascontiguousarray(array, np.float32), dedup=False, internal=True)
        for t, chain in members:
            chosen[t.name] = (Chain(chain.codec.bind_shared(list(shared)), chain.parts), shared)
    return chosen


def _encode_sequentially(
    w: Writer,
    source: TensorSource,
    chains: dict,
    stats: Statistics,
    text,
    threads: int | None,
    progress,
    pruned: dict,
    resume=None,
    checkpoint=None,
    encoders=None,
) -> set[str]:
    """Stores the calibrated tensors block by block (``calibrate.sequential``); returns their names.
    With ``resume``, a checkpoint after each block; from ``checkpoint`` (block, writer, hidden states)
    the blocks after it.  With ``encoders`` a stage's weights are encoded at once."""
    from .compress.calibrate import torch as calibrate

    methods = {name: method for name, method in stats.methods.items() if name in chains}

    def encode(name: str, calibration) -> np.ndarray:
        t = source.tensor(name)
        chain, refs = chains[name]
        original = source.read(name)
        values = pruned.get(name, original)
        return w.add_transformed_decoded(
            name, t.dtype, values, chain, refs=refs, calibration=calibration, reference=original
        )

    def encode_stage(stage: dict):
        decoded = {}
        for name, calibration in stage.items():
            chain, refs = chains[name]
            values = pruned.get(name)
            encoding = encoders.transformed(
                source, name, chain, values=values, refs=refs, calibration=calibration, dedup=False
            )
            w.add_later(name, _keeping_decoded(encoding, decoded, name), len(stage))
        for name in stage:
            if name not in decoded:
                w.flush_later()
            yield name, decoded.pop(name)

    after_block = None
    if resume is not None:

        def after_block(index: int, hidden: list) -> None:
            resume.save_block(index, w.checkpoint(), hidden)

    start, hidden = (checkpoint[0] + 1, checkpoint[2]) if checkpoint is not None else (0, None)
    if progress and start:
        getattr(progress, "resumed", progress.update)(start)  # a Reporter's own bar may count them as any
    text = text or calibrate.default_text()
    stored = encode_stage if encoders is not None else calibrate.per_tensor(encode)
    calibrate.sequential(source.root, methods, text, stored, stats.kept, threads, progress, start, hidden, after_block)
    return set(methods)


def _keeping_decoded(resolve, decoded: dict, name: str):
    """``resolve`` for ``Writer.add_later``, keeping the tensor's decoded values in ``decoded``."""

    def resolved():
        encoded = resolve()
        # Ray hands results over read-only (shared memory); the running model takes them as its own
        decoded[name], encoded.decoded = np.require(encoded.decoded, requirements="W"), None
        return encoded

    return resolved


# -- rbe convert, as a library function ---------------------------------------------------


class Reporter:
    """What a conversion tells its user on the way.  The default tells nothing and shows no bar.

    Progress comes in stages, one after the other (``stage``): calibrate (windows of text), score
    (mixed precision's candidates, in weights), encode (blocks, for a conversion encoded block by
    block) and convert (the bytes of the tensors written)."""

    def info(self, line: str) -> None:
        """Progress worth a line (what is embedded, what runs now); ``rbe convert --quiet`` drops it."""

    def warning(self, line: str) -> None:
        """A changed method or a refusal's reason: said even when quiet."""

    def stage(
        self,
        total: float,
        desc: str,
        unit: str,
        count_format: str = "{n:.0f}/{total:.0f}",
        scale: float = 1.0,
        later: Callable[[float], float] | None = None,
        expected: float | None = None,
    ):
        """A context manager over one stage of ``total`` units: ``update(n)`` counts ``n`` done,
        ``resumed(n)`` counts ``n`` done before (not part of the pace), ``label(text)`` says what runs
        now.  ``later`` (seconds per unit -> seconds) predicts the stages after this one; ``expected``
        is this stage's length as predicted before it (its estimate until its first unit is done)."""
        return NoProgress()

    def bar(self, total: int, desc: str):
        """A stage counting ``total`` bytes."""
        return self.stage(total, desc, "MB", count_format="{n:.1f}/{total:.1f}", scale=1e6)

    def windows_bar(self, total: int, later: Callable[[float], float] | None = None):
        """A stage counting (fractions of) ``total`` calibration windows."""
        return self.stage(total, "calibrate", "windows", count_format="{n:.1f}/{total:.0f}", later=later)

    def blocks_bar(self, total: int, expected: float | None = None):
        """A stage counting blocks encoded of ``total`` (block by block encoding)."""
        return self.stage(total, "encode", "blocks", expected=expected)


class _KeepingWarnings(Reporter):
    """The caller's reporter, keeping each warning for ``ConvertResult.warnings`` as it passes it on: a
    program that shows no message still learns that its conversion changed a method."""

    def __init__(self, shown: Reporter):
        self.shown, self.kept = shown, []

    def info(self, line: str) -> None:
        self.shown.info(line)

    def warning(self, line: str) -> None:
        self.kept.append(line.removeprefix("rbe: warning: ").removeprefix("rbe: "))  # the command line's prefix
        self.shown.warning(line)

    def stage(self, *args, **kwargs):
        return self.shown.stage(*args, **kwargs)

    def bar(self, total: int, desc: str):
        return self.shown.bar(total, desc)

    def windows_bar(self, total: int, later: Callable[[float], float] | None = None):
        return self.shown.windows_bar(total, later)

    def blocks_bar(self, total: int, expected: float | None = None):
        return self.shown.blocks_bar(total, expected)


class StderrReporter(Reporter):
    """Lines and warnings on stderr, progress as plain lines (``progress.LineProgress``), never a bar:
    for a script that converts and wants to see what happens, or a log."""

    def info(self, line: str) -> None:
        print(line, file=sys.stderr)

    def warning(self, line: str) -> None:
        print(line, file=sys.stderr)

    def stage(self, total, desc, unit, count_format="{n:.0f}/{total:.0f}", scale=1.0, later=None, expected=None):
        from .progress import LineProgress

        silent = not total
        return LineProgress(total, desc, unit, silent, count_format, scale, True, later, expected)


class CallbackReporter(Reporter):
    """Progress for a program: ``on_progress`` gets a ``progress.ProgressReport`` at every step of
    every stage (and every 10 s while a step lasts); ``on_message``, when given, the lines and
    warnings ``rbe convert`` prints.

    >>> convert_model("model_dir", "q4.rbe", ConvertOptions(preset="q4"), CallbackReporter(print))
    """

    def __init__(self, on_progress, on_message=None):
        self.on_progress, self.on_message = on_progress, on_message

    def info(self, line: str) -> None:
        if self.on_message:
            self.on_message(line)

    def warning(self, line: str) -> None:
        if self.on_message:
            self.on_message(line)

    def stage(self, total, desc, unit, count_format="{n:.0f}/{total:.0f}", scale=1.0, later=None, expected=None):
        from .progress import CallbackProgress

        if not total:
            return NoProgress()
        kw = {"count_format": count_format, "scale": scale, "later": later, "expected": expected}
        return CallbackProgress(self.on_progress, total, desc, unit, **kw)


NOT_IN_RESULT = ("force", "resume", "ray", "ray_workers")  # options that leave the bytes as they are


@dataclass
class ConvertOptions:
    """``rbe convert``'s options (``rbe convert --help`` says what each does)."""

    force: bool = False
    lossless: str = "byteplane"
    level: int = 0
    max_ratio: bool = False
    chain: str | None = None  # --codec
    recipe: str | None = None
    preset: str | None = None
    calibration: str | None = None  # a text file
    calibration_windows: int = 32
    tokenizer: str | None = None  # .onnx input: embedded, and calibrates in ONNX Runtime
    onnx: bool = False  # model directories: also store the architecture as an ONNX graph
    threads: int | None = None
    resume: bool = False  # go on from the state an interrupted calibrated conversion left
    ray: str | None = None  # encode on Ray: "local" starts one, else a cluster's address (ray_encode.py)
    ray_workers: int | None = None  # a local Ray's CPUs (default: the machine's)

    def __post_init__(self):
        if self.preset is not None:  # a misspelt name is refused where it is written, with "did you mean"
            from .compress.recipe import preset_name

            preset_name(self.preset)


@dataclass
class ConvertResult:
    """What a conversion wrote: the notes for the user and the numbers of the result line."""

    path: str  # the output, as its Reader names it
    notes: list[str]
    totals: dict  # ``evaluate.report.totals``: tensor_bytes, file_bytes, ratio, bits_per_weight, quality
    larger_than_dense: list[str] = field(default_factory=list)  # tensors their chain made larger
    warnings: list[str] = field(default_factory=list)  # what the reporter was warned of (a changed method, ...)


def convert_model(
    input: str, output: str, options: ConvertOptions | None = None, reporter: Reporter | None = None
) -> ConvertResult:
    """``rbe convert INPUT OUTPUT``: checks the output's place, builds the codec and the policy,
    reads the input (``sources.open_source``), calibrates, exports the graph (--onnx) and writes."""
    from .evaluate.report import larger_than_dense, tensor_rows, totals

    options = options or ConvertOptions()
    reporter = _KeepingWarnings(reporter or Reporter())  # a program reads them after, printed or not
    check_not_input(input, output)
    policy = policy_from_options(options.chain, options.recipe, options.preset)  # a usage error first
    check_input_exists(input)  # then a missing input, before the output's refusals
    check_rbe_output_name(output, options.force)
    check_target(output, options.force)
    check_parent(output)
    codec = lossless_codec(options.lossless, options.level, options.max_ratio)
    if is_onnx_input(input) or (is_rbe_input(input) and holds_onnx_model(input)):
        if options.onnx:
            raise UsageError(f"{input}: --onnx exports a Hugging Face model; an ONNX model keeps its own graph")
        convert = _convert_onnx
    elif options.tokenizer is not None:
        raise UsageError(
            "--tokenizer is for .onnx input or an .rbe converted from one (a model directory calibrates "
            "with its own tokenizer)"
        )
    else:
        convert = _convert_checkpoint
    _remove_stale_partials(output, reporter)
    with parallel.encoder_threads(options.threads):  # --threads bounds the encoders' threads too
        notes = convert(input, output, options, reporter, codec, policy)
    if is_rbe_input(input):
        for line in _lossy_input_note(input, output):
            reporter.warning(line)  # what the result line's quality means here: said even with --quiet
    with Reader(output) as r:
        rows = tensor_rows(r)
        return ConvertResult(r.path, notes, totals(r), larger_than_dense(rows), reporter.kept)


def _lossy_input_note(input: str, output: str) -> list[str]:
    """An .rbe input that stores tensors lossily: what the output's quality line compares with."""
    import math

    from .evaluate.report import lossy_rows as lossy_tensor_rows
    from .inputs import open_rbe

    with open_rbe(input, verify_checksums=False) as r:
        lossy_rows = lossy_tensor_rows(r)
    if not lossy_rows:
        return []
    weights = sum(math.prod(row["shape"]) for row in lossy_rows)
    lossy = f"{len(lossy_rows)} tensors ({weights:,} weights)"
    return [
        f"rbe: {output}: {input} holds {lossy} with lossy values: the quality of {output} is against those "
        f"values, not the model {input} was made from (rbe eval ORIGINAL {output} measures that)"
    ]


def _lossy_input_stats(source) -> dict[str, dict]:
    """What an .rbe input had lost of each tensor it stores lossily (``RbeSource.lossy_input_stats``)."""
    from .sources.rbe import RbeSource

    return source.lossy_input_stats() if isinstance(source, RbeSource) else {}


def _lone_file_note(input: str, source) -> str:
    """What a calibration of a lone .safetensors file reads beside it, and what the output lacks."""
    folder = source.root or "."
    return (
        f"rbe: {input}: calibrating with the model directory it lies in ({folder}: its config.json and "
        "tokenizer); the output holds this file's tensors alone: convert the directory to embed its config "
        "and tokenizer, which load_model and rbe eval need"
    )


def _config_of_the_model(source, policy: Policy) -> dict | None:
    """The config.json a level's recipe is chosen by: the input's own; for a single .safetensors file whose
    rules calibrate, that of the model directory it lies in, by which the calibration runs the model."""
    config = source.config()
    if config is None and isinstance(source, SafetensorsSource) and calibration_methods(source, policy):
        config = source.folder_config()
    return config


def _remove_stale_partials(output: str, reporter: Reporter) -> None:
    """Removes the partial files killed runs left beside the output (``atomic.remove_stale_partials``),
    and says so; not while a resume state is there, whose partial files ``--resume`` goes on from."""
    import os

    from .resume import state_dir

    if os.path.lexists(state_dir(output)):
        return
    removed = remove_stale_partials(output)
    if removed:
        reporter.warning(stale_partials_note(output, removed))


def _convert_checkpoint(input: str, output: str, options: ConvertOptions, reporter: Reporter, codec, policy):
    """A .safetensors file or a model directory (``sources/safetensors.py``), or an .rbe file of one
    (``sources/rbe.py``), calibrated with torch."""
    source = open_source(input)
    # --preset q4 on an encoder: encoder-q4
    policy, resolved = policy_for_model(policy, lambda: _config_of_the_model(source, policy))
    if calibration_methods(source, policy):
        extras.CALIBRATION.require()  # a missing extra is the run's only line
    if options.onnx:
        _check_graph_export(input)  # so are --onnx's refusals
    state = _resume_state(input, output, source, policy, options)
    if state is not None and not options.resume and not options.force and state.has_progress():
        raise OutputExistsError(  # kept hours of work are not thrown away unasked; said before any other line
            f"{output}: an interrupted run kept its work in {state.shown()}: pass --resume to go on from it, "
            "or --force to start again and remove it (resume=True / force=True from Python)"
        )
    if resolved:
        reporter.info(resolved)
    files = source.embedded_files()
    if files:
        reporter.info(embedding_note(input, files))
    elif isinstance(source, SafetensorsSource) and calibration_methods(source, policy):
        reporter.info(_lone_file_note(input, source))
    choose_chains(source, policy)  # a policy that changes no tensor is refused before the bar appears
    graph = _export_graph(input, source, options, reporter) if options.onnx else None
    if state is not None and not options.resume and state.has_progress():
        reporter.warning(
            f"rbe: {output}: starting again, removing what an interrupted run kept in {state.shown()} "
            "(--resume goes on from it)"
        )
    elif state is not None and not options.resume and state.exists():
        reporter.warning(  # a run killed before it kept any work: its folder goes, and is named
            f"rbe: {output}: removing {state.shown()}, which an interrupted run left before it kept any work"
        )
    try:
        return _convert_calibrated(input, output, options, reporter, codec, policy, source, graph, state)
    except BaseException as exc:
        if state is not None and not state.has_progress():
            state.clear()  # nothing a rerun could go on from: leave nothing behind
        elif state is not None and isinstance(exc, KeyboardInterrupt):  # a signal: say what a rerun can use
            reporter.warning(
                f"rbe: {output}: the calibration and the blocks encoded so far are kept in {state.shown()} "
                "(mixed precision scored on the model is scored again); the same command with --resume "
                "goes on from it"
            )
        raise


def _convert_calibrated(input, output, options, reporter, codec, policy, source, graph, state) -> list[str]:
    """``_convert_checkpoint`` once the source is open: calibration (or its resumed state), then the file."""
    with encoders_for(options) as encoders:
        if state is not None and state.start(options.resume):
            reporter.info(f"rbe: {output}: resuming the interrupted conversion")
            calibrations, text = state.load_statistics(), calibration_text(options)
            encoding_seconds = None
        else:
            if options.resume and state is not None and state.survey_started():
                reporter.info(f"rbe: {output}: resuming the interrupted survey")
            elif options.resume:
                reporter.info(f"rbe: {output}: no interrupted conversion to resume; starting")
            calibrations, text, encoding_seconds = _calibrations(source, policy, options, reporter, encoders, state)
            if state is not None:
                state.save_statistics(calibrations)
        notes = convert(
            input,
            output,
            plan=source,
            force=options.force,
            codec=codec,
            policy=policy,
            threads=options.threads,
            calibrations=calibrations,
            calibration_text=text,
            extra=graph.add_to if graph else None,
            resume=state,
            encoders=encoders,
            reporter=reporter,
            encoding_seconds=encoding_seconds,
        )
    return notes + ([graph.summary()] if graph else [])


def encoders_for(options: ConvertOptions):
    """A context holding where tensors are encoded: None (here), or a Ray cluster's ``RayEncoders``."""
    if options.ray is None:
        return contextlib.nullcontext(None)
    from .ray_encode import RayEncoders

    return RayEncoders(None if options.ray == "local" else options.ray, options.ray_workers)


def _resume_state(input: str, output: str, source, policy, options: ConvertOptions):
    """The resume state (``resume.py``) of a conversion encoded block by block; None for others, which
    have no blocks to go on from."""
    import os

    from .resume import ResumeState, fingerprint

    if not calibration_methods(source, policy) or not source.transformers_model:
        return None
    settings = {k: v for k, v in dataclasses.asdict(options).items() if k not in NOT_IN_RESULT}
    if os.path.isfile(input):  # a .safetensors or an .rbe file: the file is the input
        files = {os.path.basename(input): input}
    else:
        files = {rel: st.path for rel, st in source.safetensors}
        files.update(dict(source.others))
    if options.calibration:
        files["--calibration"] = options.calibration
    return ResumeState(output, fingerprint(settings, files))


def embedding_note(source: str, files: list[str]) -> str:
    """What a model directory's conversion embeds besides the weights, so that nothing goes in unseen."""
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return f"rbe: {source}: embedding {len(files)} file{'s' if len(files) != 1 else ''}: {shown}"


def _convert_onnx(input: str, output: str, options: ConvertOptions, reporter: Reporter, codec, policy) -> list[str]:
    """An .onnx file: its graph and initializers (``sources/onnx.py``), or an .rbe file converted from one
    (``sources/rbe.py``), calibrated in ONNX Runtime with a tokenizer (``compress/calibrate/ort.py``)."""
    source = open_source(input)
    tokenizer = _onnx_tokenizer(input, source, options)
    policy, resolved = _level_for_onnx(policy, source)
    policy, note = source.check_policy(policy, calibrating=tokenizer is not None)
    if note:  # a changed method, not progress: said even with --quiet
        reporter.warning(f"rbe: warning: {note}")
    choose_chains(source, policy)  # refused before the bar appears, as for safetensors
    methods = calibration_methods(source, policy, check_encoders=False) if tokenizer else {}
    if methods:
        extras.ORT_CALIBRATION.require()  # before the run's first line
    if resolved:
        reporter.info(resolved)
    if options.tokenizer is not None:
        reporter.info(f"rbe: {input}: embedding the tokenizer {options.tokenizer} as tokenizer.json")
    calibrations = _onnx_calibrations(input, source, methods, options, reporter, tokenizer) if tokenizer else None
    with encoders_for(options) as encoders:
        return convert(
            input,
            output,
            plan=source,
            force=options.force,
            codec=codec,
            policy=policy,
            threads=options.threads,
            calibrations=calibrations,
            encoders=encoders,
            reporter=reporter,
        )


def _level_for_onnx(policy: Policy, source) -> tuple[Policy, str | None]:
    """A level with an encoder recipe (q4: encoder-q4) becomes it on an encoder's graph (no ``logits``
    output), as on an encoder's directory; its mixed precision scores each layer's own error, since the
    model's drift is measured in transformers.  A causal LM's graph keeps the level."""
    from .compress.recipe import policy_from_preset
    from .sources.onnx import gives_logits

    variant = encoder_variant(policy.preset) if policy.preset else None
    if variant is None or gives_logits(source.graph):
        return policy, None
    encoder = dataclasses.replace(policy_from_preset(variant), budget_sensitivity="layer")
    return encoder, (
        f"rbe: preset {policy.preset} -> {variant} for an ONNX encoder (its graph gives no logits); its mixed "
        "precision scores each layer's own error (the model's drift is measured in transformers)"
    )


def calibration_text(options: ConvertOptions):
    """The calibration text of --calibration (default: pydoc's topics), --calibration-windows windows of it."""
    from .compress.calibrate import torch as calibrate

    text = calibrate.text_from_file(options.calibration) if options.calibration else calibrate.default_text()
    return calibrate.CalibrationText(text.text, text.source, text.window, options.calibration_windows)


def _onnx_tokenizer(input: str, source, options: ConvertOptions) -> tuple[bytes, str] | None:
    """(tokenizer.json's bytes, where they came from) for an ONNX model: --tokenizer's, which the output
    embeds (in place of one an .rbe input carries), else the one an .rbe input carries; None without
    either.  It calibrates the model and lets eval, a re-encoding and the loaders find it later."""
    from .sources.onnx import TOKENIZER_FILE, read_tokenizer_file

    if options.tokenizer is not None:
        data = read_tokenizer_file(options.tokenizer)
        source.added_files[TOKENIZER_FILE] = data
        return data, options.tokenizer
    if TOKENIZER_FILE in source.embedded_files():  # an .rbe converted from ONNX with --tokenizer
        return source.reader.read_file(TOKENIZER_FILE), f"{input} (its {TOKENIZER_FILE})"
    return None


def _onnx_calibrations(
    input: str, source, methods: dict, options: ConvertOptions, reporter: Reporter, tokenizer
) -> dict:
    """The statistics of the calibrated rules' ``methods`` from ONNX Runtime runs (``calibrate/ort.py``),
    with ``tokenizer`` (``_onnx_tokenizer``'s)."""
    from .compress.calibrate import ort as onnx_calibrate
    from .sources.onnx import filled_model

    if not methods:
        return {}
    data, where = tokenizer
    text = calibration_text(options)
    reporter.info(
        f"rbe: {input}: calibrating {len(methods)} weights in ONNX Runtime on {text.source}, tokenized by {where}"
    )
    tokenizer = onnx_calibrate.tokenizer_from_json(data, where)
    stage = lambda total: reporter.stage(total, "calibrate", "sentences")  # noqa: E731
    return onnx_calibrate.collect(filled_model(source), methods, text, tokenizer, options.threads, input, stage)


def _check_graph_export(input: str) -> None:
    """--onnx's refusals and its extra, before any line of the run."""
    import os

    if is_rbe_input(input):
        raise UsageError(
            f"{input}: --onnx exports a model's architecture from its directory; an .rbe input keeps the "
            f"graph it carries, if any (decode {input} to a directory and convert that with --onnx)"
        )
    if os.path.isfile(input):
        raise UsageError(
            f"{input}: --onnx exports a model's architecture, which needs its directory "
            "(config.json beside the weights), not a single .safetensors file"
        )
    extras.ONNX_EXPORT.require()  # before onnx_export's imports, which would name a narrower extra


def _export_graph(input: str, source, options: ConvertOptions, reporter: Reporter):
    """--onnx: the model's architecture exported with torch and wired to its tensors (``onnx_export``);
    ``_check_graph_export`` has passed."""
    from . import onnx_export

    reporter.info(f"rbe: {input}: exporting the architecture to ONNX with torch")
    # One step that can last minutes on a large model: the stage's heartbeat shows its clock meanwhile.
    with reporter.stage(1, "export", "graph") as bar:
        bar.label("torch.onnx.export")
        graph = onnx_export.export_graph(source, options.threads)
        bar.update(1)
    return graph


# The block by block encoding after a survey takes about this many times the survey's time (q4 on
# Llama shapes, 2 cores: 1.55 at 2.9 B, 1.8 at 6.7 B, where GPTQ's share grows with the width).
ENCODE_PER_SURVEY = 1.7


def _after_the_survey(source, policy, text):
    """What the calibration stage's lines predict for the encoding after it (``progress``'s ``later``):
    a survey's blocks, encoded block by block, take ``ENCODE_PER_SURVEY`` times its own pace; None where
    the stages after it are not known from it (statistics held at once, mixed precision measured on
    the model)."""
    if not source.transformers_model or (policy.budget_sensitivity == "model" and policy.budget_bits is not None):
        return None
    return lambda seconds_per_window: seconds_per_window * text.windows * ENCODE_PER_SURVEY


def _calibrations(
    source, policy, options: ConvertOptions, reporter: Reporter, encoders=None, state=None
) -> tuple[dict, object, float | None]:
    """Runs the calibration text through the model when the policy's rules ask for it (a bar of windows);
    returns the statistics, the text (which the block-by-block encoding runs again) and the seconds
    the encoding after a survey is expected to take (None when not known).  ``state`` (a resume
    state) keeps the survey's progress block by block."""
    if not calibration_methods(source, policy):
        return {}, None, None
    extras.CALIBRATION.require()  # before the stage's first line
    text = calibration_text(options)
    after = _after_the_survey(source, policy, text)
    start = time.monotonic()
    with reporter.windows_bar(text.windows, after) as bar:
        calibrations = calibrate_for(
            source, policy, text, options.threads, bar.update, label=bar.label, encoders=encoders, state=state
        )
    expected = after((time.monotonic() - start) / text.windows) if after else None
    return calibrations, text, expected
