"""The ``rbe`` command.

Exit codes (also in ``rbe --help``):
  0  success
  1  ``rbe verify`` found damage
  2  usage error (bad arguments)
  3  invalid input or invalid / unsupported rbe file
  4  the output exists and --force was not given
  130 interrupted
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rbeformat import OutputExistsError, RbeError, Reader
from rbeformat.codecs.byteplane import DEFAULT_SPLIT_GAIN, Byteplane
from rbeformat.codecs.raw import Raw

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE, EXIT_ERROR, EXIT_EXISTS, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

EPILOG = """exit codes: 0 success; 1 verify found damage; 2 usage error; 3 invalid input or
rbe file; 4 output exists (use --force); 130 interrupted"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbe", description="Convert, inspect and verify rbe weight containers.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="safetensors file or HF model directory -> .rbe", epilog=EPILOG)
    p.add_argument("input", help="a .safetensors file or a Hugging Face model directory")
    p.add_argument("output", help="the .rbe file to write")
    p.add_argument("--lossless", choices=["byteplane", "raw"], default="byteplane",
                   help="how tensors without a chain are stored: byteplane (compressed, default) or raw "
                        "(uncompressed, mmappable)")
    p.add_argument("--level", type=int, default=0,
                   help="zstd level for byteplane planes, 1-22; 0 (default) is rbe's tuned preset")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--codec", dest="chain", metavar="CHAIN",
                        help="a codec chain for every 2-D floating-point tensor, e.g. "
                             "'gquant(bits=4, group=32)'; other tensors stay lossless")
    choice.add_argument("--recipe", metavar="FILE", help="a TOML recipe mapping tensor-name patterns to chains")
    p.add_argument("--max-ratio", action="store_true",
                   help="byteplane: condition mantissa bytes on the exponent wherever it saves anything "
                        "(files ~0.1-0.3%% smaller, decode several times slower)")
    _common(p, output=True)

    p = sub.add_parser("decode", help=".rbe -> HF model directory, or one .safetensors file", epilog=EPILOG)
    p.add_argument("input", help="the .rbe file")
    p.add_argument("output", help="a directory, or a path ending in .safetensors for a single file")
    p.add_argument("--no-verify", action="store_true", help="skip checking decoded bytes against their sha256")
    _common(p, output=True)

    p = sub.add_parser("info", help="list tensors, codecs, sizes and bits per weight", epilog=EPILOG)
    p.add_argument("input")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("verify", help="check every checksum; non-zero exit names the damage", epilog=EPILOG)
    p.add_argument("input")
    p.add_argument("--deep", action="store_true", help="also decode everything and check sha256 digests")
    p.add_argument("--quiet", action="store_true", help="print nothing; only the exit code tells")
    return parser


def _common(p: argparse.ArgumentParser, output: bool) -> None:
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: CPU count)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except OutputExistsError as exc:
        print(f"rbe: error: {exc}", file=sys.stderr)
        return EXIT_EXISTS
    except RbeError as exc:
        print(f"rbe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rbe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"rbe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _progress_bar(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet,
                file=sys.stderr, leave=False)


def cmd_convert(args) -> int:
    from .hf import convert, plan_conversion
    from .recipe import lossless_policy, policy_from_codec, policy_from_recipe

    if not 0 <= args.level <= 22:
        raise RbeError(f"--level must be between 0 and 22, not {args.level}")
    split_gain = 0.0 if args.max_ratio else DEFAULT_SPLIT_GAIN
    codec = Raw() if args.lossless == "raw" else Byteplane(level=args.level, split_gain=split_gain)
    if args.chain:
        policy = policy_from_codec(args.chain)
    elif args.recipe:
        policy = policy_from_recipe(args.recipe)
    else:
        policy = lossless_policy()
    total = plan_conversion(args.input).total_bytes
    with _progress_bar(total, args.quiet, "convert") as bar:
        convert(args.input, args.output, force=args.force, codec=codec, policy=policy, threads=args.threads,
                progress=bar.update)
    if not args.quiet:
        with Reader(args.output) as r:
            print(_summary_line(r), file=sys.stderr)
    return EXIT_OK


def cmd_decode(args) -> int:
    from .hf import decode

    with Reader(args.input) as r:
        total = sum(e.blob.items * e.dtype.itemsize for e in r.manifest.tensors.values() if e.blob)
    with _progress_bar(total, args.quiet, "decode") as bar:
        decode(args.input, args.output, force=args.force, verify=not args.no_verify, threads=args.threads,
               progress=bar.update)
    return EXIT_OK


def cmd_verify(args) -> int:
    with Reader(args.input, verify_checksums=False) as r:
        problems = list(r.verify(deep=args.deep))
    for problem in problems:
        if not args.quiet:
            print(f"rbe: damaged: {problem}", file=sys.stderr)
    if problems:
        return EXIT_DAMAGED
    if not args.quiet:
        print(f"{args.input}: OK ({'checksums and digests' if args.deep else 'all checksums'} match)")
    return EXIT_OK


def cmd_info(args) -> int:
    from .report import info_json, info_table

    with Reader(args.input, verify_checksums=False) as r:
        if args.json:
            print(json.dumps(info_json(r), indent=2))
        else:
            print(info_table(r))
    return EXIT_OK


def _summary_line(r: Reader) -> str:
    from .report import totals

    t = totals(r)
    return (f"{r.path}: {t['tensor_bytes'] / 1e6:.1f} MB of tensors -> {t['file_bytes'] / 1e6:.1f} MB file, "
            f"ratio {t['ratio']:.4f}, {t['bits_per_weight']:.3f} bits per weight, quality: {t['quality']}")


COMMANDS = {"convert": cmd_convert, "decode": cmd_decode, "verify": cmd_verify, "info": cmd_info}

if __name__ == "__main__":
    sys.exit(main())
