"""Load an rbe container into PyTorch tensors.

>>> from rbe_loaders.torch import load_state_dict   # doctest: +SKIP
>>> state = load_state_dict("model.rbe")
"""

from __future__ import annotations

import os

import torch

from rbeformat import Reader

_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Decodes every tensor; tied tensors share one torch storage, as they do in a model."""
    out: dict[str, torch.Tensor] = {}
    with Reader(path) as r:
        for name in r.keys():
            entry = r.entry(name)
            if entry.alias_of:
                continue
            data = bytearray(r.tensor_bytes(name))
            t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            out[name] = t.view(_TORCH_DTYPES[entry.dtype.name]).reshape(entry.shape)
        for name in r.keys():
            entry = r.entry(name)
            if entry.alias_of:
                out[name] = out[entry.alias_of]
    return out
