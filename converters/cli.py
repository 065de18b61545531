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
import sys
import threading

import zstandard

from rbeformat import OutputExistsError, RbeError, Reader, UsageError, __version__, budget
from rbeformat.embedded.onnx import GRAPH_KEY
from rbeformat.spec import FORMAT_MAJOR, FORMAT_MINOR

from .inputs import open_rbe
from .pipeline import LOSSLESS_CODECS, Reporter

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE, EXIT_ERROR, EXIT_EXISTS = 0, 1, 2, 3, 4
EXIT_BUG = 70  # EX_SOFTWARE of sysexits.h
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a program killed by SIGPIPE
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

EPILOG = """exit codes: 0 success; 1 verify found damage; 2 usage error; 3 invalid input or rbe file;
4 output exists (use --force); 70 internal error (a bug in rbe); 128+N stopped by signal N
(129 SIGHUP, 130 SIGINT, 143 SIGTERM), 141 stdout closed"""

QUIET_HELP = "no progress (a bar on a terminal, lines in a log) and no result line (warnings and errors still print)"


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread so that every output is cleaned up on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    """argparse, reporting a bad command line in one line like every other error, with the closest
    names for a misspelled command, choice or option (Python 3.11's argparse has no suggest_on_error)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --lossles is a typo to name, not --lossless taken silently
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"rbe: error: {message} (see '{self.prog} --help')\n")

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError:
            close = closest(value, action.choices) if isinstance(value, str) else None
            if close is None:
                raise
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}; did you mean {close}? (choose from {choices})"
            ) from None

    def parse_known_args(self, args=None, namespace=None):
        """Options this command does not know, one of them close to one it does, are an error naming
        that one (argparse would report them later from the top-level parser, without a guess)."""
        namespace, extras = super().parse_known_args(args, namespace)
        for extra in extras:
            if extra.startswith("-") and len(extra) > 1:
                close = closest(extra.split("=", 1)[0], self._option_string_actions)
                if close is not None:
                    self.error(f"unrecognized arguments: {' '.join(extras)} (did you mean {close}?)")
        return namespace, extras


def closest(word: str, names) -> str | None:
    """The name closest to a misspelled one, quoted, or None when none is close."""
    import difflib

    close = difflib.get_close_matches(word, [n for n in names if isinstance(n, str)], n=1)
    return repr(close[0]) if close else None


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

    p = sub.add_parser(
        "convert", help="safetensors file, HF model directory, ONNX model or .rbe -> .rbe", epilog=EPILOG
    )
    p.add_argument(
        "input",
        help="a .safetensors file, a Hugging Face model directory, an .onnx file, or an .rbe file to encode anew",
    )
    p.add_argument(
        "output", help="the .rbe file to write (its directory must exist; another file type's name needs --force)"
    )
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
        help=".onnx input: the model's tokenizer.json (or a folder holding one), embedded in the output "
        "for eval and the loaders, and to calibrate with in ONNX Runtime; without it (or one an .rbe input "
        "carries), calibrated rules round to nearest",
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
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing output file; start again, removing what an interrupted run kept",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on with an interrupted calibrated conversion of the same input and options from its last "
        "finished block (the state kept beside the output, in .OUTPUT.resume); refused when they differ",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="encode the tensors as Ray tasks, several at once (the same bytes): with no ADDRESS on a local "
        "Ray with this machine's cores, else on the cluster at ADDRESS (HOST:PORT, or auto); needs rbe[ray]",
    )
    p.add_argument(
        "--ray-workers",
        type=thread_count,
        metavar="N",
        help="--ray without an address: the local Ray's CPUs, one task on each (default: CPU count)",
    )
    _common(p)

    p = sub.add_parser(
        "decode", help=".rbe -> HF model directory, one .safetensors file or an ONNX model", epilog=EPILOG
    )
    p.add_argument("input", help="the .rbe file")
    p.add_argument(
        "output",
        help="a directory (not named with a file type's extension such as .rbe, unless --force), a path "
        "ending in .safetensors for a single file, or one ending in .onnx for an ONNX model",
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
        "opens it; prints how many weights took each form",
    )
    p.add_argument("--forms", action="store_true", help="--on-the-fly: a row per weight, with the form it took")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--no-verify", action="store_true", help="skip checking decoded bytes against their sha256")
    _common(p)

    p = sub.add_parser("info", help="list tensors, codecs, sizes and bits per weight", epilog=EPILOG)
    p.add_argument("input")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--summary", action="store_true", help="only the totals and a row per codec, not a row per tensor")
    _max_memory(p)

    p = sub.add_parser(
        "presets",
        help="the built-in recipes for rbe convert --preset: what each suits, needs and measured",
        epilog=EPILOG,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(input="rbe presets")  # what an error message names

    p = sub.add_parser("verify", help="check every checksum; non-zero exit names the damage", epilog=EPILOG)
    p.add_argument("input")
    p.add_argument("--deep", action="store_true", help="also decode everything and check sha256 digests")
    p.add_argument("--quiet", action="store_true", help="print nothing; only the exit code tells")
    _max_memory(p)

    p = sub.add_parser(
        "eval",
        help="quality of compressed .rbe files against the original (needs the hf extra; ONNX models the ort extra)",
        epilog=EPILOG,
    )
    p.add_argument(
        "input",
        metavar="ORIGINAL",
        help="a HF model directory, a .safetensors file in one, an .onnx file, or an .rbe of one of those",
    )
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
        "--tokenizer",
        metavar="PATH",
        help="ONNX models: a tokenizer.json (or a folder holding one) of the model (default: one the "
        "original or a compressed .rbe carries, as convert --tokenizer embeds it); an .onnx file carries none",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (the results still print on stdout)")
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="threads for torch or ONNX Runtime and decoding, at least 1 (default: CPU count)",
    )
    _max_memory(p)

    p = sub.add_parser(
        "run",
        help="run a .rbe converted with --onnx (or an encoder's .onnx converted with --tokenizer) in ONNX "
        "Runtime: an encoder's embedding or a causal LM's greedy continuation (needs the ort extra, no torch)",
        epilog=EPILOG,
    )
    p.add_argument(
        "input",
        metavar="MODEL.rbe",
        help="an .rbe file converted from a model directory with --onnx, or from an encoder's .onnx with --tokenizer",
    )
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
    # rbe's own types first: some are built-in ones too (a UsageError is a ValueError, a MissingExtraError an
    # ImportError, a FileMissingError a FileNotFoundError), and their exit code is rbe's, not the built-in's.
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


# -- commands -------------------------------------------------------------------------


def progress_bar(total: int, quiet: bool, desc: str, last_line: float | None = None):
    """A stage counting ``total`` bytes: a bar on a terminal, plain lines in a log (``progress.py``),
    the first ``LINE_SECONDS`` after the start, so that a refusal found at the start stays the one
    line, or after ``last_line``, an earlier stage's last (a log never goes quiet longer between
    stages)."""
    from .progress import progress

    return progress(
        total, desc, "MB", quiet, count_format="{n:.1f}/{total:.1f}", scale=1e6, announce=False, last_line=last_line
    )


def cmd_convert(args) -> int:
    from .evaluate.report import summary_line
    from .pipeline import ConvertOptions, convert_model

    options = ConvertOptions(
        force=args.force,
        lossless=args.lossless,
        level=args.level,
        max_ratio=args.max_ratio,
        chain=args.chain,
        recipe=args.recipe,
        preset=args.preset,
        calibration=args.calibration,
        calibration_windows=args.calibration_windows,
        tokenizer=args.tokenizer,
        onnx=args.onnx,
        threads=args.threads,
        resume=args.resume,
        ray=args.ray,
        ray_workers=args.ray_workers,
    )
    if args.ray_workers is not None and args.ray != "local":
        raise UsageError("--ray-workers sizes a local Ray: give it with --ray and no address")
    result = convert_model(args.input, args.output, options, CommandReporter(args.quiet))
    if not args.quiet:
        for note in result.notes:
            print(note)
        print(summary_line(result.path, result.totals))  # the result: stdout, as every command's
    _warn_larger_than_dense(result.larger_than_dense)
    return EXIT_OK


class CommandReporter(Reporter):
    """What ``rbe convert`` shows on stderr: lines and bars, none with --quiet but the warnings."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.previous = None  # the last stage begun: the byte stage's first line keeps the interval from its last

    def info(self, line: str) -> None:
        if not self.quiet:
            _stderr(line)

    def warning(self, line: str) -> None:
        _stderr(line)

    def bar(self, total: int, desc: str):
        return progress_bar(total, self.quiet, desc, last_line=getattr(self.previous, "last", None))

    def stage(self, total, desc, unit, count_format="{n:.0f}/{total:.0f}", scale=1.0, later=None, expected=None):
        from .progress import progress

        self.previous = progress(
            total, desc, unit, self.quiet, count_format, later=later, scale=scale, expected=expected
        )
        return self.previous

    def windows_bar(self, total: int, later=None):
        # Sentences and the block-by-block survey advance by fractions of a window: one decimal place.
        return self.stage(total, "calibrate", "windows", count_format="{n:.1f}/{total:.0f}", later=later)


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
    from .decode import decode_to

    decoded = decode_to(
        args.input,
        args.output,
        force=args.force,
        verify=not args.no_verify,
        threads=args.threads,
        bar=lambda total: progress_bar(total, args.quiet, "decode"),
    )
    _removed_partials_line(args.output, decoded.removed)
    if args.output.lower().endswith(".onnx"):
        _decoded_onnx_line(args, decoded)
        return EXIT_OK
    kept = decoded.kept
    if kept:
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        noun = "file" if len(kept) == 1 else "files"
        _stderr(f"rbe: {args.output}: kept {len(kept)} {noun} not in the container: {shown}")
    if not args.quiet:
        from .evaluate.report import human_bytes

        print(
            f"{args.output}: decoded from {args.input} ({human_bytes(decoded.total)} of tensors)"
            + _approximation_note(args.input)
        )
    return EXIT_OK


def _approximation_note(path: str) -> str:
    """For a lossy container: that the decoded weights are its values, not the original's."""
    from .evaluate.report import lossy_rows

    with open_rbe(path, verify_checksums=False) as r:
        lossy = len(lossy_rows(r))
    if not lossy:
        return ""
    return (
        f"; {lossy} tensor{'s' if lossy != 1 else ''} stored lossily: their decoded values approximate the "
        "original's (rbe info shows each one's error)"
    )


def _removed_partials_line(output: str, removed: list[str]) -> None:
    if removed:  # said even with --quiet: files went away
        from .outputs import stale_partials_note

        _stderr(stale_partials_note(output, removed))


def _decoded_onnx_line(args, decoded) -> None:
    if not args.quiet:
        from .evaluate.report import human_bytes

        written = decoded.written
        beside = f", external data in {written[1]}" if len(written) > 1 else ""
        print(
            f"{args.output}: decoded from {args.input} ({human_bytes(decoded.total)} of tensors{beside})"
            + _approximation_note(args.input)
        )


def cmd_export_onnx(args) -> int:
    """The ONNX model a container carries: dense (as ``rbe decode``), or on the fly (``rbe_loaders.ort``)."""
    if not args.on_the_fly:
        from .decode import decode_onnx_to

        decoded = decode_onnx_to(
            args.input,
            args.output,
            force=args.force,
            verify=not args.no_verify,
            threads=args.threads,
            bar=lambda total: progress_bar(total, args.quiet, "decode"),
        )
        _removed_partials_line(args.output, decoded.removed)
        _decoded_onnx_line(args, decoded)
        return EXIT_OK
    from .decode import export_on_the_fly

    written, report = export_on_the_fly(args.input, args.output, force=args.force)
    if not args.quiet:
        print(report if args.forms else report.forms_line())
        beside = f", external data in {written[1]}" if len(written) > 1 else ""
        print(f"{args.output}: written from {args.input} with weights kept compressed{beside}")
    return EXIT_OK


def cmd_verify(args) -> int:
    with open_rbe(args.input, verify_checksums=False) as r:
        problems = list(r.verify(deep=args.deep))
        graph = _check_stored_graph(r) if args.deep and not problems else ""
    for problem in problems:
        if not args.quiet:
            _stderr(f"rbe: {args.input}: damaged: {problem}")
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
            print(info_table(r, summary_only=args.summary))
    return EXIT_OK


def cmd_presets(args) -> int:
    from .compress.catalog import catalog, catalog_json, catalog_table, load_record

    record = load_record()
    entries = catalog(record)
    print(json.dumps(catalog_json(entries, record), indent=2) if args.json else catalog_table(entries, record))
    return EXIT_OK


def cmd_eval(args) -> int:
    from .evaluate.eval import EvalOptions, eval_table, evaluate, require_runtime
    from .evaluate.plot import check_plot_target, write_plot
    from .progress import process_started

    started = process_started()  # a log's first line is due LINE_SECONDS after it, whatever stage runs then

    def concerning(path: str) -> None:  # a failure names the file being worked on
        args.input = path

    original = args.input
    not_rbe = os.path.isdir(original) or original.endswith(".safetensors") or original.lower().endswith(".onnx")
    for path in ([] if not_rbe else [original]) + args.compressed:
        concerning(path)
        open_rbe(path, verify_checksums=False).close()  # each file is an rbe file before anything loads
    concerning(original)
    require_runtime(original)  # the model's extra, then --plot's: one install at a time, the larger first
    if args.plot:
        check_plot_target(args.plot, args.force)
    options = EvalOptions(
        text=args.text,
        sentences=args.sentences,
        window=args.window,
        windows=args.windows,
        threads=args.threads,
        tokenizer=args.tokenizer,
        quiet=args.quiet,
        started=started,
    )
    result = evaluate(original, args.compressed, options, concerning)
    print(json.dumps(result, indent=2) if args.json else eval_table(result))
    if args.plot:
        if not args.quiet:  # matplotlib's import and drawing take seconds after the last file's line
            _stderr(f"rbe: eval: drawing {args.plot}")
        write_plot(result, args.plot, args.force)
        if not args.json:  # --json keeps stdout one JSON document
            print(f"wrote {args.plot}")
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
