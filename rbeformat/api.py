"""One-call helpers mirroring ``safetensors.numpy``."""

from __future__ import annotations

import os

import numpy as np

from .codecs.base import Codec


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None,
              *, codec: Codec | None = None, force: bool = True) -> None:
    """Writes ``tensors`` to ``path`` (losslessly unless ``codec`` says otherwise)."""
    from .writer import Writer

    with Writer(path, force=force, codec=codec) as w:
        for name in sorted(tensors):
            w.add_array(name, tensors[name])
        if metadata:
            w.set_metadata(metadata)


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of ``path`` into memory."""
    from .reader import Reader

    with Reader(path) as r:
        return {name: r.get_tensor(name) for name in r.keys()}
