"""Perplexity of a causal language model directory, by the protocol of ``rbe_converters.evaluate.quality``.

The texts, windows and scoring live in ``rbe_converters.evaluate.quality`` so that
``rbe eval``, the benches and the tests measure the same way; this is a
command-line wrapper for a bare model directory.  By default it scores the
evaluation part of the topic text, never the calibration part.

    python -m bench.perplexity MODEL_DIR [--window 512] [--windows 16] [--text evaluation|calibration|FILE]
"""

from __future__ import annotations

import argparse
import sys

from rbe_converters.evaluate.quality import (
    DEFAULT_WINDOW,
    DEFAULT_WINDOWS,
    calibration_text,
    evaluation_text,
    fingerprint,
    load_model,
    load_tokenizer,
    perplexity,
    read_text,
    token_ids,
    windows,
)


def _text(choice: str) -> str:
    if choice == "evaluation":
        return evaluation_text()
    if choice == "calibration":
        return calibration_text()
    return read_text(choice, "text")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perplexity", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a Hugging Face causal LM directory")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--text", default="evaluation", help="evaluation (default), calibration, or a UTF-8 file")
    args = parser.parse_args(argv)

    text = _text(args.text)
    ids = token_ids(load_tokenizer(args.model), text)
    count = min(args.windows, len(ids) // args.window)
    value = perplexity(load_model(args.model, causal=True), windows(ids, args.window, count))
    print(
        f"{value:.3f} ({count} windows of {args.window} tokens, stride {args.window}, of {len(ids)} tokens; "
        f"text {args.text}, sha256 {fingerprint(text)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
