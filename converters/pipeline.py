"""One conversion pipeline for every input: a tensor source to one rbe file.

``convert`` writes a ``TensorSource`` (``converters/sources/``: a safetensors
file, a Hugging Face model directory, an .onnx file) into a container: each
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
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rbeformat import Reader, UsageError, Writer
from rbeformat.atomic import check_parent, check_target
from rbeformat.chain import Chain
from rbeformat.codecs.blob.byteplane import DEFAULT_SPLIT_GAIN, Byteplane
from rbeformat.codecs.blob.raw import Raw
from rbeformat.codecs.core.base import Codec
from rbeformat.codecs.util import parallel
from rbeformat.values import to_float32

from .compress.plan import Statistics, calibrate_for, calibration_methods, choose_chains, mixed_precision, prune_heads
from .compress.recipe import Policy, lossless_policy
from .sources import TensorSource, is_onnx_input, load, open_source

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
    file.  Returns notes for the user (a changed policy, what head pruning
    removed).
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
    alone.update(mixed_precision(source, policy, stats, set(alone), pruned, calibration_text, threads))
    with Writer(dst, force=force, codec=codec, threads=threads, progress=progress) as w:
        checkpoint = resume.load_block() if resume is not None else None
        if checkpoint is not None:
            w.resume(checkpoint[1])
        if resume is not None:
            resume.own_partial(w.partial_name)
        chains = store_shared(w, source, alone, groups)
        done = set()
        if sequential and stats.methods and source.transformers_model:
            done = _encode_sequentially(
                w,
                source,
                chains,
                stats,
                calibration_text,
                threads,
                blocks_progress,
                pruned,
                resume,
                checkpoint,
                encoders,
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

        metadata = source.add_entries(w, add_tensor)
        if extra is not None:
            metadata.update(extra(w))
        w.set_metadata(metadata)
    if resume is not None:
        resume.clear()
    return [note for note in (note, pruning) if note]


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
    """What a conversion tells its user on the way.  The default tells nothing and shows no bar."""

    def info(self, line: str) -> None:
        """Progress worth a line (what is embedded, what runs now); ``rbe convert --quiet`` drops it."""

    def warning(self, line: str) -> None:
        """A changed method or a refusal's reason: said even when quiet."""

    def bar(self, total: int, desc: str):
        """A context manager whose ``update(n)`` counts ``n`` of ``total`` bytes."""
        return _NoBar()

    def windows_bar(self, total: int):
        """A context manager whose ``update(n)`` counts (fractions of) ``total`` calibration windows."""
        return _NoBar()

    def blocks_bar(self, total: int):
        """A context manager whose ``update(n)`` counts blocks encoded of ``total`` and whose ``label(text)``
        says what runs now (block by block encoding); ``resumed(n)``, where it has one, counts the blocks
        a resumed conversion did before."""
        return _NoBar()


class StderrReporter(Reporter):
    """Lines and warnings on stderr, progress as plain lines (``progress.LineProgress``), never a bar:
    for a script that converts and wants to see what happens, or a log."""

    def info(self, line: str) -> None:
        print(line, file=sys.stderr)

    def warning(self, line: str) -> None:
        print(line, file=sys.stderr)

    def bar(self, total: int, desc: str):
        from .progress import LineProgress

        return LineProgress(total, desc, "MB", count_format="{n:.1f}/{total:.1f}", scale=1e6)

    def windows_bar(self, total: int):
        from .progress import LineProgress

        return LineProgress(total, "calibrate", "windows", count_format="{n:.1f}/{total:.0f}")

    def blocks_bar(self, total: int):
        from .progress import LineProgress

        return LineProgress(total, "encode", "blocks")


class _NoBar(contextlib.nullcontext):
    def __enter__(self):
        return self

    def update(self, n: float = 1) -> None:
        pass

    def resumed(self, n: float) -> None:
        pass

    def label(self, text: str) -> None:
        pass


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
    tokenizer: str | None = None  # .onnx input: calibrate in ONNX Runtime with it
    onnx: bool = False  # model directories: also store the architecture as an ONNX graph
    threads: int | None = None
    resume: bool = False  # go on from the state an interrupted calibrated conversion left
    ray: str | None = None  # encode on Ray: "local" starts one, else a cluster's address (ray_encode.py)
    ray_workers: int | None = None  # a local Ray's CPUs (default: the machine's)


@dataclass
class ConvertResult:
    """What a conversion wrote: the notes for the user and the numbers of the result line."""

    path: str  # the output, as its Reader names it
    notes: list[str]
    totals: dict  # ``evaluate.report.totals``: tensor_bytes, file_bytes, ratio, bits_per_weight, quality
    larger_than_dense: list[str] = field(default_factory=list)  # tensors their chain made larger


def convert_model(
    input: str, output: str, options: ConvertOptions | None = None, reporter: Reporter | None = None
) -> ConvertResult:
    """``rbe convert INPUT OUTPUT``: checks the output's place, builds the codec and the policy,
    reads the input (``sources.open_source``), calibrates, exports the graph (--onnx) and writes."""
    from .evaluate.report import larger_than_dense, tensor_rows, totals

    options = options or ConvertOptions()
    reporter = reporter or Reporter()
    check_target(output, options.force)
    check_parent(output)
    codec = lossless_codec(options.lossless, options.level, options.max_ratio)
    policy = policy_from_options(options.chain, options.recipe, options.preset)
    if is_onnx_input(input):
        if options.onnx:
            raise UsageError(f"{input}: --onnx exports a Hugging Face model; an .onnx input keeps its own graph")
        convert = _convert_onnx
    elif options.tokenizer is not None:
        raise UsageError("--tokenizer is for .onnx input (a model directory calibrates with its own tokenizer)")
    else:
        convert = _convert_checkpoint
    with parallel.encoder_threads(options.threads):  # --threads bounds the encoders' threads too
        notes = convert(input, output, options, reporter, codec, policy)
    with Reader(output) as r:
        rows = tensor_rows(r)
        return ConvertResult(r.path, notes, totals(r), larger_than_dense(rows))


def _convert_checkpoint(input: str, output: str, options: ConvertOptions, reporter: Reporter, codec, policy):
    """A .safetensors file or a model directory (``sources/safetensors.py``), calibrated with torch."""
    source = open_source(input)
    files = source.embedded_files()
    if files:
        reporter.info(embedding_note(input, files))
    choose_chains(source, policy)  # a policy that changes no tensor is refused before the bar appears
    graph = _export_graph(input, source, options, reporter) if options.onnx else None
    state = _resume_state(input, output, source, policy, options)
    with encoders_for(options) as encoders:
        if state is not None and state.start(options.resume):
            reporter.info(f"rbe: {output}: resuming the interrupted conversion")
            calibrations, text = state.load_statistics(), calibration_text(options)
        else:
            if options.resume and state is not None and state.survey_started():
                reporter.info(f"rbe: {output}: resuming the interrupted survey")
            elif options.resume:
                reporter.info(f"rbe: {output}: no interrupted conversion to resume; starting")
            calibrations, text = _calibrations(source, policy, options, reporter, encoders, state)
            if state is not None:
                state.save_statistics(calibrations)
        blocks = _sequential_blocks(source, calibrations, input)
        with reporter.bar(source.tensor_bytes, "convert") as bar, reporter.blocks_bar(blocks) as blocks_bar:
            notes = convert(
                input,
                output,
                plan=source,
                force=options.force,
                codec=codec,
                policy=policy,
                threads=options.threads,
                progress=bar.update,
                calibrations=calibrations,
                calibration_text=text,
                blocks_progress=blocks_bar if blocks else None,
                extra=graph.add_to if graph else None,
                resume=state,
                encoders=encoders,
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
    import dataclasses
    import os

    from .resume import ResumeState, fingerprint

    if not calibration_methods(source, policy) or not source.transformers_model:
        return None
    settings = {k: v for k, v in dataclasses.asdict(options).items() if k not in NOT_IN_RESULT}
    files = {rel: st.path for rel, st in source.safetensors}
    files.update(dict(source.others))
    if options.calibration:
        files["--calibration"] = options.calibration
    if os.path.isfile(input):
        files = {os.path.basename(input): input}
    return ResumeState(output, fingerprint(settings, files))


def _sequential_blocks(source, calibrations, input: str) -> int:
    """How many blocks the block by block encoding goes through (0 when nothing is calibrated)."""
    methods = calibrations.methods if hasattr(calibrations, "methods") else calibrations
    if not methods or not source.transformers_model:
        return 0
    from .compress.calibrate import torch as calibrate

    return calibrate.sequential_steps(source.root)


def embedding_note(source: str, files: list[str]) -> str:
    """What a model directory's conversion embeds besides the weights, so that nothing goes in unseen."""
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return f"rbe: {source}: embedding {len(files)} file{'s' if len(files) != 1 else ''}: {shown}"


def _convert_onnx(input: str, output: str, options: ConvertOptions, reporter: Reporter, codec, policy) -> list[str]:
    """An .onnx file: its graph and initializers (``sources/onnx.py``), calibrated in ONNX Runtime
    with a tokenizer (``compress/calibrate/ort.py``)."""
    source = open_source(input)
    policy, note = source.check_policy(policy, calibrating=options.tokenizer is not None)
    if note:  # a changed method, not progress: said even with --quiet
        reporter.warning(f"warning: {note}")
    choose_chains(source, policy)  # refused before the bar appears, as for safetensors
    calibrations = _onnx_calibrations(input, source, policy, options, reporter) if options.tokenizer else None
    with reporter.bar(source.tensor_bytes, "convert") as bar, encoders_for(options) as encoders:
        return convert(
            input,
            output,
            plan=source,
            force=options.force,
            codec=codec,
            policy=policy,
            threads=options.threads,
            progress=bar.update,
            calibrations=calibrations,
            encoders=encoders,
        )


def calibration_text(options: ConvertOptions):
    """The calibration text of --calibration (default: pydoc's topics), --calibration-windows windows of it."""
    from .compress.calibrate import torch as calibrate

    text = calibrate.text_from_file(options.calibration) if options.calibration else calibrate.default_text()
    return calibrate.CalibrationText(text.text, text.source, text.window, options.calibration_windows)


def _onnx_calibrations(input: str, source, policy, options: ConvertOptions, reporter: Reporter) -> dict:
    """--tokenizer: the calibrated rules' statistics from ONNX Runtime runs (``calibrate/ort.py``)."""
    from .compress.calibrate import ort as onnx_calibrate
    from .sources.onnx import filled_model

    methods = calibration_methods(source, policy, check_encoders=False)
    if not methods:
        return {}
    tokenizer = onnx_calibrate.load_tokenizer(options.tokenizer)
    text = calibration_text(options)
    reporter.info(f"rbe: {input}: calibrating {len(methods)} weights in ONNX Runtime on {text.source}")
    return onnx_calibrate.collect(filled_model(source), methods, text, tokenizer, options.threads, input)


def _export_graph(input: str, source, options: ConvertOptions, reporter: Reporter):
    """--onnx: the model's architecture exported with torch and wired to its tensors (``onnx_export``)."""
    import os

    if os.path.isfile(input):
        raise UsageError(
            f"{input}: --onnx exports a model's architecture, which needs its directory "
            "(config.json beside the weights), not a single .safetensors file"
        )
    from . import onnx_export

    reporter.info(f"rbe: {input}: exporting the architecture to ONNX with torch")
    return onnx_export.export_graph(source, options.threads)


def _calibrations(
    source, policy, options: ConvertOptions, reporter: Reporter, encoders=None, state=None
) -> tuple[dict, object]:
    """Runs the calibration text through the model when the policy's rules ask for it (a bar of windows);
    returns the statistics and the text (which the block-by-block encoding runs again).  ``state``
    (a resume state) keeps the survey's progress block by block."""
    if not calibration_methods(source, policy):
        return {}, None
    text = calibration_text(options)
    with reporter.windows_bar(text.windows) as bar:
        calibrations = calibrate_for(
            source, policy, text, options.threads, bar.update, label=bar.label, encoders=encoders, state=state
        )
        return calibrations, text
