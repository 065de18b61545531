"""The demo: all-MiniLM-L6-v2 to .rbe and back, checked bit for bit.

    python -m bench.demo [--workdir DIR]

Fetches the model (once) into the project's model cache, converts the whole
Hugging Face directory as ``rbe convert`` does (``rbe_converters.pipeline.convert_model``),
decodes it as ``rbe decode`` does (``rbe_converters.decode.decode_to``),
checks every file of the decoded directory against the original by sha256,
and prints ``rbe info``'s table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

from bench.models import minilm_dir
from rbe_converters.decode import decode_to
from rbe_converters.evaluate.report import human_bytes, info_table, summary_line
from rbe_converters.pipeline import ConvertOptions, StderrReporter, convert_model
from rbeformat import Reader


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
        print(note, file=sys.stderr)
    print(summary_line(result.path, result.totals), file=sys.stderr)
    t1 = time.perf_counter()
    decoded = decode_to(out, back, force=True)
    print(f"{back}: decoded from {out} ({human_bytes(decoded.total)} of tensors)", file=sys.stderr)
    t2 = time.perf_counter()
    original, decoded = tree_digest(src), tree_digest(back)
    if original != decoded:
        bad = sorted(k for k in original.keys() | decoded.keys() if original.get(k) != decoded.get(k))
        print(f"MISMATCH in {bad}", file=sys.stderr)
        return 1
    with Reader(out, verify_checksums=False) as r:
        print(info_table(r))
    print()
    print(
        f"convert {t1 - t0:.1f} s, decode {t2 - t1:.1f} s; "
        f"all {len(original)} files of the decoded directory are byte-identical to the original "
        f"(model.safetensors: {os.path.getsize(os.path.join(src, 'model.safetensors')):,} bytes -> "
        f"{os.path.getsize(out):,} bytes of .rbe including every config and tokenizer file)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write the .rbe and the decoded directory (default: a temp dir)")
    args = parser.parse_args()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        return run(args.workdir)
    with tempfile.TemporaryDirectory(prefix="rbe-demo-") as tmp:
        return run(tmp)


if __name__ == "__main__":
    sys.exit(main())
