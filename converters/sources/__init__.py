"""Tensor sources: what ``rbe convert`` reads, whatever the input format.

A ``TensorSource`` lists its tensors (name, dtype, shape) in the order the
container stores them, reads one tensor's values when asked, gives each
tensor's role, and lays out the entries that are its own (a safetensors
file's header, the files of a model directory, an ONNX graph).  The
conversion pipeline (``converters/pipeline.py``) and the chain choice
(``converters/compress/plan.py``) work on any source:

* ``sources/safetensors.py``: a .safetensors file or a Hugging Face model directory;
* ``sources/onnx.py``: an .onnx file's initializers and its graph;
* ``sources/rbe.py``: an .rbe file, its tensors decoded and encoded anew.

``open_source`` picks the source for a path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from rbeformat import Writer
from rbeformat.spec import DTYPES, MAGIC

from ..compress.recipe import Policy
from ..compress.roles import TensorRole

ReadAt = Callable[[int, int], bytes]  # (offset within the tensor, size) -> its bytes
AddTensor = Callable[[object, ReadAt], None]  # (tensor, its read_at) -> stored


class Tensor(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]


class TensorSource(Protocol):
    """One input of a conversion, validated before any output exists."""

    root: str  # the folder it lies in: what calibration loads, what external data stays inside
    label: str  # how messages name the input
    transformers_model: bool  # transformers loads it: calibration, sequential encoding and head pruning run it
    roles_from_graph: bool  # roles read from the model's graph apply to every policy, not only role rules

    @property
    def tensors(self) -> list[Tensor]:
        """Every tensor, in the order the container stores them."""

    @property
    def tensor_bytes(self) -> int:
        """Every tensor's bytes as the input stores them (what the writer reports as progress)."""

    def tensor(self, name: str) -> Tensor: ...

    def read(self, name: str) -> np.ndarray:
        """One tensor's values, in its stored dtype (bf16 and fp8 as their bits)."""

    def locate(self, name: str) -> tuple[str, int, int] | None:
        """Where one tensor's bytes lie as they are stored: (file, offset, length), for another process
        to read them itself; None when they lie in no file of their own (they must be handed over)."""

    @property
    def roles(self) -> dict[str, TensorRole]:
        """Each tensor's role (``compress/roles.py``)."""

    def config(self) -> dict | None:
        """The model's config.json, or None."""

    def embedded_files(self) -> list[str]:
        """The relative paths of the files stored besides the tensors, for the user to see."""

    def check_output(self, destination: str) -> None:
        """Refuses an output that is the input."""

    def check_policy(self, policy: Policy, calibrating: bool = False) -> tuple[Policy, str | None]:
        """The policy this input is encoded with, and a note for the user when it differs."""

    def add_entries(self, w: Writer, add_tensor: AddTensor) -> dict[str, str]:
        """Passes every tensor to ``add_tensor`` in order, adds the source's own entries; returns the metadata."""


def load(read_at: ReadAt, t: Tensor) -> np.ndarray:
    """A tensor's values from a ``read_at`` over its own bytes (offset 0 is its first byte)."""
    storage = np.dtype(DTYPES[t.dtype].numpy_storage)
    return np.frombuffer(read_at(0, math.prod(t.shape) * DTYPES[t.dtype].itemsize), storage).reshape(t.shape)


def is_onnx_path(path: str) -> bool:
    return path.lower().endswith(".onnx")


def is_onnx_input(path: str) -> bool:
    """An .onnx file, which ``sources/onnx.py`` reads (anything else goes to ``sources/safetensors.py``)."""
    return os.path.isfile(path) and is_onnx_path(path)


def is_rbe_input(path: str) -> bool:
    """An .rbe file, which ``sources/rbe.py`` reads: a file named .rbe, or one that starts as an rbe file does."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".rbe"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def open_source(path: str) -> TensorSource:
    """The source ``path`` holds: an .rbe file, an .onnx file, a .safetensors file or a model directory."""
    if is_rbe_input(path):
        from . import rbe

        return rbe.plan_conversion(path)
    if is_onnx_input(path):
        from . import onnx

        return onnx.plan_conversion(path)
    from . import safetensors

    return safetensors.plan_conversion(path)
