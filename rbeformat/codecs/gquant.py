"""The ``gquant`` tensor codec: uniform quantization in groups of the last axis.

Each row of a tensor (its last axis) is cut into groups of ``group``
consecutive values; the last group of a row is shorter when the row length is
not a multiple of ``group``.  ``group`` 0 makes the whole tensor one group (the
per-tensor int8 used for biases).  Every group has its own scale ``s`` (and,
in ``asym`` mode, its own offset ``o``), and every value a ``bits``-bit code
``c``.  Decoding, in float32:

- ``sym``:  value = (c - 2**(bits-1)) * s
- ``asym``: value = c * s + o        (the product is rounded before the sum)

``s`` and ``o`` are stored as float16 or float32.  A sym scale may be negative:
the code grid [-2**(bits-1), 2**(bits-1) - 1] is lopsided, and a negative scale
lets the larger side cover a group's largest magnitude whatever its sign.
The offset is a float rather than an integer zero point because it is then
fitted freely by least squares (integer zero points are a special case), and
because a float part can itself be quantized again by a chained codec (double
quantization of "scales" and "zeros").

The encoder optimises each group's scale (and offset) for squared error rather
than taking min/max: it tries a grid of clipping ratios, refits the scale in
closed form for the codes each ratio gives, keeps the best, and alternates
assign/refit a few times, vectorised over all groups at once.

>>> codec = GroupQuant(bits=4, group=32)
>>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
>>> enc = codec.encode(x)
>>> sorted(enc.parts), enc.parts["scales"].shape, codec.bit_cost(enc.params, x.shape)
(['codes', 'scales'], (2, 1), 288)
>>> float(np.abs(codec.decode(enc.parts, enc.params, x.shape, "x") - x).max()) < 0.07
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_keys
from .core.fields import choice, fraction_tuple, integer, setting
from .core.tensor import Calibration, Encoded, PartSpec, TensorCodec
from .encoders import gptq
from .util import bitpack, parallel
from .util.arrays import FLOAT_DTYPES, check_index_range, finite_floats, float_part, pack_codes, unpack_codes

MODES = ("sym", "asym")
MIN_GROUP, MAX_GROUP = 16, 256
# GPTQ takes a matrix whose float64 copy is larger than this in slices of rows.
GPTQ_SLICE_BYTES = 64 * 2**20
# The plain encoder fits a tensor whose float32 groups are larger than this in slices of rows
# (small enough to stay near a core: 64 MiB slices were 1.7 times slower).
ENCODE_SLICE_BYTES = 8 * 2**20

# Encoder search (not stored): sym tries scales peak * r / 2**(bits-1) for these
# shrink factors r, mapping the peak to either end of the code grid; asym trims
# each end of the group's [min, max] range by these fractions of its width.
DEFAULT_GRID = tuple(np.round(np.linspace(0.5, 1.0, 21), 3).tolist())
DEFAULT_TRIMS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
DEFAULT_ITERATIONS = 4
# Decoding writes the float32 result in tiles of about this many elements, so
# that its temporaries (codes as float32, scales repeated per element) stay
# small beside the result.
DECODE_TILE = 1 << 20


def group_layout(shape: tuple[int, ...], group: int) -> tuple[int, int, int]:
    """(rows, row length, groups per row); group 0 views the tensor as one row of one group."""
    if group == 0:
        return 1, math.prod(shape), 1
    return math.prod(shape[:-1]), shape[-1], -(-shape[-1] // group)


def _group_size(value: Any, where: str) -> int:
    group = integer(0, MAX_GROUP)(value, where)
    if 0 < group < MIN_GROUP:
        raise FormatError(f"{where}: expected 0 or an integer in [{MIN_GROUP}, {MAX_GROUP}], found {group}")
    return group


def _grouped(x: np.ndarray, rows: int, n: int, g: int, ng: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The values as a (groups, g) matrix, zero-padded; the mask marks real values (None: all real)."""
    w = x.reshape(rows, n)
    if ng * g == n:
        return w.reshape(rows * ng, g), None
    padded = np.zeros((rows, ng * g), np.float32)
    padded[:, :n] = w
    mask = np.zeros((rows, ng * g), np.float32)
    mask[:, :n] = 1
    return padded.reshape(rows * ng, g), mask.reshape(rows * ng, g)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row dot products as float64; float32 accumulation is exact enough for short groups."""
    if a.shape[1] <= MAX_GROUP:
        return np.einsum("ij,ij->i", a, b).astype(np.float64)
    return np.einsum("ij,ij->i", a, b, dtype=np.float64)


def _safe_inverse(s: np.ndarray) -> np.ndarray:
    """1/s as float32 column, with 0 for s == 0 (a zero scale sends every value to code 0)."""
    out = np.zeros(s.shape, np.float64)
    np.divide(1.0, s, out=out, where=s != 0)
    return out.astype(np.float32)[:, None]


def _keep_better(best: list[np.ndarray] | None, new: list[np.ndarray]) -> list[np.ndarray]:
    """Per group, the candidate (a list of arrays whose last one is the error) with lower error."""
    if best is None:
        return new
    better = new[-1] < best[-1]
    return [np.where(better, a, b) for a, b in zip(new, best)]


def _fit_sym(
    w: np.ndarray, bits: int, grid: tuple[float, ...], iters: int, dtype: str, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scales (groups,) and signed codes (groups, g) minimising squared error per group.

    ``weight`` (g,), when given, weighs each position's squared error (an
    importance per input column, see ``importance``).  Zero padding needs no
    mask here: a padded 0 always gets code 0 and so adds nothing to any sum
    nor to the error.
    """
    h = 2 ** (bits - 1)
    peak = w[np.arange(w.shape[0]), np.abs(w).argmax(axis=1)].astype(np.float64)  # signed largest magnitude
    mw = w if weight is None else w * weight  # the weighted values enter every sum
    total = _rowdot(mw, w)
    q = np.empty_like(w)  # reused: allocating a fresh array per candidate costs more than the arithmetic

    def assign(s):
        np.multiply(w, _safe_inverse(s), out=q)
        np.rint(q, out=q)
        return np.clip(q, -h, h - 1, out=q)

    def refit(q):
        # For fixed codes the best scale is <w,q>/<q,q>, leaving error |w|^2 - s<w,q>
        # (inner products weighted by ``weight`` when given).
        wq = _rowdot(mw, q)
        qq = _rowdot(q, q) if weight is None else _rowdot(q * weight, q)
        s = np.divide(wq, qq, out=np.zeros_like(wq), where=qq > 0)
        return [s, total - s * wq]

    best = None
    # The peak maps to -h (the long side of the grid) or to h - 1; shrinking the
    # range clips the few largest values to gain resolution for the rest.
    for start in [peak * (r / -h) for r in grid] + [peak * (r / (h - 1)) for r in grid]:
        best = _keep_better(best, refit(assign(start)))
    for _ in range(iters):  # assign/refit never increases the error
        best = _keep_better(best, refit(assign(best[0])))
    # Codes are chosen for the scale exactly as stored.
    stored = float_part(best[0], dtype)
    return stored, assign(stored.astype(np.float64)).copy()


def _fit_asym(
    w: np.ndarray,
    mask: np.ndarray | None,
    bits: int,
    trims: tuple[float, ...],
    iters: int,
    dtype: str,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scales, offsets (groups,) and codes (groups, g) minimising squared error per group.

    Padded positions (mask 0) hold w = 0 and get their code zeroed before any
    sum, so they add nothing to the fit.  ``weight`` (g,), when given (groups
    without padding only), weighs each position's squared error.
    """
    top = 2**bits - 1
    if mask is None:
        lo, hi = w.min(axis=1), w.max(axis=1)
        count = np.full(w.shape[0], w.shape[1] if weight is None else weight.sum(dtype=np.float64), np.float64)
    else:
        lo = np.where(mask > 0, w, np.inf).min(axis=1)
        hi = np.where(mask > 0, w, -np.inf).max(axis=1)
        count = mask.sum(axis=1, dtype=np.float64)
    lo, width = lo.astype(np.float64), (hi - lo).astype(np.float64)
    mw = w if weight is None else w * weight  # the weighted values enter every sum
    sw = mw.sum(axis=1, dtype=np.float64)
    centred = _rowdot(mw, w) - sw * sw / count  # error of the best constant
    q = np.empty_like(w)

    def assign(s, o):
        np.subtract(w, o.astype(np.float32)[:, None], out=q)
        np.multiply(q, _safe_inverse(s), out=q)
        np.rint(q, out=q)
        np.clip(q, 0, top, out=q)
        return q if mask is None else np.multiply(q, mask, out=q)

    def refit(q):
        # Least-squares line value = s * code + o through each group's points (weighted
        # by ``weight`` when given).
        mq = q if weight is None else q * weight
        sq, sqq, swq = mq.sum(axis=1, dtype=np.float64), _rowdot(mq, q), _rowdot(mq, w)
        var = sqq - sq * sq / count
        cov = swq - sw * sq / count
        s = np.divide(cov, var, out=np.zeros_like(cov), where=var > 0)
        return [s, (sw - s * sq) / count, centred - s * cov]

    best = None
    for low_trim in trims:
        for high_trim in trims:
            start = width * (1 - low_trim - high_trim) / top
            best = _keep_better(best, refit(assign(start, lo + width * low_trim)))
    for _ in range(iters):
        best = _keep_better(best, refit(assign(best[0], best[1])))
    s, o = float_part(best[0], dtype), float_part(best[1], dtype)
    return s, o, assign(s.astype(np.float64), o.astype(np.float64)).copy()


def importance(hessian: np.ndarray) -> np.ndarray:
    """Per input column, the weight of its squared error in a scale fit: E[x_j^2] / mean, floored.

    The output error of a Linear layer weighs column j's error by E[x_j^2]
    (the diagonal of H, ignoring correlations, which GPTQ then handles); the
    floor keeps columns that never fire from leaving a group unconstrained.
    """
    d = np.maximum(np.diag(np.asarray(hessian, np.float64)), 0.0)
    mean = d.mean() if d.size and d.mean() > 0 else 1.0
    return (d / mean + 0.01).astype(np.float32)


@dataclass(frozen=True)
class GroupQuant(TensorCodec):
    """Grouped uniform quantization with optimised scales; see the module docstring."""

    name = "gquant"
    chainable_parts = ("scales", "zeros")
    calibrations = ("gptq",)

    bits: int = setting(4, integer(2, 8), "code bits per value")
    group: int = setting(32, _group_size, "values per scale along the last axis; 0: one scale for the whole tensor")
    mode: str = setting("sym", choice(*MODES), "sym: codes centred on zero; asym: with a per-group offset")
    scale_dtype: str = setting("F16", choice(*FLOAT_DTYPES), "dtype of the stored scales and offsets")
    grid: tuple = setting(
        DEFAULT_GRID,
        fraction_tuple(0, 1, True),
        "sym encoder: shrink factors of the largest magnitude tried as scales",
        "encoder",
    )
    trims: tuple = setting(
        DEFAULT_TRIMS,
        fraction_tuple(0, 0.5, False),
        "asym encoder: fractions trimmed off each end of the range",
        "encoder",
    )
    iterations: int = setting(DEFAULT_ITERATIONS, integer(0, 100), "encoder: assign/refit rounds", "encoder")
    gptq_order: str = setting(
        "columns",
        choice("columns", "activation"),
        "GPTQ encoder: columns left to right, each group's scale fitted when reached; or "
        "activation: most used inputs first, scales fitted beforehand",
        "encoder",
    )
    scale_fit: str = setting(
        "importance",
        choice("importance", "plain"),
        "GPTQ encoder: importance: each group's scale fitted to the squared error weighted by "
        "its inputs' second moments diag(H); plain: unweighted",
        "encoder",
    )

    def check_settings(self, where: str) -> None:
        if any(t >= 0.5 for t in self.trims):
            raise FormatError(f"{where}.trims: fractions must be below 0.5")

    def formula(self, params: Any) -> str:
        return f"gquant.{self.mode}"

    def _scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.group == 0:
            return (1,)
        return shape[:-1] + (-(-shape[-1] // self.group),)

    def groups_last_axis(self) -> bool:
        return self.group > 0  # group 0: one scale for the whole tensor, no axis

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        require_keys(params, f"{where}.params", set())
        if not shape:  # groups run along the last axis
            raise FormatError(f"{where}.shape: gquant needs a tensor of at least one dimension")
        numel = math.prod(shape)
        specs = {
            "codes": PartSpec("U8", (bitpack.packed_size(numel, self.bits),)),
            "scales": PartSpec(self.scale_dtype, self._scale_shape(shape)),
        }
        if self.mode == "asym":
            specs["zeros"] = PartSpec(self.scale_dtype, self._scale_shape(shape))
        return specs

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        rows, n, ng = group_layout(x.shape, self.group)
        if x.size == 0:  # nothing to fit: empty codes, zero scales (one for group 0)
            zero = np.zeros(self._scale_shape(x.shape), FLOAT_DTYPES[self.scale_dtype])
            parts = {"codes": np.zeros(0, np.uint8), "scales": zero}
            if self.mode == "asym":
                parts["zeros"] = zero.copy()
            return Encoded(parts=parts, params={})
        g = n if self.group == 0 else self.group
        matrix = x.reshape(rows, n)
        # Groups are fitted independently, so a large tensor is taken a slice of rows at a time, the
        # slices on several threads: the fit's float32 work arrays stay small beside the codes and
        # near the cores (the same codes and scales for any slicing).
        step = rows if self.group == 0 else max(1, ENCODE_SLICE_BYTES // (4 * ng * g))
        codes = np.empty((rows, n), np.uint8)
        scales = np.empty((rows, ng), FLOAT_DTYPES[self.scale_dtype])
        zeros = np.empty_like(scales) if self.mode == "asym" else None

        def fit_slice(start: int) -> None:
            part = slice(start, start + step)
            height = len(matrix[part])
            w, mask = _grouped(matrix[part], height, n, g, ng)
            if self.mode == "sym":
                s, q = _fit_sym(w, self.bits, self.grid, self.iterations, self.scale_dtype)
                q += 2 ** (self.bits - 1)
            else:
                s, o, q = _fit_asym(w, mask, self.bits, self.trims, self.iterations, self.scale_dtype)
                zeros[part] = o.reshape(height, ng)
            codes[part] = q.reshape(height, ng * g)[:, :n]
            scales[part] = s.reshape(height, ng)

        parallel.run_each(fit_slice, range(0, rows, step))
        parts = {"codes": pack_codes(codes, self.bits), "scales": scales.reshape(self._scale_shape(x.shape))}
        if zeros is not None:
            parts["zeros"] = zeros.reshape(self._scale_shape(x.shape))
        return Encoded(parts=parts, params={})

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """GPTQ (see ``gptq``): codes chosen column by column with error feedback.

        Each group's scale (and offset) is fitted as in the plain encoder: on
        the group's columns as updated when its first column is reached, or,
        with ``gptq_order="activation"``, on the original values before the
        columns are taken most used first.
        """
        rows, n, ng = group_layout(x.shape, self.group)
        if self.group == 0 or x.ndim < 2:
            raise ValueError("gquant's GPTQ encoder needs groups along the input (last) axis of a matrix")
        w = x.reshape(rows, n)
        scales = np.zeros((rows, ng), np.float64)
        offsets = np.zeros((rows, ng), np.float64)
        codes = np.zeros((rows, n), np.uint8)
        # Rows are independent under GPTQ (each row's error moves along its own columns): a large
        # matrix (an output head) is taken in slices of rows, so that GPTQ's float64 copies stay small.
        step = rows if rows * n * 8 <= GPTQ_SLICE_BYTES else max(1, GPTQ_SLICE_BYTES // (n * 8))
        for start in range(0, rows, step):
            part = slice(start, min(start + step, rows))
            self._gptq_rows(w[part], calibration, scales[part], offsets[part], codes[part])
        gptq.forget_factor()
        shape = self._scale_shape(x.shape)
        parts = {
            "codes": pack_codes(codes, self.bits),
            "scales": scales.astype(FLOAT_DTYPES[self.scale_dtype]).reshape(shape),
        }
        if self.mode == "asym":
            parts["zeros"] = offsets.astype(FLOAT_DTYPES[self.scale_dtype]).reshape(shape)
        return Encoded(parts=parts, params={})

    def _gptq_rows(self, w, calibration: Calibration, scales, offsets, codes) -> None:
        """GPTQ on the rows ``w``, filling their ``scales``, ``offsets`` and ``codes`` (views)."""
        ng = scales.shape[1]
        static = self.gptq_order == "activation"
        weight = importance(calibration.hessian) if self.scale_fit == "importance" else None

        def fit(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            cols = slice(k * self.group, (k + 1) * self.group)
            return self._fit_groups(np.ascontiguousarray(block, np.float32), None if weight is None else weight[cols])

        if static:  # columns come out of order: every scale is fitted on the original values first

            def fit_group(k: int) -> None:
                scales[:, k], offsets[:, k] = fit(w[:, k * self.group : (k + 1) * self.group], k)

            parallel.run_each(fit_group, range(ng))

        def quantize(j: int, current: np.ndarray) -> np.ndarray:
            k = j // self.group
            if j % self.group == 0 and not static:
                scales[:, k], offsets[:, k] = fit(current[:, j : j + self.group], k)
            s, o = scales[:, k], offsets[:, k]
            column = current[:, j]
            if self.mode == "sym":
                h = 2 ** (self.bits - 1)
                c = np.clip(np.rint(column * _safe_inverse(s)[:, 0]), -h, h - 1) + h
                codes[:, j] = c
                return ((c - h).astype(np.float32) * s.astype(np.float32)).astype(np.float64)
            c = np.clip(np.rint((column - o) * _safe_inverse(s)[:, 0]), 0, 2**self.bits - 1)
            codes[:, j] = c
            return (c.astype(np.float32) * s.astype(np.float32) + o.astype(np.float32)).astype(np.float64)

        step = max(gptq.BLOCK // self.group, 1) * self.group
        order = gptq.activation_order(calibration.hessian) if static else None
        gptq.compensate(w, calibration.hessian, quantize, block=step, order=order)

    def _fit_groups(self, block: np.ndarray, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stored scale and offset (zeros in sym mode) of each row of ``block`` (rows, g), as float64;
        ``weight`` (g,) weighs each column's squared error."""
        if self.mode == "sym":
            s, _ = _fit_sym(block, self.bits, self.grid, self.iterations, self.scale_dtype, weight)
            return s.astype(np.float64), np.zeros(len(block))
        s, o, _ = _fit_asym(block, None, self.bits, self.trims, self.iterations, self.scale_dtype, weight)
        return s.astype(np.float64), o.astype(np.float64)

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        codes = unpack_codes(parts["codes"], self.bits, math.prod(shape), f"{where}.codes")
        check_index_range(codes, 2**self.bits, f"{where}.codes")
        floats = {name: finite_floats(parts[name], f"{where}.{name}") for name in parts if name != "codes"}
        rows, n, ng = group_layout(shape, self.group)
        codes = codes.reshape(rows, n)
        scales = floats["scales"].reshape(rows, ng)
        zeros = floats["zeros"].reshape(rows, ng) if self.mode == "asym" else None
        out = np.empty((rows, n), np.float32)
        # Tiles of whole groups: every element gets the same float32 operations as on the whole tensor.
        width = max(
            1,
            min(n, DECODE_TILE)
            if self.group == 0
            else n
            if n <= DECODE_TILE
            else max(1, DECODE_TILE // self.group) * self.group,
        )
        height = max(1, DECODE_TILE // width)
        for r in range(0, rows, height):
            for j in range(0, n, width):
                c = codes[r : r + height, j : j + width].astype(np.float32)
                if self.mode == "sym":
                    c -= np.float32(2 ** (self.bits - 1))
                tile = c * self._expand_tile(scales[r : r + height], j, c.shape[1])
                if zeros is not None:
                    tile += self._expand_tile(zeros[r : r + height], j, c.shape[1])
                out[r : r + height, j : j + width] = tile
        return out.reshape(shape)

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        return (4 + (1 if self.bits <= 8 else 4)) * n + 20 * min(n, 2 * DECODE_TILE)

    def _expand_tile(self, per_group: np.ndarray, first: int, width: int) -> np.ndarray:
        """The values of columns [first, first + width) of rows ``per_group`` (rows, groups), one per element."""
        if self.group == 0:
            return per_group.reshape(-1, 1)[:1]
        k0 = first // self.group
        k1 = -(-(first + width) // self.group)
        return np.repeat(per_group[:, k0:k1], self.group, axis=1)[:, first - k0 * self.group :][:, :width]
