"""What every torch decoder shares: ``WeightDecoder``, the ``Site`` and ``Options`` records, packed codes.

A ``WeightDecoder`` is a ``torch.nn.Module`` holding one stored tensor's codec
parts as buffers (packed codes stay uint8, scales keep their stored dtype)
and rebuilding the tensor with torch ops on the buffers' device:

* ``forward()``: the dense float32 tensor.  It equals the numpy reference
  (``Reader.get_tensor``) bit for bit, except ``lowrank``'s product, whose
  float64 sums may be taken in another order (within 1e-6 relative).  A
  tensor stored as F16 or BF16 comes back rounded through that dtype, as the
  reader rounds it, then as float32.
* ``rows(index)``: rows of the first axis (an embedding lookup).  ``gquant``
  decodes only those rows, ``lowrank`` multiplies only those rows of A.
* ``linear(x)`` = x @ W.T (a ``torch.nn.Linear`` weight W, out x in) and
  ``matmul(x)`` = x @ W (a weight stored in x out: an ONNX MatMul's B, GPT-2's
  Conv1D).  By default W is decoded and multiplied; ``lowrank`` runs two thin
  matmuls, ``transpose`` hands the product to its values' decoder with the
  other method (x @ W = x @ V.T for W stored as V = W.T), and ``gquant`` runs
  the int4 kernel its module describes where it fits.
* ``form`` (a line for a load report) and ``resident_bytes()`` (bytes of its
  buffers and sub-decoders; shared tables apart, see ``shared_bytes`` in
  ``rbe_loaders.torch.decoders``).

Each decoder class is built from a ``Site``: one codec of a tensor's chain,
its transform, and how to read its parts through the reader; ``Options``
carry what ``build_decoder`` was asked for down the chain, the table's lookup
(``Options.build``) among them.  ``WeightDecoder.hold`` keeps a part: a part
that another codec encodes (``lowrank`` factors quantized by ``gquant``,
``transpose(values=gquant(...))``, chained scales) becomes a child decoder
when that codec's formula has a row in the table; otherwise it is decoded
once, at build, and held dense in its part dtype.  A part stored plainly is
held in its stored dtype.

Packed codes are held as their ``bitpack`` stream padded to whole 8-value
words plus ``PAD_BYTES`` (``padded_packed``), and read back with torch ops
(``unpack``: the first values; ``unpack_at``: values at any positions, up to
``MAX_GATHER_BITS`` bits each).

Other ``linear`` paths of note: ``lowrank``'s two matmuls reorder float32
sums (about 1e-6 relative); structured products are used only for tensors
stored as F32 or F64, since a reader rounds an F16 or BF16 tensor after the
product (``WeightDecoder.products_exact``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from rbeformat import FormatError, Reader
from rbeformat.manifest import Transform

MAX_GATHER_BITS = 25  # unpack_at reads a 4-byte window: a value of up to 25 bits at any bit offset
PAD_BYTES = 4  # zero bytes after every packed buffer, for that window


# -- packed codes ------------------------------------------------------------------------


def padded_packed(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """A packed stream (``bitpack``) padded with zero bytes to whole 8-value words, plus PAD_BYTES."""
    size = -(-count // 8) * bits + PAD_BYTES
    out = np.zeros(size, np.uint8)
    out[: data.size] = np.asarray(data, np.uint8).reshape(-1)
    return out


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` values of a padded packed stream: uint8 for up to 8 bits, else int64."""
    if bits == 8:
        return packed[:count]
    if bits > 8:
        return unpack_at(packed, bits, torch.arange(count, device=packed.device))
    # ``per`` values fill ``span`` whole bytes; value k of each word is cut from the one or two
    # bytes it covers in uint8 arithmetic (a left shift drops the bits above 8 for free).
    per = 8 // math.gcd(8, bits)
    span = per * bits // 8
    words = -(-count // per)
    planes = packed[: words * span].view(words, span)
    out = torch.empty((words, per), dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for k in range(per):
        byte, shift = divmod(k * bits, 8)
        value = planes[:, byte] >> shift
        if shift + bits > 8:
            value = value | (planes[:, byte + 1] << (8 - shift))
        out[:, k] = value & mask if shift + bits != 8 else value
    return out.view(-1)[:count]


def unpack_at(packed: torch.Tensor, bits: int, positions: torch.Tensor) -> torch.Tensor:
    """Values number ``positions`` (int64, any shape) of a padded packed stream, as int64."""
    bit = positions * bits
    byte, shift = bit >> 3, bit & 7
    window = packed[byte].to(torch.int64)
    for j in range(1, (bits + 14) // 8):  # the bytes a value can touch at a shift of up to 7
        window |= packed[byte + j].to(torch.int64) << (8 * j)
    return (window >> shift) & ((1 << bits) - 1)


def _as_torch(array: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    """A numpy part (bf16 as its uint16 bits) as a torch tensor of the rbe dtype, on ``device``."""
    array = np.ascontiguousarray(array)
    if dtype == "BF16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(array.copy()).to(device)


def _stored_rounding(dtype: str) -> torch.dtype | None:
    """The dtype a reader rounds a float32 decode through, for tensors stored narrower than float32."""
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtype)


def _check_finite(value: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FormatError(f"{where}: holds NaN or infinite values")


# -- where a codec sits in a chain -------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What ``build_decoder`` was asked for, the same for every codec of a tensor's chain."""

    device: torch.device
    kernel: str  # "int4" or "exact"
    tables: dict | None  # shared seed tables; None: the seed module's cache
    build: Callable[[Site], WeightDecoder | None]  # the table's lookup: a site's decoder, None without a row
    lookups: bool = True  # whether rows or the dense tensor will be asked for (else only products)


@dataclass(frozen=True)
class Site:
    """One codec of a tensor's chain: the transform, and how to read its parts through the reader."""

    reader: Reader
    name: str  # the stored tensor
    prefix: str  # "" for the tensor's own codec, "A." for the codec of its part A, ...
    transform: Transform
    shape: tuple[int, ...]
    dtype: str  # rbe dtype the codec's output is stored as
    options: Options
    linear_use: bool = True  # whether its decoder's linear or matmul may run (else only forward and rows)

    @property
    def codec(self):
        return self.transform.codec

    @property
    def params(self):
        return self.transform.params

    @property
    def where(self) -> str:
        return f"tensor {self.name!r}" + (f" part {self.prefix[:-1]}" if self.prefix else "")

    @property
    def device(self) -> torch.device:
        return self.options.device

    def array(self, part: str) -> np.ndarray:
        """A part decoded by the reader, in its stored dtype (a chained part through its chain)."""
        return self.reader.get_part(self.name, self.prefix + part)

    def stored(self, part: str) -> torch.Tensor:
        return _as_torch(self.array(part), self.transform.parts[part].dtype.name, self.device)

    def packed(self, part: str, bits: int, count: int) -> torch.Tensor:
        return torch.from_numpy(padded_packed(self.array(part), bits, count)).to(self.device)

    def child(self, part: str, linear_use: bool) -> Site | None:
        p = self.transform.parts[part]
        if p.transform is None:
            return None
        return replace(
            self,
            prefix=f"{self.prefix}{part}.",
            transform=p.transform,
            shape=tuple(p.shape),
            dtype=p.dtype.name,
            linear_use=linear_use and self.linear_use,
        )


# -- the decoder base --------------------------------------------------------------------


class WeightDecoder(torch.nn.Module):
    """One stored tensor as its codec parts, rebuilt with torch ops (see the module docstring)."""

    def __init__(self, site: Site, form: str):
        super().__init__()
        self.shape = tuple(site.shape)
        self.stored_dtype = site.dtype
        self.where = site.where
        self.own_form = form  # its line in ``form``; a subclass may add to it
        self.part_forms: dict[str, str] = {}  # part -> how it is held (a child decoder's form, ...)

    # -- parts: a buffer in its stored dtype, or a child decoder --------------------------
    def hold(self, site: Site, part: str, finite: bool = False, linear_use: bool = False) -> None:
        """Keeps ``part`` as a child decoder when its codec's formula has a row in the table, else as a buffer.

        ``linear_use``: this decoder's products call the part's (so a gquant part may take the int4 kernel).
        """
        child_site = site.child(part, linear_use)
        child = site.options.build(child_site) if child_site is not None else None
        if child is not None:
            self.add_module(part, child)
            self.part_forms[part] = child.form
        else:
            self.register_buffer(part, site.stored(part))
            self.part_forms[part] = (
                f"decoded at build from {child_site.codec.name}"
                if child_site is not None
                else f"stored {site.transform.parts[part].dtype.name}"
            )
        if finite:  # as the reference refuses them at every decode; buffers never change
            _check_finite(self.value(part), f"{site.where}.{part}")

    def value(self, part: str) -> torch.Tensor:
        """A part's float32 values (a child decoder runs)."""
        held = getattr(self, part)
        return held() if isinstance(held, WeightDecoder) else held.float()

    def part_rows(self, part: str, index: torch.Tensor) -> torch.Tensor:
        held = getattr(self, part)
        return held.rows(index) if isinstance(held, WeightDecoder) else held[index].float()

    def part_linear(self, part: str, x: torch.Tensor) -> torch.Tensor:
        held = getattr(self, part)
        return held.linear(x) if isinstance(held, WeightDecoder) else F.linear(x, held.to(x.dtype))

    def part_matmul(self, part: str, x: torch.Tensor) -> torch.Tensor:
        held = getattr(self, part)
        return held.matmul(x) if isinstance(held, WeightDecoder) else torch.matmul(x, held.to(x.dtype))

    # -- the tensor -------------------------------------------------------------------------
    def decode(self) -> torch.Tensor:
        """The float32 decode, before the rounding to the stored dtype."""
        raise NotImplementedError

    def as_stored(self, values: torch.Tensor) -> torch.Tensor:
        """float32 values rounded as the reader stores them (F16, BF16), back as float32."""
        rounding = _stored_rounding(self.stored_dtype)
        return values if rounding is None else values.to(rounding).float()

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def products_exact(self) -> bool:
        """Whether a product computed from the parts matches one with the decoded tensor: the reader
        rounds F16 and BF16 tensors after decoding, which a structured product would skip."""
        return _stored_rounding(self.stored_dtype) is None

    def forward(self) -> torch.Tensor:
        return self.as_stored(self.decode())

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the first axis: the result has shape index.shape + shape[1:]."""
        return self()[index]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T, W this tensor as a Linear weight (out x in)."""
        return F.linear(x, self().to(x.dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W, W this tensor stored in x out."""
        return torch.matmul(x, self().to(x.dtype))

    # -- the report -------------------------------------------------------------------------
    @property
    def form(self) -> str:
        parts = "; ".join(f"{k}: {v}" for k, v in self.part_forms.items() if not v.startswith("stored "))
        return f"{self.own_form} [{parts}]" if parts else self.own_form

    def resident_bytes(self) -> int:
        """Bytes of its buffers and sub-decoders (a shared table is counted by ``decoders.shared_bytes``)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def shared_tensors(self) -> dict:
        """Tensors shared with other decoders (seed basis tables), by key, its children's included."""
        out = {}
        for child in self.children():
            if isinstance(child, WeightDecoder):
                out.update(child.shared_tensors())
        return out

    def extra_repr(self) -> str:
        return f"{list(self.shape)} {self.stored_dtype}: {self.form}"


def checked_rows(index: torch.Tensor, length: int) -> torch.Tensor:
    """Row indices as int64, negative ones counted from the end; IndexError past the axis."""
    index = torch.as_tensor(index).to(torch.int64)
    if index.numel() and bool(((index >= length) | (index < -length)).any()):
        raise IndexError(f"row index out of range for a first axis of {length}")
    return torch.where(index < 0, index + length, index)
