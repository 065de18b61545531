"""A .safetensors file or a Hugging Face model directory, as a tensor source.

Every file of a model directory goes into the container under its relative
path; safetensors files are split into their tensors (encoded by the chosen
chains) plus their verbatim header, so decoding gives back each file byte for
byte.  Tensors equal to one already stored become aliases (the writer's).
The headers are parsed by ``converters/safetensors_io.py``; links out of the
folder are refused by ``converters/links.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from rbeformat import InputError, Writer
from rbeformat.spec import DTYPES

from ..compress.recipe import Policy
from ..compress.roles import TensorRole, classify
from ..links import check_link
from ..safetensors_io import StFile, StTensor, build_header, read_header
from . import AddTensor


@dataclass
class SafetensorsSource:
    """What a conversion will read: safetensors files and other files, by relative path."""

    root: str
    safetensors: list[tuple[str, StFile]]
    others: list[tuple[str, str]]  # (relative path, absolute path)
    path: str = ""  # the input as given
    transformers_model = True
    roles_from_graph = False
    _by_name: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.path or self.root

    @property
    def tensors(self) -> list[StTensor]:
        return [t for _, st in self.safetensors for t in st.tensors]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.end - t.begin for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        st = sum(os.path.getsize(f.path) for _, f in self.safetensors)
        return st + sum(os.path.getsize(p) for _, p in self.others)

    def _file_of(self, name: str) -> tuple[StFile, StTensor]:
        if not self._by_name:
            self._by_name.update({t.name: (st, t) for _, st in self.safetensors for t in st.tensors})
        return self._by_name[name]

    def tensor(self, name: str) -> StTensor:
        return self._file_of(name)[1]

    def read(self, name: str) -> np.ndarray:
        return read_tensor(*self._file_of(name))

    def locate(self, name: str) -> tuple[str, int, int]:
        st, t = self._file_of(name)
        return st.path, st.data_start + t.begin, t.end - t.begin

    @property
    def roles(self) -> dict[str, TensorRole]:
        """Every tensor's role (``roles.classify``), from the headers and the directory's config.json."""
        return classify({t.name: (t.dtype, t.shape) for t in self.tensors}, self.config())

    def config(self) -> dict | None:
        """The model's config.json (None when the input has none); InputError when it is not a JSON object."""
        path = next((full for rel, full in self.others if rel == "config.json"), None)
        return None if path is None else _read_config(path)

    def folder_config(self) -> dict | None:
        """For a single .safetensors file, the config.json of the model directory it lies in (None without
        one): what a calibration of the file runs the model by.  None for a directory (``config``)."""
        if not self.path or os.path.isdir(self.path):
            return None
        path = os.path.join(self.root, "config.json")
        if not os.path.isfile(path):
            return None
        check_link(path, self.root or ".")
        return _read_config(path)

    def embedded_files(self) -> list[str]:
        return [rel for rel, _ in self.others]

    def check_output(self, destination: str) -> None:
        if os.path.abspath(destination) == os.path.abspath(self.path):
            raise InputError("the output must not be the input")

    def check_policy(self, policy: Policy, calibrating: bool = False) -> tuple[Policy, str | None]:
        return policy, None  # transformers runs the model: every rule keeps its method

    def add_entries(self, w: Writer, add_tensor: AddTensor) -> dict[str, str]:
        """Each safetensors file's tensors then its layout, then the other files; the first file's metadata."""
        first_metadata = None
        for rel, st in self.safetensors:
            _add_safetensors(w, rel, st, add_tensor)
            if first_metadata is None:
                first_metadata = st.metadata
        for rel, full in self.others:
            _add_plain_file(w, rel, full)
        return dict(first_metadata or {})


def plan_conversion(src: str) -> SafetensorsSource:
    """Lists and validates what ``src`` holds, before any output is created."""
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise InputError(f"{src}: expected a .safetensors file, a model directory, an .onnx or an .rbe file")
        return SafetensorsSource(os.path.dirname(src), [(os.path.basename(src), read_header(src))], [], src)
    if not os.path.isdir(src):
        raise InputError(f"{src}: no such file or directory")
    safetensors, others = [], []
    for rel, full in _walk(src):
        if rel.endswith(".safetensors"):
            safetensors.append((rel, read_header(full)))
        else:
            others.append((rel, full))
    if not safetensors:
        raise InputError(f"{src}: no .safetensors file found in the directory")
    names: dict[str, str] = {}
    for rel, st in safetensors:
        for t in st.tensors:
            if t.name.startswith("rbe:"):
                raise InputError(f"{rel}: tensor {t.name!r} uses the prefix 'rbe:', which rbe reserves")
            if t.name in names:
                raise InputError(f"tensor {t.name!r} appears in both {names[t.name]} and {rel}")
            names[t.name] = rel
    return SafetensorsSource(src, safetensors, others, src)


def _walk(root: str):
    """(relative POSIX path, absolute path) of every regular file, sorted.

    A symbolic link whose target lies outside ``root`` is refused (``links.check_link``; a
    Hugging Face cache snapshot's links into its blobs are allowed); a link to a directory
    inside ``root`` is not descended (its files are listed where they are).
    """
    from ..links import allowed_roots, check_link

    roots = allowed_roots(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in dirnames:
            check_link(os.path.join(dirpath, name), root, roots)
        for name in filenames:
            full = os.path.join(dirpath, name)
            check_link(full, root, roots)
            if not os.path.isfile(full):
                continue  # sockets, broken links and the like carry no model data
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            found.append((rel, full))
    return sorted(found)


def _add_safetensors(w: Writer, rel: str, st: StFile, add_tensor: AddTensor) -> None:
    read_at, close = st.reader()
    try:
        for t in st.tensors:
            add_tensor(t, lambda o, n, b=t.begin: read_at(b + o, n))
    finally:
        close()
    header = st.header if st.exact else build_header([(t.name, t.dtype, t.shape) for t in st.tensors], st.metadata)
    w.add_safetensors_layout(rel, header, [t.name for t in st.tensors])


def _add_plain_file(w: Writer, rel: str, full: str) -> None:
    size = os.path.getsize(full)
    fd = os.open(full, os.O_RDONLY)
    try:
        w.add_file(rel, read_at=lambda o, n: os.pread(fd, n, o), size=size)
    finally:
        os.close(fd)


def read_tensor(st: StFile, t: StTensor) -> np.ndarray:
    """One tensor of a safetensors file, read whole."""
    read_at, close = st.reader()
    try:
        storage = np.dtype(DTYPES[t.dtype].numpy_storage)
        return np.frombuffer(read_at(t.begin, t.end - t.begin), storage).reshape(t.shape)
    finally:
        close()


def _read_config(path: str) -> dict:
    """config.json as a JSON object; InputError naming the file otherwise."""
    try:
        with open(path, "rb") as fh:
            config = json.load(fh)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON, which tensor roles need ({str(exc)[:100]})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object, which tensor roles need")
    return config
