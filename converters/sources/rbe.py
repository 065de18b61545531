"""An .rbe file, as a tensor source: a container encoded anew.

``rbe convert in.rbe out.rbe --preset q4`` (or ``--codec``, ``--recipe``,
``--lossless``) reads each tensor as the container decodes it, one at a time,
and encodes it again.  A tensor the input stores through a lossy chain enters
with its decoded values (what every reader of the input sees), not the values
it was made from.  Everything else goes over as the input holds it: each
embedded file (config and tokenizer files, the safetensors headers that let
``rbe decode`` rebuild the directory, an ONNX graph and its initializer
mapping), streamed a batch of chunks at a time, and the metadata.  Internal
tensors (a codec's shared state) stay behind: the new chains store their own.
The constants of a graph exported with ``--onnx`` (``onnx/...``, no weights of
the model) are stored losslessly, as the export stores them.

A container converted from an .onnx file takes its roles, its policy checks
and its ONNX Runtime calibration (``--tokenizer``) from ``sources/onnx.py``,
as the .onnx file would.  Any other container is a Hugging Face model: roles
from the tensor names and its config.json, and calibration runs it with
transformers through ``root``, a ``ContainerModel``: a temporary folder of the
container's config and tokenizer files whose weights ``calibrate.stream``
reads from the container, one tensor at a time, as it reads a directory's
safetensors files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from rbeformat import InputError, Reader, Writer
from rbeformat.embedded.hf_guard import CONFIG_FILE, DATA_FILES
from rbeformat.embedded.onnx import read_graph
from rbeformat.spec import DTYPES

from ..compress.recipe import Policy
from ..compress.roles import TensorRole, classify
from . import AddTensor

SAFETENSORS_HEADER = "safetensors-header"  # the role of a file entry that lays out a safetensors file


def holds_onnx_model(path: str) -> bool:
    """Whether the .rbe file at ``path`` was converted from an .onnx file (its graph is the model)."""
    from ..decode import carries_onnx_model
    from ..inputs import open_rbe

    with open_rbe(path, verify_checksums=False) as r:
        return carries_onnx_model(r)


@dataclass(frozen=True)
class ContainerTensor:
    """One tensor of the input as a reader sees it (aliases and lossy tensors alike)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class ContainerTensors:
    """The tensors of an open container, read one at a time by name (as ``calibrate.stream.CheckpointTensors``)."""

    def __init__(self, reader: Reader, tensors: list[ContainerTensor]):
        self.reader = reader
        self.tensors = tensors
        self._by_name = {t.name: t for t in tensors}

    def tensor(self, name: str) -> ContainerTensor:
        return self._by_name[name]

    def read(self, name: str) -> np.ndarray:
        """One tensor decoded, in its stored dtype (bf16 and fp8 as their bits)."""
        return self.reader.get_tensor(name)


class ContainerModel(str):
    """Where calibration finds a Hugging Face model an .rbe file holds: a folder of its config and tokenizer
    files (what transformers reads to build the model), whose ``weights`` are the container's tensors
    (``calibrate.stream`` reads them in place of the folder's safetensors files); ``label`` names the
    model in messages."""

    def __new__(cls, folder: str, weights: ContainerTensors, label: str):
        model = super().__new__(cls, folder)
        model.weights, model.label = weights, label
        return model

    def __reduce__(self):
        # a copy (transformers deep-copies the path it loads a config from) is the folder's path alone
        return str, (str(self),)


def stage_data_files(reader: Reader, folder: str) -> None:
    """Writes the container's top-level config and tokenizer files into ``folder`` (as ``hf_folder`` does)."""
    files = reader.files()
    for name in DATA_FILES:
        if name in files and files[name].role != SAFETENSORS_HEADER:
            with open(os.path.join(folder, name), "wb") as fh:
                for data in reader.iter_file(name):
                    fh.write(data)


class RbeSource:
    """What converting an .rbe file reads: its tensors as decoded, its files and its metadata."""

    def __init__(self, path: str, reader: Reader):
        from ..decode import carries_onnx_model, exported_graph_parts

        self.path = path
        self.label = path
        self.source = os.path.basename(path)  # how ``sources/onnx.py``'s messages name an input
        self.reader = reader
        weakref.finalize(self, reader.close)
        own = exported_graph_parts(reader)[1]
        entries = [reader.entry(name) for name in reader.keys()]  # internal tensors left out
        listed = [ContainerTensor(e.name, e.dtype.name, tuple(e.shape)) for e in entries]
        self._tensors = [t for t in listed if t.name not in own]
        self._own = [t for t in listed if t.name in own]  # an exported graph's constants: stored losslessly
        self.onnx_model = carries_onnx_model(reader)
        self.transformers_model = not self.onnx_model
        self.roles_from_graph = self.onnx_model
        self._reads = ContainerTensors(reader, self._tensors)
        self._root: ContainerModel | None = None
        self._roles: dict[str, TensorRole] | None = None
        self.added_files: dict[str, bytes] = {}  # --tokenizer's tokenizer.json, in place of the container's

    def lossy_input_stats(self) -> dict[str, dict]:
        """{tensor name: the stats the input keeps for it} for the tensors it stores lossily (a codec chain
        that is not exact, a lossy codec, or values it had already taken from a lossy file): carried into
        the output's stats as ``input``, so that a re-encoding of lossy values never reads as the model's."""
        lossy = {}
        for tensor in self._tensors:
            stored = self.reader.stored_entry(tensor.name)  # an alias: its target's
            stats = stored.extra.get("stats")
            stats = stats if isinstance(stats, dict) else {}
            if stored.transform is not None:
                exact = stats.get("rel_error") == 0
            else:
                exact = stored.blob.codec is not None and stored.blob.codec.lossless
            if exact and isinstance(stats.get("input"), dict):
                lossy[tensor.name] = stats["input"]  # an exact copy of lossy values: what they had lost
            elif not exact:
                lossy[tensor.name] = stats
        return lossy

    @property
    def root(self) -> ContainerModel:
        """What calibration loads: the config and tokenizer files, staged in a temporary folder (removed with
        this source) on first use, and the container's tensors."""
        if self._root is None:
            folder = tempfile.mkdtemp(prefix="rbe-model-")
            weakref.finalize(self, shutil.rmtree, folder, True)
            stage_data_files(self.reader, folder)
            self._root = ContainerModel(folder, self._reads, self.path)
        return self._root

    @property
    def tensors(self) -> list[ContainerTensor]:
        return self._tensors

    @property
    def initializers(self) -> list[ContainerTensor]:
        """The initializers of the ONNX model (``sources.onnx.filled_model`` fills them by name)."""
        return self._tensors

    @property
    def tensor_bytes(self) -> int:
        return sum(t.size for t in self._tensors + self._own)

    def tensor(self, name: str) -> ContainerTensor:
        return self._reads.tensor(name)

    def read(self, name: str) -> np.ndarray:
        return self._reads.read(name)

    def locate(self, name: str) -> None:
        return None  # its bytes are decoded here: handed over whole

    @property
    def graph(self) -> bytes:
        """The stored ONNX model, initializers without data (``sources.onnx.filled_model`` fills them)."""
        return read_graph(self.reader).SerializeToString()

    @property
    def roles(self) -> dict[str, TensorRole]:
        if self._roles is None:
            self._roles = self._graph_roles() if self.onnx_model else self._named_roles()
        return self._roles

    def _named_roles(self) -> dict[str, TensorRole]:
        return classify({t.name: (t.dtype, t.shape) for t in self._tensors}, self.config())

    def _graph_roles(self) -> dict[str, TensorRole]:
        from .onnx import graph_roles

        return graph_roles(read_graph(self.reader).graph, {t.name: t for t in self._tensors})

    def config(self) -> dict | None:
        """The embedded config.json of a Hugging Face model (None without one); InputError when it is not a
        JSON object."""
        entry = self.reader.files().get(CONFIG_FILE)
        if self.onnx_model or entry is None or entry.role == SAFETENSORS_HEADER:
            return None
        where = f"{self.path}: {CONFIG_FILE}"
        try:
            config = json.loads(self.reader.read_file(CONFIG_FILE))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InputError(f"{where}: not valid JSON, which tensor roles need ({str(exc)[:100]})") from None
        if not isinstance(config, dict):
            raise InputError(f"{where}: not a JSON object, which tensor roles need")
        return config

    def embedded_files(self) -> list[str]:
        kept = [path for path, f in self.reader.files().items() if f.role != SAFETENSORS_HEADER]
        return kept + [path for path in self.added_files if path not in kept]

    def check_output(self, destination: str) -> None:
        from ..outputs import check_not_input

        check_not_input(self.path, destination)

    def check_policy(self, policy: Policy, calibrating: bool = False) -> tuple[Policy, str | None]:
        if self.onnx_model:
            from .onnx import check_policy

            return check_policy(self, policy, calibrating)
        return policy, None  # transformers runs the model: every rule keeps its method

    def add_entries(self, w: Writer, add_tensor: AddTensor) -> dict[str, str]:
        """Each tensor decoded, one at a time; the graph's constants; every file (an added one in place of
        the container's of that name); the input's metadata."""
        for t in self._tensors:
            data = self.reader.tensor_bytes(t.name)
            add_tensor(t, lambda o, n, data=data: data[o : o + n])
            del data  # one decoded tensor alive at a time
        for t in self._own:
            data = self.reader.tensor_bytes(t.name)
            w.add_tensor(t.name, t.dtype, t.shape, lambda o, n, data=data: data[o : o + n])
            del data
        for path, entry in self.reader.files().items():
            if entry.role == SAFETENSORS_HEADER:
                w.add_safetensors_layout(path, self.reader.read_file(path), entry.tensors)
            elif path not in self.added_files:
                size = entry.blob.items
                w.add_file(path, read_at=SequentialRead(lambda p=path: self.reader.iter_file(p), size), size=size)
        for path, data in self.added_files.items():
            w.add_file(path, data)
        return self.reader.metadata()


class SequentialRead:
    """``read_at(offset, size)`` over the ``total`` bytes an iterator gives in order (an embedded file, a
    batch of chunks at a time): reads that go on where the last one ended are served as the bytes come; a
    read from further back starts the iterator again.  Once the last byte is read the iterator is run to
    its end, where ``Reader.iter_file`` checks the file's digest."""

    def __init__(self, start: Callable[[], Iterator[bytes]], total: int):
        self._start, self._total = start, total
        self._pieces: Iterator | None = None
        self._buffer = bytearray()
        self._offset = 0  # where the buffer's first byte lies

    def __call__(self, offset: int, size: int) -> bytes:
        if self._pieces is None or offset < self._offset:
            self._pieces, self._buffer, self._offset = iter(self._start()), bytearray(), 0
        while self._offset + len(self._buffer) < offset + size:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buffer += piece
        skip = offset - self._offset
        data = bytes(self._buffer[skip : skip + size])
        del self._buffer[: skip + len(data)]  # what is read is never read again, unless from the start
        self._offset = offset + len(data)
        if self._offset >= self._total:
            for _ in self._pieces:  # the end: the digest is checked
                pass
        return data


def plan_conversion(src: str) -> RbeSource:
    """Opens and checks the container ``src`` (one error when it is no rbe file), before any output exists."""
    from ..inputs import open_rbe

    return RbeSource(src, open_rbe(src))
