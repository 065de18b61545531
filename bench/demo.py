"""The demo: all-MiniLM-L6-v2 to .rbe and back, checked bit for bit.

    python -m bench.demo [--workdir DIR]

Fetches the model (once) into the project's model cache, converts the whole
Hugging Face directory as ``rbe convert`` does (``rbe_converters.pipeline.convert_model``),
decodes it as ``rbe decode`` does (``rbe_converters.decode.decode_to``),
checks every file of the decoded directory against the original by sha256,
and prints ``rbe info``'s summary.  The .rbe file and the decoded directory stay
in DIR (default: bench/out/demo), and the last lines say where they and the
model are, with the commands to try next.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from bench.models import minilm_dir
from rbe_converters.decode import decode_to
from rbe_converters.evaluate.report import human_bytes, info_table, summary_line
from rbe_converters.pipeline import ConvertOptions, StderrReporter, convert_model
from rbeformat import MissingExtraError, Reader, extras

DEFAULT_WORKDIR = os.path.join("bench", "out", "demo")  # kept: the user's file to look at next


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run(workdir: str) -> int:
    src = minilm_dir()
    out, back = os.path.join(workdir, "all-MiniLM-L6-v2.rbe"), os.path.join(workdir, "decoded")
    t0 = time.perf_counter()
    result = convert_model(src, out, ConvertOptions(force=True), StderrReporter())
    for note in result.notes:
        print(note)
    print(summary_line(result.path, result.totals))
    t1 = time.perf_counter()
    decoded = decode_to(out, back, force=True)
    print(f"{back}: decoded from {out} ({human_bytes(decoded.total)} of tensors)")
    t2 = time.perf_counter()
    original, decoded = tree_digest(src), tree_digest(back)
    if original != decoded:
        bad = sorted(k for k in original.keys() | decoded.keys() if original.get(k) != decoded.get(k))
        print(f"MISMATCH in {bad}", file=sys.stderr)
        return 1
    with Reader(out, verify_checksums=False) as r:
        print(info_table(r, summary_only=True))
    print()
    print(
        f"convert {t1 - t0:.1f} s, decode {t2 - t1:.1f} s; "
        f"all {len(original)} files of the decoded directory are byte-identical to the original "
        f"(model.safetensors: {os.path.getsize(os.path.join(src, 'model.safetensors')):,} bytes -> "
        f"{os.path.getsize(out):,} bytes of .rbe including every config and tokenizer file)"
    )
    print(f"\nthe model (all-MiniLM-L6-v2): {src}\nits .rbe: {out}\ndecoded back: {back}\n")
    print("\n".join(next_steps(src, out)))
    return 0


def next_steps(src: str, out: str) -> list[str]:
    """The commands to try next, spelled with the rbe and pip of this Python's environment (the demo's
    install puts them in .venv/bin, not on the PATH), and the hf extra first where it is missing."""
    bin_dir = os.path.dirname(sys.executable)
    rbe, pip = (_shortest(os.path.join(bin_dir, name)) for name in ("rbe", "pip"))
    lines = ["next:", f"  {rbe} info {out} --summary"]
    try:
        extras.CALIBRATION.require()
    except MissingExtraError:
        lines.append(
            f"  {pip} install -e '.[hf]'    # torch and transformers, for calibrated presets and rbe eval "
            "(the README says how to get torch's CPU build)"
        )
    lines += [f"  {rbe} convert {src} q4.rbe --preset q4", f"  {rbe} eval {src} q4.rbe", f"  {rbe} presets"]
    return lines


def _shortest(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else as it is."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"where to write the .rbe and the decoded directory ({DEFAULT_WORKDIR})",
    )
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    return run(args.workdir)


if __name__ == "__main__":
    sys.exit(main())
