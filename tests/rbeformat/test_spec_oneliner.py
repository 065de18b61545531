"""The manifest one-liner of spec section 5.1 runs, on plain and on zstd-compressed manifests.

The command is taken verbatim from spec/rbe-v1.md (between the
``manifest-oneliner`` markers), so the document cannot drift from the format.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rbeformat import Reader, save_file
from rbeformat.layout import MANIFEST_JSON, MANIFEST_ZSTD
from rbeformat.reader import inflate_manifest

SPEC = Path(__file__).resolve().parents[2] / "spec" / "rbe-v1.md"


def oneliner() -> list[str]:
    """The spec's command as argv: python3 -c CODE model.rbe."""
    text = SPEC.read_text(encoding="utf-8")
    blocks = re.findall(
        r"<!-- manifest-oneliner:begin -->\s*```\n(.*?)\n```\s*<!-- manifest-oneliner:end -->", text, re.S
    )
    assert len(blocks) == 1, "spec/rbe-v1.md must hold exactly one fenced manifest-oneliner block"
    argv = shlex.split(blocks[0])
    assert argv[:2] == ["python3", "-c"] and argv[3:] == ["model.rbe"], argv
    return argv


def stored_manifest(path) -> tuple[int, str]:
    """The footer's manifest encoding and the manifest's JSON text, as the reader sees them."""
    with Reader(path) as r:
        footer = r.footer
        raw = bytes(r._buf[footer.manifest_offset : footer.manifest_offset + footer.manifest_length])
    text = inflate_manifest(raw) if footer.manifest_encoding == MANIFEST_ZSTD else raw
    return footer.manifest_encoding, text.decode("utf-8")


@pytest.mark.parametrize(
    "tensors, encoding",
    [
        (1, MANIFEST_JSON),
        (300, MANIFEST_ZSTD),  # a few hundred entries compress by far more than the 1 KiB threshold
    ],
)
def test_spec_oneliner_prints_the_manifest(tmp_path, tensors, encoding):
    path = tmp_path / "model.rbe"
    save_file({f"layer.{i}.weight": np.full((2, 3), i, np.float32) for i in range(tensors)}, path)
    found, expected = stored_manifest(path)
    assert found == encoding
    _, _, code, _ = oneliner()
    out = subprocess.run(
        [sys.executable, "-c", code, "model.rbe"], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout
    assert out == expected + "\n"
    manifest = json.loads(out)
    assert manifest["format"] == "rbe" and len(manifest["tensors"]) == tensors
