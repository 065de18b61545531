"""``gquant.sym`` and ``gquant.asym``: grouped uniform quantization rebuilt in torch, and its int4 kernel path.

``GQuantDecoder`` holds the packed codes (uint8), the scales and, in asym
mode, the zeros in their stored dtype.  ``rows`` decodes only the rows asked
for; ``linear`` runs the int4 kernel below where it fits.

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
every other path is as exact as ``base`` states.  Pass
``kernel="exact"`` to ``build_decoder`` for the exact path everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from rbeformat.codecs.gquant import GroupQuant, group_layout
from rbeformat.codecs.util.arrays import unpack_codes

from .base import Site, WeightDecoder, checked_rows, unpack, unpack_at

KERNEL_GROUPS = (256, 128, 64, 32)  # the int4 kernel's group sizes, largest first
KERNEL_ROWS = 16  # the int4 kernel packs output rows in multiples of this
_INT4_OPS = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


def int4_kernel_group(group: int, k_in: int) -> int | None:
    """The int4 kernel group for a gquant group: one dividing it (any for group 0), K padded least."""
    candidates = [g for g in KERNEL_GROUPS if group == 0 or group % g == 0]
    if not candidates:
        return None
    return min(candidates, key=lambda g: (-(-k_in // g) * g, -g))


def int4_unfit_reason(codec, shape: tuple[int, ...], device="cpu") -> str | None:
    """Why a gquant tensor of ``shape`` cannot be a Linear weight (N, K) on the int4 kernel; None if it can."""
    if not isinstance(codec, GroupQuant):
        return f"{codec.name} is not gquant"
    if torch.device(device).type != "cpu":
        return f"the int4 kernel runs on the CPU, not {torch.device(device).type}"
    if not _INT4_OPS:
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if len(shape) != 2 or 0 in shape:
        return f"shape {list(shape)} is not a non-empty matrix"
    if int4_kernel_group(codec.group, shape[1]) is None:
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
        self.kernel_group = int4_kernel_group(group, k_in)
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

    def __init__(self, site: Site):
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
            self.own_form += f"; linear: int4 kernel, bf16, group {self.int4.kernel_group}" + (
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
        self.own_form += ", kernel parts only"

    def _int4_kernel(self, site: Site) -> Int4Linear:
        codes = unpack_codes(site.array("codes"), self.bits, self.numel, f"{site.where}.codes").reshape(self.shape)
        floats = {p: self.value(p).cpu().numpy() for p in ("scales", "zeros") if p in self.part_forms}
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
        index = checked_rows(index, self.shape[0]).to(self.device)
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
