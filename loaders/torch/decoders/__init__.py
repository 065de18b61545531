"""Stored tensors rebuilt by torch at each use, from their codec parts kept compressed in memory.

>>> from rbe_loaders.torch.decoders import build_decoder, decode_at_load_reason   # doctest: +SKIP
>>> with Reader("model.rbe") as r:
...     dec = build_decoder(r, "model.layers.0.mlp.up_proj.weight")  # None: decode it at load
...     y = dec.linear(x)               # x @ W.T, W never held
...     w = dec()                       # the dense float32 tensor, as Reader.get_tensor gives it

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
  the int4 kernel described below where it fits.
* ``form`` (a line for a load report) and ``resident_bytes()`` (bytes of its
  buffers and sub-decoders; shared tables apart, see ``shared_bytes``).

What each codec keeps (``DECODERS``):

=========  ==================================================================
gquant     packed codes (uint8), scales and zeros in their stored dtype
transpose  its ``values`` part
lowrank    A, B and the residual, each a part
palette    packed indices, codebooks in their stored dtype
vq         packed indices, codebook and scales (F16 parts)
sparse     values; the packed mask, or the packed delta codes
nm24       packed 13-bit pattern codes, values
seed       seeds, packed coefficient and exponent codes; the basis u(s) of
           every seed from one table shared per (S, C, P) and device
=========  ==================================================================

A part that another codec encodes (``lowrank`` factors quantized by
``gquant``, ``transpose(values=gquant(...))``, chained scales) becomes a
child decoder when that codec has a mapping; otherwise it is decoded once, at
build, and held dense in its part dtype.  A part stored plainly is held in
its stored dtype.  A tensor stored plainly, or whose top codec has no mapping
or reads other tensors (``normdelta``), gets no decoder: ``build_decoder``
returns None and ``decode_at_load_reason`` says why.

Index values that could point past a table (vq indices, seeds, nm24 pattern
codes, sparse index structures) are checked once at build, as the reference
decode checks them, so that the torch ops never index out of bounds; a
malformed part raises ``rbeformat.FormatError``.  Non-finite scales, zeros
and codebooks are refused at build as the reference refuses them.

The int4 kernel (CPU)
---------------------
torch's ``_weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros)``
computes x @ ((q - 8) * scale + zero).T for 4-bit q, one (scale, zero) per
group of g inputs.  A ``gquant`` weight (N out, K in, grouped along K) maps
onto it exactly as algebra, then in bfloat16:

* each code c (or, for 5 to 8 bits, its high and low parts) enters as a
  4-bit q centred on the kernel's 8: a piece p of b bits is q = p + 8 -
  2**(b-1), so p * s = (q - 8) * s + 2**(b-1) * s.  Up to 4 bits that gives
  w = (q - 8) * s + zero with zero = 0 in sym mode (w = (c - 2**(bits-1)) * s)
  and zero = o + 2**(bits-1) * s in asym mode (w = c * s + o).
* 5 to 8 bits: c = h * 2**r + l with r = bits - 4, h = c >> r and l the low r
  bits: two int4 matmuls, on h with scale 2**r * s and on l with scale s,
  their outputs summed in float32.  Every constant goes to the low plane's
  zero: 2**(r-1) * s (sym) or o + (8 * 2**r + 2**(r-1)) * s (asym).  Centring
  keeps the terms that bfloat16 rounds as small as the weights themselves
  (the uncentred 2-bit form lost about 2% of the output scale).

Constraints found by testing torch 2.13: the kernel group must be 32, 64,
128 or 256; K a multiple of it; N a multiple of 16.  So each kernel group
must lie in one gquant group: the gquant group must be a multiple of 32 (or
0, one scale for the tensor: any kernel group fits).  K is padded with zero
inputs to a multiple of the kernel group (the group a short last gquant
group falls in keeps its scale), N with zero rows; the padding costs a copy
of x per call when K is padded.  Activations and scales are cast to
bfloat16; with float32 or float16 activations the kernel measured about 10x
slower than a dense matmul, with bfloat16 about 3x faster at batch 1 (59 us
against 183 us for 1536 x 576).  It runs on the CPU only; elsewhere, and
where it does not fit (``int4_unfit_reason``), ``linear`` decodes W.

Error of that path: x and every scale and zero are rounded to bfloat16 (8
significant bits) and the output comes back in bfloat16: about 0.3% of the
output scale (max |y - x W^T| / max |x W^T|), measured 2.6e-3 to 4.1e-3
for every width and mode on a random 256 x 512 weight (group 64, batch 8);
every other path is exact as above.  Pass
``kernel="exact"`` to ``build_decoder`` for the exact path everywhere.

Other ``linear`` paths of note: ``lowrank``'s two matmuls reorder float32
sums (about 1e-6 relative); structured products are used only for tensors
stored as F32 or F64, since a reader rounds an F16 or BF16 tensor after the
product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from rbeformat import FormatError, Reader
from rbeformat.codecs import seed as seed_codec
from rbeformat.codecs import sparse as sparse_codec
from rbeformat.codecs.gquant import group_layout
from rbeformat.codecs.util import bitpack
from rbeformat.codecs.util.arrays import check_index_range, unpack_codes
from rbeformat.codecs.vq import index_bits
from rbeformat.manifest import Transform

KERNEL_GROUPS = (256, 128, 64, 32)  # the int4 kernel's group sizes, largest first
KERNEL_ROWS = 16  # the int4 kernel packs output rows in multiples of this
MAX_GATHER_BITS = 25  # unpack_at reads a 4-byte window: a value of up to 25 bits at any bit offset
PAD_BYTES = 4  # zero bytes after every packed buffer, for that window
_INT4_OPS = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


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
class _Options:
    device: torch.device
    kernel: str  # "int4" or "exact"
    tables: dict | None  # shared seed tables; None: the module's cache
    lookups: bool = True  # whether rows or the dense tensor will be asked for (else only products)


@dataclass(frozen=True)
class _Site:
    """One codec of a tensor's chain: the transform, and how to read its parts through the reader."""

    reader: Reader
    name: str  # the stored tensor
    prefix: str  # "" for the tensor's own codec, "A." for the codec of its part A, ...
    transform: Transform
    shape: tuple[int, ...]
    dtype: str  # rbe dtype the codec's output is stored as
    options: _Options
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

    def child(self, part: str, linear_use: bool) -> _Site | None:
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

    def __init__(self, site: _Site, form: str):
        super().__init__()
        self.shape = tuple(site.shape)
        self.stored_dtype = site.dtype
        self.where = site.where
        self._form = form
        self._part_forms: dict[str, str] = {}

    # -- parts: a buffer in its stored dtype, or a child decoder --------------------------
    def hold(self, site: _Site, part: str, finite: bool = False, linear_use: bool = False) -> None:
        """Keeps ``part`` as a child decoder when its chain has a mapping, else as a buffer.

        ``linear_use``: this decoder's products call the part's (so a gquant part may take the int4 kernel).
        """
        child_site = site.child(part, linear_use)
        child = _build(child_site) if child_site is not None else None
        if child is not None:
            self.add_module(part, child)
            self._part_forms[part] = child.form
        else:
            self.register_buffer(part, site.stored(part))
            self._part_forms[part] = (
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
        parts = "; ".join(f"{k}: {v}" for k, v in self._part_forms.items() if not v.startswith("stored "))
        return f"{self._form} [{parts}]" if parts else self._form

    def resident_bytes(self) -> int:
        """Bytes of its buffers and sub-decoders (a shared table is counted by ``shared_bytes``)."""
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


def shared_bytes(decoders: Iterable[WeightDecoder]) -> int:
    """Bytes of the shared tables that ``decoders`` read, each table once."""
    tables = {}
    for decoder in decoders:
        tables.update(decoder.shared_tensors())
    return sum(t.numel() * t.element_size() for t in tables.values())


def _checked_rows(index: torch.Tensor, length: int) -> torch.Tensor:
    """Row indices as int64, negative ones counted from the end; IndexError past the axis."""
    index = torch.as_tensor(index).to(torch.int64)
    if index.numel() and bool(((index >= length) | (index < -length)).any()):
        raise IndexError(f"row index out of range for a first axis of {length}")
    return torch.where(index < 0, index + length, index)


# -- gquant ------------------------------------------------------------------------------


def _kernel_group(group: int, k_in: int) -> int | None:
    """The int4 kernel group for a gquant group: one dividing it (any for group 0), K padded least."""
    candidates = [g for g in KERNEL_GROUPS if group == 0 or group % g == 0]
    if not candidates:
        return None
    return min(candidates, key=lambda g: (-(-k_in // g) * g, -g))


def int4_unfit_reason(codec, shape: tuple[int, ...], device="cpu") -> str | None:
    """Why a gquant tensor of ``shape`` cannot be a Linear weight (N, K) on the int4 kernel; None if it can."""
    if codec.name != "gquant":
        return f"{codec.name} is not gquant"
    if torch.device(device).type != "cpu":
        return f"the int4 kernel runs on the CPU, not {torch.device(device).type}"
    if not _INT4_OPS:
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if len(shape) != 2 or 0 in shape:
        return f"shape {list(shape)} is not a non-empty matrix"
    if _kernel_group(codec.group, shape[1]) is None:
        return f"group {codec.group} is not a multiple of 32 (the kernel's groups are 32, 64, 128, 256)"
    return None


def int4_kernel_fits(codec, shape: tuple[int, ...], device="cpu") -> bool:
    return int4_unfit_reason(codec, shape, device) is None


def int4_planes(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, mode: str
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(4-bit codes q, scale, zero) per int4 matmul, w being the sum of (q - 8) * scale + zero.

    ``scales`` and ``zeros`` are per kernel group, float64, of one shape; see the module docstring.
    """
    if bits <= 4:
        pieces = [(codes, bits, scales)]
    else:  # c = h * 2**r + l: c * s = h * (2**r * s) + l * s
        r = bits - 4
        pieces = [(codes >> np.uint8(r), 4, 2**r * scales), (codes & np.uint8((1 << r) - 1), r, scales)]
    # A piece p of `width` bits enters as q = p + 8 - 2**(width-1), centred on the kernel's 8:
    # p * scale = (q - 8) * scale + 2**(width-1) * scale.  The constants go to the last zero.
    total = zeros.copy() if mode == "asym" else -(2.0 ** (bits - 1)) * scales
    for _, width, scale in pieces:
        total = total + 2.0 ** (width - 1) * scale
    planes = []
    for i, (piece, width, scale) in enumerate(pieces):
        q = piece.astype(np.uint8) + np.uint8(8 - 2 ** (width - 1))
        planes.append((q, scale, total if i == len(pieces) - 1 else np.zeros_like(scale)))
    return planes


class Int4Linear(torch.nn.Module):
    """x @ W.T on torch's CPU int4 kernel for a gquant weight W (N, K); see the module docstring."""

    def __init__(
        self,
        codes: np.ndarray,
        scales: np.ndarray,
        zeros: np.ndarray | None,
        bits: int,
        mode: str,
        group: int,
        device="cpu",
    ):
        """``codes`` (N, K) uint8; ``scales``/``zeros`` (N, groups) or (1,) for group 0, as the float32
        values the reference decode uses."""
        super().__init__()
        n_out, k_in = codes.shape
        self.out_features, self.in_features = n_out, k_in
        self.kernel_group = _kernel_group(group, k_in)
        if self.kernel_group is None:
            raise ValueError(f"gquant group {group} does not fit the int4 kernel")
        kg = self.kernel_group
        self.padded_in = -(-k_in // kg) * kg
        padded_out = -(-n_out // KERNEL_ROWS) * KERNEL_ROWS
        # Each kernel group lies in one gquant group: its first column's.
        starts = np.arange(self.padded_in // kg) * kg
        per_block = (
            (lambda v: np.full((n_out, len(starts)), v.reshape(-1)[0], np.float64))
            if group == 0
            else (lambda v: v.astype(np.float64).reshape(n_out, -1)[:, starts // group])
        )
        block_zeros = per_block(zeros) if zeros is not None else None
        planes = int4_planes(codes, per_block(scales), block_zeros, bits, mode)
        self.planes = len(planes)
        for i, (q, s, z) in enumerate(planes):
            padded = np.full((padded_out, self.padded_in), 8, np.int32)  # code 8 with scale 0, zero 0: w = 0
            padded[:n_out, :k_in] = q
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(padded), 1)
            sz = np.zeros((len(starts), padded_out, 2), np.float32)
            sz[:, :n_out, 0], sz[:, :n_out, 1] = s.T, z.T
            self.register_buffer(f"packed{i}", packed.to(device))
            self.register_buffer(f"scales_and_zeros{i}", torch.from_numpy(sz).to(torch.bfloat16).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.padded_in != self.in_features:  # zero inputs meet the padded codes
            a = F.pad(a, (0, self.padded_in - self.in_features))
        out = None
        for i in range(self.planes):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                a, getattr(self, f"packed{i}"), self.kernel_group, getattr(self, f"scales_and_zeros{i}")
            )
            out = y.float() if out is None else out + y.float()
        return out[:, : self.out_features].to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.out_features} x {self.in_features}, kernel group {self.kernel_group}, {self.planes} plane(s)"


class GQuantDecoder(WeightDecoder):
    """Grouped uniform quantization: w = (c - 2**(bits-1)) * s (sym) or c * s + o (asym)."""

    def __init__(self, site: _Site):
        codec = site.codec
        self.bits, self.group, self.mode = codec.bits, codec.group, codec.mode
        super().__init__(site, f"gquant {codec.bits}-bit g{codec.group} {codec.mode}, decoded per forward")
        self.numel = math.prod(site.shape)
        self.layout = group_layout(site.shape, codec.group)  # rows, row length, groups per row
        self.register_buffer("codes", site.packed("codes", codec.bits, self.numel))
        self.hold(site, "scales", finite=True)
        if self.mode == "asym":
            self.hold(site, "zeros", finite=True)
        self.int4 = None
        if not site.linear_use:
            self.int4_reason = "not read as a Linear weight"
        elif site.options.kernel != "int4":
            self.int4_reason = "not asked for"
        else:
            self.int4_reason = int4_unfit_reason(codec, self.shape, site.device)
        self.exact_parts = True
        if self.int4_reason is None:
            self.int4 = self._int4_kernel(site)
            self._form += f"; linear: int4 kernel, bf16, group {self.int4.kernel_group}" + (
                f", {self.bits}-bit codes as 2 planes" if self.int4.planes > 1 else ""
            )
            if not site.options.lookups:  # only products are asked for: the kernel's copy is enough
                self._drop_exact_parts()

    def _drop_exact_parts(self) -> None:
        """Keeps only the int4 kernel's buffers; ``forward`` and ``rows`` then run the kernel on the
        identity (bf16, as ``linear``), for the rare caller that wants the dense weight."""
        for part in ["codes", "scales"] + (["zeros"] if self.mode == "asym" else []):
            held = getattr(self, part)
            if isinstance(held, WeightDecoder):
                delattr(self, part)
            else:
                del self._buffers[part]
        self.exact_parts = False
        self._form += ", kernel parts only"

    def _int4_kernel(self, site: _Site) -> Int4Linear:
        codes = unpack_codes(site.array("codes"), self.bits, self.numel, f"{site.where}.codes").reshape(self.shape)
        floats = {p: self.value(p).cpu().numpy() for p in ("scales", "zeros") if p in self._part_forms}
        return Int4Linear(codes, floats["scales"], floats.get("zeros"), self.bits, self.mode, self.group, site.device)

    def _centred(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.float()
        return c - 2 ** (self.bits - 1) if self.mode == "sym" else c

    def decode(self) -> torch.Tensor:
        rows, n, ng = self.layout
        if not self.exact_parts:
            eye = torch.eye(self.shape[1], device=self.device)
            return self.int4(eye).t().contiguous()  # x @ W.T at x = I is W.T
        if self.numel == 0:
            return torch.zeros(self.shape, device=self.codes.device)
        c = self._centred(unpack(self.codes, self.bits, self.numel))
        if self.group and n == ng * self.group:  # whole groups: one value per group broadcast, no copies
            c = c.view(rows, ng, self.group)
            per_group = lambda part: self.value(part).view(rows, ng, 1)  # noqa: E731
        else:
            c = c.view(rows, n)
            per_group = lambda part: self._per_element(part, rows, n, ng)  # noqa: E731
        out = c * per_group("scales")
        if self.mode == "asym":  # the product is rounded before the sum, as in the reference
            out = out + per_group("zeros")
        return out.view(self.shape)

    def _per_element(self, part: str, rows: int, n: int, ng: int) -> torch.Tensor:
        """A per-group part broadcast to (rows, n): one value for group 0, else each column's group."""
        v = self.value(part)
        if self.group == 0:
            return v.view(1, 1)
        columns = torch.arange(n, device=v.device) // self.group
        return v.view(rows, ng).index_select(1, columns)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = _checked_rows(index, self.shape[0]).to(self.device)
        if not self.exact_parts:
            return self.decode()[index]
        row_length = self.numel // self.shape[0] if self.shape[0] else 0
        elements = index.reshape(-1, 1) * row_length + torch.arange(row_length, device=index.device)
        c = self._centred(unpack_at(self.codes, self.bits, elements))
        out = c * self._per_position("scales", elements)
        if self.mode == "asym":
            out = out + self._per_position("zeros", elements)
        return self.as_stored(out).view(*index.shape, *self.shape[1:])

    def _per_position(self, part: str, elements: torch.Tensor) -> torch.Tensor:
        """A per-group part at flat element positions."""
        v = self.value(part).reshape(-1)
        if self.group == 0:
            return v[0]
        _, n, ng = self.layout
        return v[(elements // n) * ng + (elements % n) // self.group]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None and x.device.type == "cpu":
            return self.int4(x)
        return super().linear(x)


# -- transpose -----------------------------------------------------------------------------


class TransposeDecoder(WeightDecoder):
    """W stored as V = W.T: x @ W.T = x @ V and x @ W = x @ V.T go to V's decoder."""

    def __init__(self, site: _Site):
        super().__init__(site, "transpose")
        self.hold(site, "values", linear_use=self.products_exact)

    @property
    def form(self) -> str:
        return f"transpose of [{self._part_forms['values']}]"

    def decode(self) -> torch.Tensor:
        return self.value("values").t().contiguous()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.part_matmul("values", x) if self.products_exact else super().linear(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.part_linear("values", x) if self.products_exact else super().matmul(x)


# -- lowrank ----------------------------------------------------------------------------------


class LowRankDecoder(WeightDecoder):
    """W = float32(A @ B, summed in float64) (+ R); products run as two thin matmuls."""

    def __init__(self, site: _Site):
        super().__init__(site, f"lowrank rank {site.params['rank']}")
        if self.products_exact:
            self._form += ", linear as two matmuls"
        self.has_residual = site.codec.residual
        for part in ("A", "B") + (("residual",) if self.has_residual else ()):
            self.hold(site, part, linear_use=self.products_exact)

    def decode(self) -> torch.Tensor:
        out = (self.value("A").double() @ self.value("B").double()).float()
        return out + self.value("residual") if self.has_residual else out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = _checked_rows(index, self.shape[0]).to(self.device)
        flat = index.reshape(-1)
        out = (self.part_rows("A", flat).double() @ self.value("B").double()).float()
        if self.has_residual:
            out = out + self.part_rows("residual", flat)
        return self.as_stored(out).view(*index.shape, self.shape[1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if not self.products_exact:
            return super().linear(x)
        y = self.part_linear("A", self.part_linear("B", x))  # x @ B.T @ A.T
        return y + self.part_linear("residual", x) if self.has_residual else y

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.products_exact:
            return super().matmul(x)
        y = self.part_matmul("B", self.part_matmul("A", x))  # x @ A @ B
        return y + self.part_matmul("residual", x) if self.has_residual else y


# -- palette ------------------------------------------------------------------------------


class PaletteDecoder(WeightDecoder):
    """value = codebook[k][index], codebook k of the tensor, the row, or the row's group."""

    def __init__(self, site: _Site):
        codec = site.codec
        self.bits, self.scope, self.group = codec.bits, codec.scope, codec.group
        scope = codec.scope + (f" g{codec.group}" if codec.scope == "group" else "")
        super().__init__(site, f"palette {codec.bits}-bit per {scope}, decoded per forward")
        self.numel = math.prod(site.shape)
        # Indices of ``bits`` bits always fall in a codebook of 2**bits entries.
        self.register_buffer("indices", site.packed("indices", codec.bits, self.numel))
        self.hold(site, "codebook", finite=True)

    def decode(self) -> torch.Tensor:
        if self.numel == 0:
            return torch.zeros(self.shape, device=self.indices.device)
        idx = unpack(self.indices, self.bits, self.numel).long()
        books = self.value("codebook")
        if self.scope == "tensor":
            return books[0][idx].view(self.shape)
        rows, n = self.numel // self.shape[-1], self.shape[-1]
        idx = idx.view(rows, n)
        if self.scope == "row":
            return books.gather(1, idx).view(self.shape)
        ng, k = -(-n // self.group), 2**self.bits
        book_of = torch.arange(rows, device=idx.device)[:, None] * ng + torch.arange(n, device=idx.device) // self.group
        return books.reshape(-1)[book_of * k + idx].view(self.shape)


# -- vq -------------------------------------------------------------------------------------


class VQDecoder(WeightDecoder):
    """W[r, j*dim + i] = codebook[idx[r, j], i] * scales[r]."""

    def __init__(self, site: _Site):
        codec = site.codec
        self.k = site.params["k"]
        self.index_bits = index_bits(self.k)
        super().__init__(site, f"vq dim {codec.dim}, {self.k} centroids, decoded per forward")
        self.vectors = math.prod(site.shape) // codec.dim
        raw = site.array("indices")
        idx = bitpack.unpack(raw, self.index_bits, self.vectors, f"{site.where}.indices")
        check_index_range(idx, self.k, f"{site.where}.indices")  # k need not be a power of two
        self.register_buffer(
            "indices", torch.from_numpy(padded_packed(raw, self.index_bits, self.vectors)).to(site.device)
        )
        self.hold(site, "codebook")
        self.hold(site, "scales")  # stored inf and NaN are data here, as in the reference

    def decode(self) -> torch.Tensor:
        idx = unpack(self.indices, self.index_bits, self.vectors).long()
        scales = self.value("scales")
        rows = self.value("codebook")[idx].view(scales.numel(), -1)
        return (rows * scales[:, None]).view(self.shape)


# -- sparse and nm24 --------------------------------------------------------------------------


class SparseDecoder(WeightDecoder):
    """Zeros, then the kept values at the positions a bit mask or a delta code stream gives."""

    def __init__(self, site: _Site):
        self.numel = math.prod(site.shape)
        params = site.params
        self.count, self.index = params["count"], params["index"]
        super().__init__(
            site, f"sparse {params['count']} of {self.numel} kept ({params['index']}), scattered per forward"
        )
        raw = site.array(self.index)
        if self.index == "mask":  # the reference's checks: padding bits, then the count
            kept = sparse_codec.mask_indices(raw, self.numel, site.where)
        else:
            kept = sparse_codec.delta_indices(raw, params["width"], params["codes"], self.numel, site.where)
        if kept.size != self.count:
            raise FormatError(f"{site.where}: index structure names {kept.size} elements, values holds {self.count}")
        if self.index == "deltas" and params["width"] <= MAX_GATHER_BITS:
            self.width, self.codes = params["width"], params["codes"]
            self.register_buffer("deltas", torch.from_numpy(padded_packed(raw, self.width, self.codes)).to(site.device))
        else:  # a mask in place of deltas wider than the unpacker reads
            self.index = "mask"
            if params["index"] == "deltas":
                flags = np.zeros(self.numel, np.uint8)
                flags[kept] = 1
                raw = np.packbits(flags, bitorder="little")
            self.register_buffer("mask", torch.from_numpy(padded_packed(raw, 1, self.numel)).to(site.device))
        self.hold(site, "values")

    def decode(self) -> torch.Tensor:
        values = self.value("values")
        out = torch.zeros(self.numel, device=values.device)
        if self.index == "mask":
            out.masked_scatter_(unpack(self.mask, 1, self.numel).bool(), values)
            return out.view(self.shape)
        codes = unpack(self.deltas, self.width, self.codes).long()
        escape = (1 << self.width) - 1
        kept = codes != escape
        end = torch.cumsum(torch.where(kept, codes + 1, codes), 0)  # an escape advances by itself
        out[end[kept] - 1] = values
        return out.view(self.shape)


class NM24Decoder(WeightDecoder):
    """2 of every 4 values kept: a base-6 pattern code per 5 groups names their positions."""

    def __init__(self, site: _Site):
        super().__init__(site, "nm24 2:4, scattered per forward")
        self.groups = math.prod(site.shape) // 4
        self.blocks = -(-self.groups // sparse_codec.GROUPS_PER_CODE)
        raw = site.array("patterns")
        codes = bitpack.unpack(raw, sparse_codec.CODE_BITS, self.blocks, f"{site.where} patterns").astype(np.int64)
        if codes.size and int(codes.max()) >= sparse_codec.CODE_LIMIT:
            raise FormatError(
                f"{site.where}: pattern code {int(codes.max())} is not below 6**5 = {sparse_codec.CODE_LIMIT}"
            )
        digits = (codes[:, None] // sparse_codec.DIGIT_WEIGHTS % 6).reshape(-1)
        if digits[self.groups :].any():
            raise FormatError(f"{site.where}: padding groups of the last pattern code must have pattern 0")
        self.register_buffer(
            "patterns", torch.from_numpy(padded_packed(raw, sparse_codec.CODE_BITS, self.blocks)).to(site.device)
        )
        self.register_buffer("pairs", torch.from_numpy(sparse_codec.PAIRS.copy()).to(site.device), persistent=False)
        self.register_buffer(
            "digit_weights", torch.from_numpy(sparse_codec.DIGIT_WEIGHTS.copy()).to(site.device), persistent=False
        )
        self.hold(site, "values")

    def decode(self) -> torch.Tensor:
        codes = unpack(self.patterns, sparse_codec.CODE_BITS, self.blocks)
        digits = (codes[:, None] // self.digit_weights % 6).reshape(-1)[: self.groups]
        values = self.value("values").reshape(self.groups, 2)
        out = torch.zeros((self.groups, 4), device=values.device)
        return out.scatter_(1, self.pairs[digits], values).view(self.shape)


# -- seed ---------------------------------------------------------------------------------

_SEED_TABLES: dict = {}  # (S, C, P, device) -> u(s) for every seed, shared by every decoder


def seed_table(seed_bits: int, block: int, rank: int, device="cpu", tables: dict | None = None) -> torch.Tensor:
    """u(s) for every seed s as (2**S, C, P) integers (int8 while they fit, S <= 8, else int16), built
    once per setting and device from ``rbeformat.codecs.seed``'s own generator."""
    tables = _SEED_TABLES if tables is None else tables
    key = (seed_bits, block, rank, str(torch.device(device)))
    if key not in tables:
        table = seed_codec.basis_table(block, rank, seed_bits)
        tables[key] = torch.from_numpy(table.astype(np.int8 if seed_bits <= 8 else np.int16)).to(device)
    return tables[key]


class SeedDecoder(WeightDecoder):
    """W[b*C + i] = (sum_j u[seed[b], i, j] * (coeff[b, j] - 2**(Q-1))) * 2**(exponent[b] - shift)."""

    def __init__(self, site: _Site):
        codec = site.codec
        self.block, self.rank, self.seed_bits = codec.block, codec.rank, codec.seed_bits
        self.coef_bits, self.exp_bits = codec.coef_bits, codec.exp_bits
        super().__init__(
            site,
            f"seed S={codec.seed_bits} C={codec.block} P={codec.rank} Q={codec.coef_bits}: "
            "shared basis table, gathered per forward",
        )
        self.blocks = math.prod(site.shape) // codec.block
        seeds = bitpack.unpack(site.array("seeds"), codec.seed_bits, self.blocks, f"{site.where}.seeds")
        if self.blocks and int(seeds.min()) == 0:
            raise FormatError(f"{site.where}.seeds: seed 0 is invalid (block {int(np.argmin(seeds))})")
        # Seeds of up to 16 bits: uint8, or their bits in int16 (torch indexes with neither unsigned type).
        stored = seeds.astype(np.uint8) if codec.seed_bits <= 8 else seeds.astype(np.uint16).view(np.int16)
        self.register_buffer("seeds", torch.from_numpy(stored).to(site.device))
        self.register_buffer("coeffs", site.packed("coeffs", codec.coef_bits, self.blocks * codec.rank))
        self.register_buffer("exponents", site.packed("exponents", codec.exp_bits, self.blocks))
        shift = site.params["exp_bias"] + codec.seed_bits - 1
        scales = np.ldexp(np.float32(1), np.arange(2**codec.exp_bits) - shift).astype(np.float32)  # exact
        self.register_buffer("scales", torch.from_numpy(scales).to(site.device))
        self.key = (codec.seed_bits, codec.block, codec.rank)
        self._tables = site.options.tables
        self.table = seed_table(*self.key, site.device, self._tables)

    def basis(self) -> torch.Tensor:
        """The shared table on this decoder's device (fetched again after ``.to``)."""
        if self.table.device != self.seeds.device:
            self.table = seed_table(*self.key, self.seeds.device, self._tables)
        return self.table

    def decode(self) -> torch.Tensor:
        seeds = self.seeds.long() & 0xFFFF
        basis = self.basis()[seeds].float()  # (blocks, C, P)
        q = unpack(self.coeffs, self.coef_bits, self.blocks * self.rank).float().view(self.blocks, 1, self.rank)
        # Integers below 2**24 in every partial sum: exact in float32 in any order.
        m = (basis * (q - 2 ** (self.coef_bits - 1))).sum(-1)
        scale = self.scales[unpack(self.exponents, self.exp_bits, self.blocks).long()]
        return (m * scale[:, None]).view(self.shape)

    def shared_tensors(self) -> dict:
        return {("seed basis", *self.key, str(self.basis().device)): self.basis()}


# -- the table and the entry points ---------------------------------------------------------

DECODERS: dict[str, Callable[[_Site], WeightDecoder]] = {
    "gquant": GQuantDecoder,
    "transpose": TransposeDecoder,
    "lowrank": LowRankDecoder,
    "palette": PaletteDecoder,
    "vq": VQDecoder,
    "sparse": SparseDecoder,
    "nm24": NM24Decoder,
    "seed": SeedDecoder,
}


def _unmapped(codec) -> str | None:
    if codec.references():
        return f"{codec.name} reads other tensors ({', '.join(codec.references())})"
    if codec.name not in DECODERS:
        return f"{codec.name} has no torch mapping"
    return None


def _build(site: _Site) -> WeightDecoder | None:
    if _unmapped(site.codec) is not None:
        return None
    return DECODERS[site.codec.name](site)


def decode_at_load_reason(reader: Reader, name: str) -> str | None:
    """Why ``build_decoder`` gives no decoder for tensor ``name`` (the caller decodes it at load); None if it does."""
    transform = reader.stored_entry(name).transform
    if transform is None:
        return "stored losslessly"
    return _unmapped(transform.codec)


def build_decoder(
    reader: Reader, name: str, device="cpu", *, kernel: str = "int4", tables: dict | None = None, lookups: bool = True
) -> WeightDecoder | None:
    """The decoder of tensor ``name`` with its buffers on ``device``, or None (see ``decode_at_load_reason``).

    ``kernel="int4"`` lets gquant Linear weights run ``linear`` on the CPU int4 kernel where it fits
    (about 0.3% of the output scale off the exact product); ``"exact"`` keeps every path exact.
    ``tables`` holds the shared seed basis tables (default: a module-level cache).  ``lookups=False``
    says only ``linear`` / ``matmul`` will be asked for (a Linear weight, not an embedding table):
    a gquant weight on the int4 kernel then keeps the kernel's buffers alone.
    """
    if kernel not in ("int4", "exact"):
        raise ValueError(f"kernel must be 'int4' or 'exact', not {kernel!r}")
    if decode_at_load_reason(reader, name) is not None:
        return None
    stored = reader.stored_entry(name)
    site = _Site(
        reader,
        stored.name,
        "",
        stored.transform,
        tuple(stored.shape),
        stored.dtype.name,
        _Options(torch.device(device), kernel, tables, lookups),
    )
    try:
        return _build(site)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise FormatError(
            f"{site.where}: malformed {stored.transform.codec.name} data ({type(exc).__name__}: {exc})"
        ) from None
