"""The safetensors-style entry points: ``safe_open``, ``save_file``, ``load_file``.

They behave as safetensors' do over numpy (``safe_open(path, framework,
device)`` with ``keys``, ``metadata``, ``get_tensor`` and ``get_slice``;
``save_file`` replacing an existing file).  ``framework="pt"`` hands back torch
tensors.  torch is imported only then, inside ``_TorchReader``: a few lines
around ``torch.from_numpy`` keep rbeformat free of any framework at import time
and free of ``rbe_loaders``, which depends on rbeformat and must stay the
only direction.  Saving torch tensors is ``rbe_loaders.torch.save_file``, as
safetensors keeps it in ``safetensors.torch``.  A missing file raises a
``FileNotFoundError`` (``FileMissingError``), as safetensors' does, and a
name the file lacks a ``KeyError`` (``TensorNotFoundError``), as a dict
lookup does; bad argument values a ``ValueError`` (``UsageError``).

>>> with safe_open("model.rbe", framework="pt") as f:         # doctest: +SKIP
...     rows = f.get_slice("embed.weight")[:128]             # decodes only the chunks holding them
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .codecs.core.base import Codec
from .errors import RbeError, UsageError, UsageTypeError
from .extras import TORCH_TENSORS
from .reader import Reader
from .spec import DTYPES, DType
from .writer import Writer

FRAMEWORKS = {"np": "numpy", "numpy": "numpy", "pt": "torch", "torch": "torch"}

# The torch dtype (an attribute of the torch module) for each rbe dtype; numpy
# has no bf16 or fp8, so those arrive from the reader as uint bits and are viewed.
TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def safe_open(path: str | os.PathLike, framework: str = "np", device="cpu", **options) -> Reader:
    """Opens an rbe file lazily (the manifest only; tensors are read when asked for), like ``safetensors.safe_open``.

    ``framework`` is ``"np"``/``"numpy"`` (arrays; bf16 as uint16, fp8 as
    uint8) or ``"pt"``/``"torch"`` (tensors in their own dtype on ``device``).
    ``options`` go to ``Reader`` (``threads``, ``verify_checksums``, and
    ``map_raw``: raw tensors as views of the memory-mapped file, where a file
    truncated underneath is the caller's risk).  ``keys()`` is sorted, as safetensors'.
    """
    kind = FRAMEWORKS.get(framework) if isinstance(framework, str) else None
    if kind is None:
        raise UsageError(f"framework {framework!r} is not supported; use one of {', '.join(FRAMEWORKS)}")
    if kind == "torch":
        return _TorchReader(path, device, **options)
    if device != "cpu":
        raise UsageError(f"framework {framework!r} reads into host memory: device must be 'cpu', not {device!r}")
    return _SafeOpenReader(path, **options)


class _SafeOpenReader(Reader):
    """``safe_open``'s Reader: ``keys()`` sorted, as safetensors' ``keys()`` are (``Reader.keys()`` keeps
    the file's order, in which a whole-file pass reads sequentially)."""

    def keys(self) -> list[str]:
        return sorted(super().keys())


class _TorchReader(_SafeOpenReader):
    """A Reader whose tensors and slices come back as torch tensors."""

    def __init__(self, path: str | os.PathLike, device, **options):
        self._torch = _import_torch()
        self._device = _torch_device(self._torch, device)
        super().__init__(path, **options)

    def _convert(self, array: np.ndarray, dtype: DType):
        torch = self._torch
        if not (array.flags.writeable and array.flags.c_contiguous):  # e.g. a view of the read-only map
            array = array.copy(order="C")
        tensor = torch.from_numpy(array)
        target = getattr(torch, TORCH_DTYPES[dtype.name])
        if tensor.dtype != target:  # bf16 and fp8 bits
            tensor = tensor.view(target)
        return tensor if self._device.type == "cpu" else tensor.to(self._device)


def _import_torch():
    (torch,) = TORCH_TENSORS.require("framework 'pt'")
    return torch


def _torch_device(torch, device):
    """``device`` as a torch.device, checked to be usable now rather than at the first tensor."""
    try:
        parsed = torch.device(device)
        if parsed.type != "cpu":
            torch.empty(0, device=parsed)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise UsageError(f"device {device!r} is not usable here ({exc})") from None
    return parsed


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    dtypes: Mapping[str, str] | None = None,
    codec: Codec | None = None,
    force: bool = True,
) -> None:
    """Writes numpy ``tensors`` to ``path``, losslessly unless ``codec`` says otherwise.

    As ``safetensors.numpy.save_file`` does, an existing file is replaced
    (``force=False`` refuses with OutputExistsError); the new file is written
    under a temporary name and renamed into place only when complete.
    ``dtypes`` gives the rbe dtype of arrays whose numpy dtype cannot say it:
    bf16 as uint16 and fp8 as uint8, as ``get_tensor`` returns them.  Equal
    tensors are stored once (aliases).  Torch tensors:
    ``rbe_loaders.torch.save_file``.
    """
    dtypes = dict(dtypes or {})
    _check_arrays(tensors, dtypes)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise UsageTypeError(f"metadata must be a dict of strings, not {type(metadata).__name__}")
    target = os.fspath(path)
    if os.path.isdir(target):
        raise UsageError(f"{target}: is a directory; save_file needs a file path")
    try:
        with Writer(target, force=force, codec=codec) as writer:
            if metadata is not None:
                writer.set_metadata(dict(metadata))
            for name in sorted(tensors):
                writer.add_array(name, tensors[name], dtype=dtypes.get(name))
    except OSError as exc:
        raise RbeError(f"{target}: cannot write ({exc.strerror or exc})") from None


def _check_arrays(tensors, dtypes: dict[str, str]) -> None:
    if not isinstance(tensors, Mapping):
        raise UsageTypeError(f"save_file takes a dict of name -> numpy array, not {type(tensors).__name__}")
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise UsageTypeError(f"tensor names must be strings, not {name!r}")
        if not isinstance(value, np.ndarray):
            raise UsageTypeError(_not_an_array(name, value))
    for name, dtype in dtypes.items():
        if name not in tensors:
            raise UsageError(f"dtypes names {name!r}, which is not among the tensors")
        if dtype not in DTYPES:
            raise UsageError(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")


def _not_an_array(name: str, value) -> str:
    if type(value).__module__.split(".")[0] == "torch":
        return (
            f"tensor {name!r} is a torch tensor; rbeformat.save_file takes numpy arrays, "
            "save torch tensors with rbe_loaders.torch.save_file"
        )
    return f"tensor {name!r}: expected a numpy array, got {type(value).__name__} (wrap it in numpy.asarray)"


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of ``path`` into memory, as ``safetensors.numpy.load_file``.

    Every array is its own: an alias (a tied weight) is decoded once and copied.
    """
    out: dict[str, np.ndarray] = {}
    decoded: dict[str, np.ndarray] = {}
    with Reader(path) as reader:
        for name in reader.keys():
            stored = reader.stored_entry(name).name
            if stored in decoded:
                out[name] = decoded[stored].copy()
            else:
                out[name] = decoded[stored] = reader.get_tensor(name)
    return out
