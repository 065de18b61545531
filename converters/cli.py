"""The ``rbe`` command.

Exit codes (also in ``rbe --help`` and spec/rbe-v1.md section 11.2):
  0   success
  1   ``rbe verify`` found damage
  2   usage error: bad arguments or option values (a codec chain, a recipe), or an
      output whose directory does not exist
  3   invalid input, an invalid or unsupported rbe file, or a system error
      (unreadable file, disk full, out of memory)
  4   the output exists and --force was not given
  70  internal error: a bug in rbe
  128+N  stopped by signal N: 129 SIGHUP, 130 SIGINT (Ctrl-C), 143 SIGTERM; 141 when
      the program reading stdout went away (``rbe info | head``)

Every failure is one line on stderr starting ``rbe: error:``, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import struct
import sys
import threading

import zstandard

from rbeformat import FormatError, InputError, OutputExistsError, RbeError, Reader, UsageError, __version__, budget
from rbeformat.atomic import check_directory_target, check_parent, check_target
from rbeformat.codecs.blob.byteplane import DEFAULT_SPLIT_GAIN, Byteplane
from rbeformat.codecs.blob.raw import Raw
from rbeformat.embedded.onnx import GRAPH_KEY, MAPPING_KEY
from rbeformat.spec import FOOTER_MAGIC, FOOTER_SIZE, FORMAT_MAJOR, FORMAT_MINOR, MAGIC

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE, EXIT_ERROR, EXIT_EXISTS = 0, 1, 2, 3, 4
EXIT_BUG = 70  # EX_SOFTWARE of sysexits.h
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a program killed by SIGPIPE
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# --lossless: how tensors without a chain are stored, by option value (the first is the default)
LOSSLESS_CODECS = {
    "byteplane": lambda level, split_gain: Byteplane(level=level, split_gain=split_gain),
    "raw": lambda level, split_gain: Raw(),
}

EPILOG = """exit codes: 0 success; 1 verify found damage; 2 usage error; 3 invalid input or rbe file;
4 output exists (use --force); 70 internal error (a bug in rbe); 128+N stopped by signal N
(129 SIGHUP, 130 SIGINT, 143 SIGTERM), 141 stdout closed"""

QUIET_HELP = "no progress bar and no result line (warnings and errors still print)"


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread so that every output is cleaned up on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    """argparse, reporting a bad command line in one line like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"rbe: error: {message} (see '{self.prog} --help')\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None


def memory_size(text: str) -> int:
    try:
        return budget.parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MAX_MEMORY_HELP = (
    "most memory a file's numbers may make rbe allocate at once (a decoded tensor with its "
    "working memory, an embedded file read whole, the manifest): bytes or e.g. 500M, 2G; "
    "default: half the available memory, and at most 256 times a container's size (at least 1 GiB)"
)


def zstd_level(text: str) -> int:
    level = _integer(text)
    if not 0 <= level <= 22:
        raise argparse.ArgumentTypeError(f"must be 0 (rbe's preset) or a zstd level 1-22, not {level}")
    return level


def thread_count(text: str) -> int:
    threads = _integer(text)
    if threads < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {threads}")
    return threads


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a positive number of seconds, not {text}")
    return value


def window_length(text: str) -> int:
    tokens = _integer(text)
    if tokens < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens (one predicted from one), not {tokens}")
    return tokens


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rbe", description="Convert, inspect and verify rbe weight containers.", epilog=EPILOG)
    parser.add_argument(
        "--version", action="version", version=f"rbe {__version__} (format {FORMAT_MAJOR}.{FORMAT_MINOR})"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="safetensors file, HF model directory or ONNX model -> .rbe", epilog=EPILOG)
    p.add_argument("input", help="a .safetensors file, a Hugging Face model directory or an .onnx file")
    p.add_argument("output", help="the .rbe file to write (its directory must exist)")
    p.add_argument(
        "--lossless",
        choices=list(LOSSLESS_CODECS),
        default="byteplane",
        help="how tensors without a chain are stored: byteplane (compressed, default) or raw (uncompressed, mmappable)",
    )
    p.add_argument(
        "--level",
        type=zstd_level,
        default=0,
        help="zstd level for byteplane planes, 1-22; 0 (default) is rbe's tuned preset",
    )
    choice = p.add_mutually_exclusive_group()
    choice.add_argument(
        "--codec",
        dest="chain",
        metavar="CHAIN",
        help="a codec chain for every 2-D floating-point tensor, e.g. "
        "'gquant(bits=4, group=32)'; other tensors stay lossless",
    )
    choice.add_argument(
        "--recipe", metavar="FILE", help="a TOML recipe mapping tensor roles and name patterns to chains"
    )
    choice.add_argument("--preset", metavar="NAME", help="a built-in recipe, e.g. q4 (list them: rbe presets)")
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="text for the rules that calibrate (gptq, wanda): default, the half of Python's "
        "pydoc_data.topics that rbe eval never scores",
    )
    p.add_argument(
        "--calibration-windows",
        type=thread_count,
        default=32,
        metavar="N",
        help="windows of 512 tokens of calibration text to run (default 32)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help=".onnx input: a tokenizer.json (or a folder holding one) to calibrate with in ONNX "
        "Runtime; without it, calibrated rules round to nearest",
    )
    p.add_argument(
        "--max-ratio",
        action="store_true",
        help="byteplane: condition mantissa bytes on the exponent wherever it saves anything "
        "(files ~0.1-0.3%% smaller, decode several times slower)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="model directories: also store the architecture as an ONNX graph (exported with torch) "
        "wired to the stored weights, so that ONNX Runtime runs the .rbe without torch "
        "(encoders and causal LMs; needs torch, transformers and onnxscript)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _common(p)

    p = sub.add_parser(
        "decode", help=".rbe -> HF model directory, one .safetensors file or an ONNX model", epilog=EPILOG
    )
    p.add_argument("input", help="the .rbe file")
    p.add_argument(
        "output",
        help="a directory, a path ending in .safetensors for a single file, or one ending "
        "in .onnx for a container converted from ONNX",
    )
    p.add_argument("--no-verify", action="store_true", help="skip checking decoded bytes against their sha256")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an existing directory, replacing only the files the container holds "
        "(other files stay and are listed), or overwrite an existing .safetensors file",
    )
    _common(p)

    p = sub.add_parser(
        "export-onnx",
        help=".rbe converted from ONNX -> .onnx, dense or with weights kept compressed (--on-the-fly)",
        epilog=EPILOG,
    )
    p.add_argument("input", help="an .rbe file converted from an .onnx model")
    p.add_argument("output", help="the .onnx file to write (past 2 GB with OUTPUT.data beside it)")
    p.add_argument(
        "--on-the-fly",
        action="store_true",
        help="keep quantized weights compressed, expanded inside the graph as it runs "
        "(MatMulNBits, GatherBlockQuantized; other weights dense): any onnxruntime session "
        "opens it; prints which form each weight took",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--no-verify", action="store_true", help="skip checking decoded bytes against their sha256")
    _common(p)

    p = sub.add_parser("info", help="list tensors, codecs, sizes and bits per weight", epilog=EPILOG)
    p.add_argument("input")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _max_memory(p)

    p = sub.add_parser("presets", help="list the built-in recipes for rbe convert --preset", epilog=EPILOG)
    p.set_defaults(input="rbe presets")  # what an error message names

    p = sub.add_parser("verify", help="check every checksum; non-zero exit names the damage", epilog=EPILOG)
    p.add_argument("input")
    p.add_argument("--deep", action="store_true", help="also decode everything and check sha256 digests")
    p.add_argument("--quiet", action="store_true", help="print nothing; only the exit code tells")
    _max_memory(p)

    p = sub.add_parser(
        "eval", help="quality of compressed .rbe files against the original (needs the hf extra)", epilog=EPILOG
    )
    p.add_argument("input", metavar="ORIGINAL", help="a HF model directory, a .safetensors file in one, or an .rbe")
    p.add_argument("compressed", metavar="COMPRESSED.rbe", nargs="+", help="rbe files of the same model")
    p.add_argument(
        "--text",
        metavar="FILE",
        help="causal LMs: a UTF-8 text for perplexity (default: the evaluation part of pydoc_data.topics)",
    )
    p.add_argument(
        "--sentences",
        metavar="FILE",
        help="encoders: one sentence per line (default: 256 sentences of the evaluation part of pydoc_data.topics)",
    )
    p.add_argument("--window", type=window_length, help="causal LMs: tokens per window, at least 2 (default 512)")
    p.add_argument(
        "--windows",
        type=thread_count,
        help="causal LMs: how many windows, at least 1 (default 16, or as many as the text holds)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="OUT.png", help="draw quality against bits per weight into this PNG file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="threads for torch and decoding, at least 1 (default: CPU count)",
    )
    _max_memory(p)

    p = sub.add_parser(
        "run",
        help="run a .rbe converted with --onnx in ONNX Runtime: an encoder's embedding or a "
        "causal LM's greedy continuation (needs the ort extra, no torch)",
        epilog=EPILOG,
    )
    p.add_argument("input", metavar="MODEL.rbe", help="an .rbe file converted from a model directory with --onnx")
    p.add_argument("text", help="the text to embed, or the prompt to continue")
    p.add_argument(
        "--max-new-tokens",
        type=thread_count,
        default=32,
        metavar="N",
        help="causal LMs: tokens to generate at most, at least 1 (default 32)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (an encoder's whole embedding)")
    p.add_argument(
        "--threads", type=thread_count, default=None, help="ONNX Runtime threads, at least 1 (default: CPU count)"
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=RUN_TIMEOUT,
        metavar="SECONDS",
        help=f"stop the graph (building its session included) after this many seconds, exit 3; "
        f"0 for no limit (default {RUN_TIMEOUT:g}: a stored graph is a program, and can loop "
        "forever); SIGINT and SIGTERM stop it at any time",
    )
    _max_memory(p)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.add_argument("--threads", type=thread_count, default=None, help="worker threads, at least 1 (default: CPU count)")
    _max_memory(p)


def _max_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE", help=MAX_MEMORY_HELP)


# -- running a command and reporting its failure --------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code.  Called as the program (``argv`` None), a command stopped by
    a signal ends the process as soon as its own cleanup is done (``_end_stopped_process``)."""
    args = build_parser().parse_args(argv)
    previous = budget.configured_limit()
    if getattr(args, "max_memory", None) is not None:
        budget.set_limit(args.max_memory)  # for every Reader and check of this command (rbeformat.budget)
    try:
        with _stop_signals_raise():
            code = _run(args)
    except Interrupted as exc:  # arrived after the command ended, while its outcome was reported
        code = 128 + exc.signum
    finally:
        budget.set_limit(previous)
    if argv is None and code in STOPPED_CODES:
        _end_stopped_process(code)
    return code


STOPPED_CODES = frozenset(128 + s for s in STOP_SIGNALS)


def _end_stopped_process(code: int) -> None:
    """Exits now, as the stop signal's default action would, once the unwinding has removed every partial
    output and the message is out: no waiting at interpreter exit for worker threads still running
    (a pool's queued work, a torch or transformers loader's copies) or for the teardown of a large heap
    (a calibrating convert holds the model and its statistics)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe nobody reads
            pass
    os._exit(code)


def _run(args) -> int:
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows up here, still inside the handlers below
        return code
    except Interrupted as exc:
        _stderr(f"rbe: interrupted ({exc})")
        return 128 + exc.signum
    except KeyboardInterrupt:
        _stderr("rbe: interrupted")
        return 128 + signal.SIGINT
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        code, message = describe_failure(exc, args)
        _stderr(f"rbe: error: {message}")
        return code


def describe_failure(exc: Exception, args) -> tuple[int, str]:
    """The exit code and the one-line message for an exception that ends a command."""
    subject = args.input
    if isinstance(exc, OutputExistsError):
        return EXIT_EXISTS, str(exc)
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, RbeError):
        return EXIT_ERROR, _about(subject, str(exc))
    if isinstance(exc, MemoryError):
        return EXIT_ERROR, f"{subject}: out of memory; try --threads 1, or a machine with more memory"
    if isinstance(exc, zstandard.ZstdError):
        return EXIT_ERROR, _about(subject, f"zstd: {exc}")
    if isinstance(exc, OSError):
        return EXIT_ERROR, _system_error(exc, args)
    if isinstance(exc, ValueError) and _raised_in_codec(exc):
        return EXIT_ERROR, _about(subject, str(exc))
    return EXIT_BUG, (
        f"internal error, a bug in rbe: {type(exc).__name__}: {exc}; please report it with the command that caused it"
    )


def _about(subject: str, message: str) -> str:
    """Names the file a message concerns, unless the message already does."""
    return message if subject in message else f"{subject}: {message}"


def _system_error(exc: OSError, args) -> str:
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        return f"{target}: {reason}"
    output = getattr(args, "output", None)  # a failed write (disk full) names no file
    return f"{args.input} -> {output}: {reason}" if output else f"{args.input}: {reason}"


def _raised_in_codec(exc: BaseException) -> bool:
    """A ValueError from a codec is about the data or its settings, not a bug elsewhere."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith(("rbeformat.codecs", "rbeformat.chain")):
            return True
        tb = tb.tb_next
    return False


def _stderr(line: str) -> None:
    print(" ".join(line.split()), file=sys.stderr)  # one line, whatever the message held


def _stdout_to_devnull() -> None:
    """Python's recipe for a closed stdout: later flushes (at exit too) go nowhere, quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured)
        pass


@contextlib.contextmanager
def _stop_signals_raise():
    """SIGTERM and SIGHUP stop rbe as Ctrl-C does: by an exception that removes partial outputs."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; embedded callers keep theirs
        return
    previous = {}

    def stop(signum, frame):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        raise Interrupted(signum)

    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # nohup and background jobs ignore some on purpose
            previous[s] = signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# -- opening inputs -------------------------------------------------------------------


def open_rbe(path: str, **kwargs) -> Reader:
    """A Reader, or one error that says what the file is when it is not an rbe file."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an rbe file; to make one: rbe convert {path} out.rbe")
    try:
        return Reader(path, **kwargs)
    except FormatError:
        if _looks_like_rbe(path):
            raise
        raise InputError(_not_rbe(path)) from None


def _looks_like_rbe(path: str) -> bool:
    """An rbe header or footer magic: a damaged rbe file, whose own error says more."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - FOOTER_SIZE))
            tail = fh.read(len(FOOTER_MAGIC))
    except OSError:
        return True
    return head == MAGIC or tail == FOOTER_MAGIC


def _not_rbe(path: str) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
        size = os.fstat(fh.fileno()).st_size
    if not head:
        return f"{path}: not an rbe file (it is empty)"
    kind = _file_kind(head, size)
    if kind == "a safetensors file":
        return f"{path}: not an rbe file (it looks like {kind}); to make one: rbe convert {path} out.rbe"
    if kind:
        return (
            f"{path}: not an rbe file (it looks like {kind}); rbe converts .safetensors files and "
            "Hugging Face model directories"
        )
    return f"{path}: not an rbe file (it starts with {head[:8]!r}; an rbe file starts with {MAGIC!r})"


def _file_kind(head: bytes, size: int) -> str | None:
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "a safetensors file"
    kinds = {
        b"GGUF": "a GGUF file",
        b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)",
        b"\x93NUMPY": "a numpy .npy file",
        b"\x89HDF\r\n\x1a\n": "an HDF5 file (a Keras checkpoint?)",
    }
    for magic, kind in kinds.items():
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a PyTorch checkpoint?)"
    return None


# -- commands -------------------------------------------------------------------------

BAR_DELAY = 1.0  # seconds


def _progress_bar(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    # Decimal units with the B spelled out, as the summary line and `rbe info` print sizes.  The bar waits
    # BAR_DELAY seconds before it first draws, so that a refusal found by the checks at the start (a link in
    # the output, a stored graph naming a file) is the one line on stderr.
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=desc,
        disable=quiet,
        file=sys.stderr,
        leave=False,
        delay=BAR_DELAY,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]",
    )


def cmd_convert(args) -> int:
    from .compress.recipe import lossless_policy, policy_from_codec, policy_from_preset, policy_from_recipe
    from .evaluate.report import larger_than_dense, tensor_rows
    from .hf import choose_chains, convert, plan_conversion

    check_target(args.output, args.force)
    check_parent(args.output)
    split_gain = 0.0 if args.max_ratio else DEFAULT_SPLIT_GAIN
    codec = LOSSLESS_CODECS[args.lossless](level=args.level, split_gain=split_gain)
    if args.chain is not None:  # an empty --codec "" is an error, not a lossless file
        policy = policy_from_codec(args.chain)
    elif args.recipe is not None:
        policy = policy_from_recipe(args.recipe)
    elif args.preset is not None:
        policy = policy_from_preset(args.preset)
    else:
        policy = lossless_policy()
    if os.path.isfile(args.input) and args.input.lower().endswith(".onnx"):
        if args.onnx:
            raise UsageError(f"{args.input}: --onnx exports a Hugging Face model; an .onnx input keeps its own graph")
        notes = _convert_onnx(args, codec, policy)
    elif args.tokenizer is not None:
        raise UsageError("--tokenizer is for .onnx input (a model directory calibrates with its own tokenizer)")
    else:
        plan = plan_conversion(args.input)
        if plan.others and not args.quiet:
            _stderr(_embedding_note(args.input, [rel for rel, _ in plan.others]))
        choose_chains(plan, policy)  # a policy that changes no tensor is refused before the bar appears
        graph = _export_graph(plan, args) if args.onnx else None
        calibrations, text = _calibrations(plan, policy, args)
        with _progress_bar(input_tensor_bytes(plan), args.quiet, "convert") as bar:
            notes = convert(
                args.input,
                args.output,
                force=args.force,
                codec=codec,
                policy=policy,
                threads=args.threads,
                progress=bar.update,
                calibrations=calibrations,
                calibration_text=text,
                extra=graph.add_to if graph else None,
            )
        notes += [graph.summary()] if graph else []
    with Reader(args.output) as r:
        rows = tensor_rows(r)
        if not args.quiet:
            for note in notes:
                _stderr(note)
            _stderr(_summary_line(r))
    _warn_larger_than_dense(larger_than_dense(rows))
    return EXIT_OK


def _embedding_note(source: str, files: list[str]) -> str:
    """What a model directory's conversion embeds besides the weights, so that nothing goes in unseen."""
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return f"rbe: {source}: embedding {len(files)} file{'s' if len(files) != 1 else ''}: {shown}"


def _convert_onnx(args, codec, policy) -> list[str]:
    """An .onnx file: its graph and initializers (``converters/onnx_io.py``), calibrated in ONNX Runtime
    with --tokenizer (``converters/compress/calibrate/ort.py``)."""
    from . import onnx_io
    from .hf import choose_chains

    plan = onnx_io.plan_conversion(args.input)
    policy, note = onnx_io.check_policy(plan, policy, calibrating=args.tokenizer is not None)
    if note:  # a changed method, not progress: said even with --quiet
        _stderr(f"warning: {note}")
    choose_chains(plan, policy, plan.roles)  # refused before the bar appears, as for safetensors
    calibrations = _onnx_calibrations(plan, policy, args) if args.tokenizer else None
    with _progress_bar(plan.tensor_bytes, args.quiet, "convert") as bar:
        return onnx_io.convert(
            args.input,
            args.output,
            force=args.force,
            codec=codec,
            policy=policy,
            threads=args.threads,
            progress=bar.update,
            plan=plan,
            calibrations=calibrations,
        )


def _onnx_calibrations(plan, policy, args) -> dict:
    """--tokenizer: the calibrated rules' statistics from ONNX Runtime runs (``onnx_calibrate``)."""
    from . import onnx_io
    from .compress.calibrate import ort as onnx_calibrate
    from .compress.calibrate import torch as calibrate

    methods = onnx_io.calibration_methods(plan, policy)
    if not methods:
        return {}
    tokenizer = onnx_calibrate.load_tokenizer(args.tokenizer)
    text = calibrate.text_from_file(args.calibration) if args.calibration else calibrate.default_text()
    text = calibrate.CalibrationText(text.text, text.source, text.window, args.calibration_windows)
    if not args.quiet:
        _stderr(f"rbe: {args.input}: calibrating {len(methods)} weights in ONNX Runtime on {text.source}")
    return onnx_calibrate.collect(onnx_io.filled_model(plan), methods, text, tokenizer, args.threads, args.input)


def _export_graph(plan, args):
    """--onnx: the model's architecture exported with torch and wired to its tensors (``onnx_export``)."""
    if os.path.isfile(args.input):
        raise UsageError(
            f"{args.input}: --onnx exports a model's architecture, which needs its directory "
            "(config.json beside the weights), not a single .safetensors file"
        )
    from . import onnx_export

    if not args.quiet:
        _stderr(f"rbe: {args.input}: exporting the architecture to ONNX with torch")
    return onnx_export.export_graph(plan, args.threads)


def _calibrations(plan, policy, args) -> tuple[dict, object]:
    """Runs the calibration text through the model when the policy's rules ask for it (a bar per window);
    returns the statistics and the text (which the block-by-block encoding runs again)."""
    from .compress.calibrate import torch as calibrate
    from .hf import calibrate_for, calibration_methods

    if not calibration_methods(plan, policy):
        return {}, None
    text = calibrate.text_from_file(args.calibration) if args.calibration else calibrate.default_text()
    text = calibrate.CalibrationText(text.text, text.source, text.window, args.calibration_windows)
    from tqdm import tqdm

    # Sentences and the block-by-block survey report fractions of windows: show whole ones.
    with tqdm(
        total=text.windows,
        unit="window",
        desc="calibrate",
        disable=args.quiet,
        file=sys.stderr,
        leave=False,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} windows [{elapsed}<{remaining}]",
    ) as bar:
        return calibrate_for(plan, policy, text, args.threads, bar.update), text


def input_tensor_bytes(plan) -> int:
    """What the writer reports as progress: every tensor's bytes as the input stores them."""
    return sum(t.end - t.begin for _, st in plan.safetensors for t in st.tensors)


def _warn_larger_than_dense(names: list[str]) -> None:
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    noun = "tensor is" if len(names) == 1 else "tensors are"
    _stderr(
        f"rbe: warning: {len(names)} {noun} larger under their codec chain than dense (rank or bits too "
        f"high for the shape? a --recipe can keep them lossless): {shown}"
    )


def cmd_decode(args) -> int:
    from .evaluate.report import human_bytes
    from .hf import decode, decoded_tensor_bytes

    onnx = args.output.lower().endswith(".onnx")
    if args.output.endswith(".safetensors") or onnx:
        check_target(args.output, args.force)
        check_parent(args.output)
    else:
        check_directory_target(args.output, args.force)
    with open_rbe(args.input) as r:
        total = decoded_tensor_bytes(r)
    if onnx:
        return _decode_onnx(args, total)
    with _progress_bar(total, args.quiet, "decode") as bar:
        kept = decode(
            args.input,
            args.output,
            force=args.force,
            verify=not args.no_verify,
            threads=args.threads,
            progress=bar.update,
        )
    if kept:
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        noun = "file" if len(kept) == 1 else "files"
        _stderr(f"rbe: {args.output}: kept {len(kept)} {noun} not in the container: {shown}")
    if not args.quiet:
        _stderr(f"{args.output}: decoded from {args.input} ({human_bytes(total)} of tensors)")
    return EXIT_OK


def _decode_onnx(args, total: int) -> int:
    """A container converted from ONNX, back to an .onnx file (past 2 GB with a .data file beside it)."""
    from .evaluate.report import human_bytes
    from .onnx_io import decode

    with open_rbe(args.input) as r:
        exported = r.metadata().get(MAPPING_KEY) is not None
    if exported:  # a HF directory with its exported graph (rbe convert --onnx): wired by the mapping
        written = _decode_exported_graph(args)
    else:
        with _progress_bar(total, args.quiet, "decode") as bar:
            written = decode(
                args.input,
                args.output,
                force=args.force,
                verify=not args.no_verify,
                threads=args.threads,
                progress=bar.update,
            )
    if not args.quiet:
        beside = f", external data in {written[1]}" if len(written) > 1 else ""
        _stderr(f"{args.output}: decoded from {args.input} ({human_bytes(total)} of tensors{beside})")
    return EXIT_OK


def _decode_exported_graph(args) -> list[str]:
    """The dense .onnx of a graph exported at conversion, its initializers filled through the mapping."""
    from .onnx_export import dense_model

    with open_rbe(args.input, verify_checksums=not args.no_verify, threads=args.threads) as r:
        model = dense_model(r)
    return _write_onnx(model, args.output, args.force)


def cmd_export_onnx(args) -> int:
    """The ONNX model a container carries: dense (as ``rbe decode``), or on the fly (``rbe_loaders.ort``)."""
    check_target(args.output, args.force)
    check_parent(args.output)
    if not args.on_the_fly:
        with open_rbe(args.input) as r:
            from .hf import decoded_tensor_bytes

            total = decoded_tensor_bytes(r)
        return _decode_onnx(args, total)
    open_rbe(args.input, verify_checksums=False).close()  # one clear error for a file that is not rbe
    from rbe_loaders.ort import on_the_fly_model  # a loader; imported only for this command

    model, report = on_the_fly_model(args.input)
    written = _write_onnx(model, args.output, args.force)
    if not args.quiet:
        print(report)
        beside = f", external data in {written[1]}" if len(written) > 1 else ""
        _stderr(f"{args.output}: written from {args.input} with weights kept compressed{beside}")
    return EXIT_OK


def _write_onnx(model, path: str, force: bool) -> list[str]:
    """Writes ``model`` atomically: inline below 2 GB, else its initializers' data in PATH.data
    (each at a multiple of 4096, as ``rbe decode`` writes them).  Returns the paths written."""
    from onnx.external_data_helper import set_external_data

    from rbeformat.atomic import atomic_file

    from .onnx_io import EXTERNAL_ALIGNMENT, INLINE_LIMIT

    if model.ByteSize() <= INLINE_LIMIT:
        with atomic_file(path, force) as fh:
            fh.write(model.SerializeToString())
        return [path]
    data_path = path + ".data"
    check_target(data_path, force)
    with atomic_file(path, force) as model_fh, atomic_file(data_path, force) as data_fh:
        offset = 0
        for t in model.graph.initializer:
            if not t.raw_data:
                continue
            pad = -offset % EXTERNAL_ALIGNMENT
            data_fh.write(b"\0" * pad + t.raw_data)
            set_external_data(t, os.path.basename(data_path), offset + pad, len(t.raw_data))
            offset += pad + len(t.raw_data)
            t.ClearField("raw_data")
        model_fh.write(model.SerializeToString())  # renamed into place after the data file
    return [path, data_path]


def cmd_verify(args) -> int:
    with open_rbe(args.input, verify_checksums=False) as r:
        problems = list(r.verify(deep=args.deep))
        graph = _check_stored_graph(r) if args.deep and not problems else ""
    for problem in problems:
        if not args.quiet:
            _stderr(f"rbe: damaged: {problem}")
    if problems:
        return EXIT_DAMAGED
    if not args.quiet:
        print(f"{args.input}: OK ({'checksums and digests' if args.deep else 'all checksums'} match{graph})")
    return EXIT_OK


def _check_stored_graph(r: Reader) -> str:
    """--deep on a container carrying an ONNX graph: the graph passes the checks every command that
    reads it makes (no file reference, operator or opset rbe refuses; initializers wired to tensors of
    their type and shape), or an error (exit 3).  What the OK line adds."""
    if GRAPH_KEY not in r.metadata():
        return ""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return "; the stored ONNX graph is not checked without the onnx package"
    from rbe_loaders.ort.graph import graph_initializers

    graph_initializers(r)
    return "; the stored ONNX graph passes rbe's checks"


def cmd_info(args) -> int:
    from .evaluate.report import info_json, info_table

    with open_rbe(args.input, verify_checksums=False) as r:
        if args.json:
            print(json.dumps(info_json(r), indent=2))
        else:
            print(info_table(r))
    return EXIT_OK


def cmd_presets(args) -> int:
    from .compress.recipe import preset_descriptions

    descriptions = preset_descriptions()
    width = max(map(len, descriptions))
    for name, description in descriptions.items():
        print(f"{name.ljust(width)}  {description}")
    return EXIT_OK


def _summary_line(r: Reader) -> str:
    from .evaluate.report import human_bytes, totals

    t = totals(r)
    return (
        f"{r.path}: {human_bytes(t['tensor_bytes'])} of tensors -> {human_bytes(t['file_bytes'])} file, "
        f"ratio {t['ratio']:.4f}, {t['bits_per_weight']:.3f} bits per weight, quality: {t['quality']}"
    )


def cmd_eval(args) -> int:
    from .evaluate.eval import EvalOptions, check_plot_target, eval_table, evaluate, write_plot

    def concerning(path: str) -> None:  # a failure names the file being worked on
        args.input = path

    if args.plot:
        check_plot_target(args.plot, args.force)
    original = args.input
    for path in ([] if os.path.isdir(original) or original.endswith(".safetensors") else [original]) + args.compressed:
        concerning(path)
        open_rbe(path, verify_checksums=False).close()  # each file is an rbe file before anything loads
    options = EvalOptions(
        text=args.text, sentences=args.sentences, window=args.window, windows=args.windows, threads=args.threads
    )
    result = evaluate(original, args.compressed, options, concerning)
    print(json.dumps(result, indent=2) if args.json else eval_table(result))
    if args.plot:
        write_plot(result, args.plot, args.force)
    return EXIT_OK


def cmd_run(args) -> int:
    """An encoder's mean-pooled embedding of the text, or a causal LM's greedy continuation of it."""
    open_rbe(args.input, verify_checksums=False).close()  # one clear error for a file that is not rbe
    from rbe_loaders.ort import run  # a loader; imported only for this command
    from rbe_loaders.ort.guard import Deadline

    deadline = Deadline(args.timeout)  # one limit for the session's build and every run
    model = run.open_model(args.input, threads=args.threads, timeout=deadline)
    if model.causal:
        tokens = run.generate_ids(model, args.text, args.max_new_tokens, timeout=deadline)
        continuation = run.decode_ids(model, tokens, timeout=deadline)
        if args.json:
            print(
                json.dumps(
                    {
                        "model": args.input,
                        "kind": "causal-lm",
                        "prompt": args.text,
                        "continuation": continuation,
                        "token_ids": tokens,
                    }
                )
            )
        else:
            print(continuation)
        return EXIT_OK
    (vector,) = run.embed(model, [args.text], timeout=deadline)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.input,
                    "kind": "encoder",
                    "pooling": "mean",
                    "dimension": len(vector),
                    "embedding": [float(v) for v in vector],
                }
            )
        )
    else:
        first = " ".join(f"{v:.6f}" for v in vector[:EMBEDDING_PREVIEW])
        more = " ..." if len(vector) > EMBEDDING_PREVIEW else ""
        print(f"embedding (mean-pooled, dimension {len(vector)}): {first}{more}")
    return EXIT_OK


EMBEDDING_PREVIEW = 8  # values rbe run prints without --json
RUN_TIMEOUT = 600.0  # seconds rbe run gives a graph by default


COMMANDS = {
    "convert": cmd_convert,
    "decode": cmd_decode,
    "export-onnx": cmd_export_onnx,
    "verify": cmd_verify,
    "info": cmd_info,
    "presets": cmd_presets,
    "eval": cmd_eval,
    "run": cmd_run,
}

if __name__ == "__main__":
    sys.exit(main())
