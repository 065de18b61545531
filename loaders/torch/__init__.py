"""rbe containers to and from PyTorch tensors, in the manner of ``safetensors.torch``.

>>> from rbe_loaders.torch import load_file, load_state_dict, save_file   # doctest: +SKIP
>>> save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, "w.rbe")
>>> load_file("w.rbe")["w"].dtype
torch.bfloat16

Reading goes through ``rbeformat.safe_open(path, framework="pt")``, which holds
the dtype table (``rbeformat.api.TORCH_DTYPES``); this module adds what needs
torch at import time: saving torch tensors, and state dicts with tied storage.

The package's other modules are imported on first use.  ``load_model`` and
``save_model`` come from ``rbe_loaders.torch.model``, which builds a
transformers model whose Linear and Embedding weights stay compressed, each
rebuilt at every use by a decoder of ``rbe_loaders.torch.decoders``: one
module per codec there (``gquant``, ``transpose``, ``lowrank``, ``palette``,
``vq``, ``sparse``, ``seed``, on the shared ``base``), and one table,
``decoders.DECODERS``, keyed by the decode formula a codec declares
(``TensorCodec.formula(params)``: ``gquant.sym``, ``sparse.mask``, ``seed``,
...).  A tensor whose formula has no row is decoded once, at load.  Giving a
new codec a torch mapping is one new decoder module and one table row per
formula it declares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from rbeformat import safe_open
from rbeformat import save_file as save_arrays
from rbeformat.api import TORCH_DTYPES
from rbeformat.errors import UsageError, UsageTypeError
from rbeformat.extras import TORCH_TENSORS

TORCH_TENSORS.require("rbe_loaders.torch")  # an ImportError naming the extra, not a bare "No module named 'torch'"
import torch  # noqa: E402

_RBE_DTYPES = {getattr(torch, attr): name for name, attr in TORCH_DTYPES.items()}
# numpy cannot hold these dtypes; they travel as unsigned ints of the same width.
_BITS_AS = {torch.bfloat16: torch.uint16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    force: bool = True,
) -> None:
    """Writes torch ``tensors`` to ``path`` losslessly, as ``safetensors.torch.save_file``.

    Any dtype rbe has (floats down to bf16 and fp8, ints, bool) on any device;
    a non-contiguous tensor is written as its contiguous copy.  Tensors that
    share storage need no special care, unlike in safetensors: two names for
    the same data (a tied embedding) have equal bytes and are stored once, the
    second as an alias; views of different parts of one storage are each
    stored with their own bytes.  Loading gives every name its own tensor
    (``load_state_dict`` ties aliases back together).  An existing file is
    replaced once the new one is complete (``force=False`` refuses).
    """
    if not isinstance(tensors, Mapping):
        raise UsageTypeError(f"save_file takes a dict of name -> torch.Tensor, not {type(tensors).__name__}")
    arrays, dtypes = {}, {}
    for name, tensor in tensors.items():
        arrays[name], dtypes[name] = _as_numpy(name, tensor)
    save_arrays(arrays, path, metadata, dtypes=dtypes, force=force)


def _as_numpy(name, tensor) -> tuple[np.ndarray, str]:
    """The tensor's bytes as a numpy array on the host, and its rbe dtype name."""
    if not isinstance(tensor, torch.Tensor):
        raise UsageTypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    dtype = _RBE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise UsageError(
            f"tensor {name!r}: torch dtype {tensor.dtype} has no rbe dtype "
            f"(supported: {', '.join(str(d) for d in _RBE_DTYPES)})"
        )
    if tensor.layout != torch.strided:
        raise UsageError(f"tensor {name!r}: {tensor.layout} tensors cannot be saved; convert it with .to_dense()")
    try:
        host = tensor.detach().to("cpu").contiguous()
    except (RuntimeError, NotImplementedError) as exc:  # a meta tensor has no data to copy
        raise UsageError(f"tensor {name!r}: cannot copy it from {tensor.device} ({exc})") from None
    bits = _BITS_AS.get(host.dtype)
    return (host.view(bits) if bits is not None else host).numpy(), dtype


def load_file(path: str | os.PathLike, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` on ``device``, each its own tensor, as ``safetensors.torch.load_file``."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt", device=device) as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
    return out


def load_state_dict(path: str | os.PathLike, device="cpu") -> dict[str, torch.Tensor]:
    """Decodes every tensor; tied tensors share one torch storage, as they do in a model."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt", device=device) as f:
        by_target: dict[str, torch.Tensor] = {}
        for name in f.keys():
            target = f.stored_entry(name).name
            if target not in by_target:
                by_target[target] = f.get_tensor(target)
            out[name] = by_target[target]
    return out


def load_model(
    path: str | os.PathLike,
    device="cpu",
    dtype=None,
    *,
    with_tokenizer: bool = False,
    cache_bytes: int = 0,
    kernel: str = "int4",
    quiet: bool = True,
):
    """The container's transformers model, its quantized weights decoded on the fly: on ``device``, decoded
    values and outputs in ``dtype`` (default float32), ``(model, tokenizer)`` with ``with_tokenizer``,
    up to ``cache_bytes`` of decoded weights kept, ``kernel`` "int4" (torch's int4 CPU kernel where it
    fits) or "exact" (the reference decode); ``quiet=False`` prints what each tensor became.  More in
    ``rbe_loaders.torch.model.load_model``."""
    from .model import load_model as load

    return load(path, device, dtype, with_tokenizer=with_tokenizer, cache_bytes=cache_bytes, kernel=kernel, quiet=quiet)


def save_model(model, path: str | os.PathLike, *, force: bool = False) -> None:
    """Writes a model ``load_model`` returned back to an .rbe file, unchanged (``rbe_loaders.torch.model``)."""
    from .model import save_model as save

    save(model, path, force=force)
