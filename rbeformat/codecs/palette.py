"""The ``palette`` tensor codec: a scalar codebook of 2**bits values (palettization).

Every value of the tensor is replaced by the index of the nearest entry of a
small codebook.  The codebook is shared by the whole tensor (``scope``
"tensor"), by each row (the last axis, "row"), or by each group of ``group``
consecutive values of a row ("group"; the last group of a row is shorter when
the row length is not a multiple of ``group``).  Decoding is a table look-up:

    value = float32(codebook[k][index])

where k numbers the codebooks in row-major order: 0 for "tensor", the row for
"row", row * groups_per_row + column // group for "group".

The encoder fits each codebook by 1-D k-means (Lloyd's algorithm).  In one
dimension the clusters of sorted values are contiguous runs, so after one sort
per codebook every iteration only needs the run boundaries (a binary search of
the midpoints between centroids) and run sums (differences of a prefix sum):
its cost is independent of the number of values.  Two starts are tried, at
the quantiles and with density proportional to the cube root of the values'
density (the asymptotically optimal spacing for squared error), and each
codebook keeps the one with the lower squared error.  No randomness is involved.

With calibration (``Calibration("gptq", H)``, for a matrix (out, in)) the
k-means weights each value by how much its input column is used, diag(H),
and the indices are then chosen by GPTQ error compensation (``gptq``), most
used columns first, each value going to the nearest entry of its fixed
codebook after the earlier columns' errors were spread onto it.  The stored
format and decoding are the same.

>>> codec = Palette(bits=2, scope="row")
>>> x = np.array([[0.0, 1.0, 2.0, 3.0, 3.1], [5.0, 5.0, -5.0, 0.0, 1.0]], np.float32)
>>> enc = codec.encode(x)
>>> enc.parts["codebook"].shape, codec.bit_cost(enc.params, x.shape)
((2, 4), 152)
>>> codec.decode(enc.parts, enc.params, x.shape, "x").tolist()
[[0.0, 1.0, 2.0, 3.05078125, 3.05078125], [5.0, 5.0, -5.0, 0.0, 1.0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_keys
from .core.fields import choice, integer, setting
from .core.tensor import Calibration, Encoded, PartSpec, TensorCodec
from .encoders import gptq
from .util import bitpack
from .util.arrays import FLOAT_DTYPES, check_index_range, float_part, pack_codes, unpack_codes

SCOPES = ("tensor", "row", "group")
MIN_GROUP, MAX_GROUP = 16, 1 << 20
DEFAULT_ITERATIONS = 40
# Sample quantiles used to estimate the density of the values for the second start.
DENSITY_KNOTS = 1024
# Codebooks are fitted this many values at a time, to bound the encoder's memory.
BLOCK_VALUES = 1 << 21


def _layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of a tensor seen as a matrix over its last axis."""
    n = shape[-1]
    return math.prod(shape[:-1]), n


def _count_below(sorted_rows: np.ndarray, queries: np.ndarray, strict: bool) -> np.ndarray:
    """Per row, how many values are < (strict) or <= each query: a vectorised binary search.

    ``sorted_rows`` is (S, L) sorted along axis 1, ``queries`` (S, Q); returns (S, Q) ints.
    """
    length = sorted_rows.shape[1]
    lo = np.zeros(queries.shape, np.int64)
    hi = np.full(queries.shape, length, np.int64)
    for _ in range(int(length).bit_length()):
        active = lo < hi
        mid = (lo + hi) // 2
        probe = np.take_along_axis(sorted_rows, np.minimum(mid, length - 1), axis=1)
        right = (probe < queries) if strict else (probe <= queries)
        lo = np.where(active & right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo


def _lloyd(
    sorted_rows: np.ndarray,
    prefix: np.ndarray,
    total_sq: np.ndarray,
    centroids: np.ndarray,
    iterations: int,
    mass: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs Lloyd's algorithm on sorted rows; returns centroids (S, K) and squared errors (S,).

    ``mass`` (S, L + 1) is the prefix sum of the values' weights when they are
    weighted (``prefix`` and ``total_sq`` then sum weight * value and weight *
    value**2); None counts every value once.
    """
    s, length = sorted_rows.shape
    bounds = None
    for _ in range(max(iterations, 1)):
        mids = (centroids[:, :-1] + centroids[:, 1:]) / 2
        inner = _count_below(sorted_rows, mids, strict=False)
        new_bounds = np.concatenate([np.zeros((s, 1), np.int64), inner, np.full((s, 1), length, np.int64)], axis=1)
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        sums, counts = _run_sums(prefix, mass, bounds)
        # An empty cluster keeps its centroid; sorting keeps the midpoints ordered.
        centroids = np.sort(np.divide(sums, counts, out=centroids.copy(), where=counts > 0), axis=1)
    sums, counts = _run_sums(prefix, mass, bounds)
    error = total_sq - np.divide(sums * sums, counts, out=np.zeros_like(sums), where=counts > 0).sum(axis=1)
    return centroids, error


def _run_sums(prefix: np.ndarray, mass: np.ndarray | None, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster (a run [bounds[k], bounds[k+1]) of sorted values): the (weighted) sum and count."""
    row = np.arange(len(bounds))[:, None]
    sums = prefix[row, bounds[:, 1:]] - prefix[row, bounds[:, :-1]]
    counts = np.diff(bounds, axis=1) if mass is None else mass[row, bounds[:, 1:]] - mass[row, bounds[:, :-1]]
    return sums, counts


def _density_start(sorted_rows: np.ndarray, k: int) -> np.ndarray:
    """Starting centroids spread with density proportional to p(x)**(1/3).

    That is the asymptotically optimal point density of a scalar quantizer for
    squared error; it puts more entries in the tails than the quantiles do.
    p is estimated between DENSITY_KNOTS sample quantiles: over a span of width
    w holding a fixed share of the values, p**(1/3) integrates to ~ w**(2/3).
    """
    s, length = sorted_rows.shape
    m = max(1, min(length - 1, DENSITY_KNOTS))
    knots = sorted_rows[:, np.rint(np.arange(m + 1) * (length - 1) / m).astype(np.int64)].astype(np.float64)
    mass = np.zeros((s, m + 1))
    np.cumsum(np.diff(knots, axis=1) ** (2 / 3), axis=1, out=mass[:, 1:])
    target = (np.arange(k) + 0.5) / k * mass[:, -1:]
    j = np.clip(_count_below(mass, target, strict=False), 1, m)
    m0, m1 = np.take_along_axis(mass, j - 1, axis=1), np.take_along_axis(mass, j, axis=1)
    x0, x1 = np.take_along_axis(knots, j - 1, axis=1), np.take_along_axis(knots, j, axis=1)
    frac = np.divide(target - m0, m1 - m0, out=np.zeros_like(target), where=m1 > m0)
    return x0 + frac * (x1 - x0)


def fit_codebooks(
    x: np.ndarray, k: int, iterations: int = DEFAULT_ITERATIONS, weights: np.ndarray | None = None
) -> np.ndarray:
    """One k-entry codebook (sorted, float64) per row of ``x`` (S, L), by 1-D k-means.

    ``weights`` (S, L), positive, makes it weighted k-means: each value's
    squared error counts that many times (None: once each, the plain encoder).
    The quantile start is then taken over the weights; the density start is not.
    """
    if weights is None:
        sorted_rows, mass = np.sort(x, axis=1), None
        weighted = sorted_rows
    else:
        order = np.argsort(x, axis=1, kind="stable")
        sorted_rows = np.take_along_axis(x, order, axis=1)
        sorted_weights = np.take_along_axis(weights, order, axis=1).astype(np.float64)
        mass = _prefix(sorted_weights)
        weighted = sorted_weights * sorted_rows
    prefix = _prefix(weighted)
    total_sq = np.einsum("ij,ij->i", weighted, sorted_rows, dtype=np.float64)
    best, best_err = None, None
    # Quantiles win for very few entries on heavy tails, the density start elsewhere.
    for start in (_quantile_start(sorted_rows, k, mass), _density_start(sorted_rows, k)):
        c, err = _lloyd(sorted_rows, prefix, total_sq, start, iterations, mass)
        if best is None:
            best, best_err = c, err
        else:
            better = err < best_err
            best, best_err = np.where(better[:, None], c, best), np.minimum(err, best_err)
    return _exact_when_few(sorted_rows, k, best)


def _prefix(rows: np.ndarray) -> np.ndarray:
    """Float64 prefix sums of each row, with a leading 0: (S, L + 1)."""
    out = np.zeros((rows.shape[0], rows.shape[1] + 1), np.float64)
    np.cumsum(rows, axis=1, dtype=np.float64, out=out[:, 1:])
    return out


def _quantile_start(sorted_rows: np.ndarray, k: int, mass: np.ndarray | None) -> np.ndarray:
    """Centroids at the quantiles (i + 0.5) / k of each row, weighted by ``mass`` when given."""
    length = sorted_rows.shape[1]
    if mass is None:
        at = np.minimum(((np.arange(k) + 0.5) / k * length).astype(np.int64), length - 1)
        return sorted_rows[:, at].astype(np.float64)
    target = (np.arange(k) + 0.5) / k * mass[:, -1:]
    # The first value whose cumulative weight reaches the target.
    at = np.minimum(_count_below(mass[:, 1:], target, strict=True), length - 1)
    return np.take_along_axis(sorted_rows, at, axis=1).astype(np.float64)


def _exact_when_few(sorted_rows: np.ndarray, k: int, books: np.ndarray) -> np.ndarray:
    """Rows with at most k distinct values get exactly those values (padded with the largest).

    Lloyd's algorithm can merge two of them when starts coincide; this makes
    palettizing already-quantized weights lossless whenever the entries are
    representable in the codebook dtype.
    """
    new = np.ones(sorted_rows.shape, bool)
    new[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    few = np.nonzero(new.sum(axis=1) <= k)[0]
    if not few.size:
        return books
    values, starts = sorted_rows[few], new[few]
    rank = np.cumsum(starts, axis=1) - 1
    exact = np.repeat(values[:, -1:].astype(np.float64), k, axis=1)
    r, c = np.nonzero(starts)
    exact[r, rank[r, c]] = values[r, c]
    books = books.copy()
    books[few] = exact
    return books


def column_weights(hessian: np.ndarray, damping: float) -> np.ndarray:
    """How much each input column's squared error costs: diag(H) + damping * mean(diag H), as GPTQ damps H.

    The damping keeps unused inputs (diag 0) from dropping out of the fit; with
    no used input at all every column counts the same.
    """
    diag = np.maximum(np.diag(np.asarray(hessian, np.float64)), 0.0)
    if not (diag > 0).any():
        return np.ones(len(diag))
    scale = diag[diag > 0].mean()
    return (diag + damping * scale) / scale


def nearest(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of each row's sorted codebook (ties to the lower index)."""
    mids = (codebooks[:, :-1].astype(np.float64) + codebooks[:, 1:]) / 2
    out = np.zeros(x.shape, np.uint8)
    step = max(1, BLOCK_VALUES // max(x.shape[0], 1))
    for c0 in range(0, x.shape[1] if mids.shape[1] else 0, step):
        # The number of midpoints below a value is the index of its nearest entry.
        out[:, c0 : c0 + step] = _count_below_each(mids, x[:, c0 : c0 + step])
    return out


def _count_below_each(mids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per value of x (S, C), how many of its row's sorted mids (S, Q) are strictly below it."""
    q = mids.shape[1]
    lo = np.zeros(x.shape, np.int32)
    hi = np.full(x.shape, q, np.int32)
    for _ in range(q.bit_length()):
        mid = (lo + hi) // 2
        probe = np.take_along_axis(mids, np.minimum(mid, q - 1), axis=1)
        right = probe < x
        active = lo < hi
        lo = np.where(active & right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo


@dataclass(frozen=True)
class Palette(TensorCodec):
    """Scalar codebook quantization with 1-D k-means codebooks; see the module docstring."""

    name = "palette"
    calibrations = ("gptq",)

    bits: int = setting(4, integer(1, 8), "index bits: a codebook holds 2**bits values")
    scope: str = setting("row", choice(*SCOPES), "what shares one codebook: the tensor, each row, or each group")
    group: int = setting(0, integer(0, MAX_GROUP), "values per codebook for scope group (0 otherwise)")
    codebook_dtype: str = setting("F16", choice(*FLOAT_DTYPES), "dtype of the stored codebooks")
    iterations: int = setting(DEFAULT_ITERATIONS, integer(1, 1000), "encoder: Lloyd iterations", "encoder")

    def check_settings(self, where: str) -> None:
        if self.scope == "group" and self.group < MIN_GROUP:
            raise FormatError(
                f"{where}.group: expected an integer in [{MIN_GROUP}, {MAX_GROUP}] for scope "
                f"'group', found {self.group}"
            )
        if self.scope != "group" and self.group != 0:
            raise FormatError(f"{where}.group: must be 0 unless scope is 'group', found {self.group}")

    def _codebooks(self, shape: tuple[int, ...]) -> int:
        rows, n = _layout(shape)
        if self.scope == "tensor":
            return 1
        if self.scope == "row":
            return rows
        return rows * -(-n // self.group)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Any tensor of at least one dimension whose codebooks are smaller than the tensor itself."""
        return len(shape) >= 1 and self._codebooks(tuple(shape)) * 2**self.bits <= math.prod(shape)

    def groups_last_axis(self) -> bool:
        return self.scope != "tensor"

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        require_keys(params, f"{where}.params", set())
        if not shape:  # rows and groups run along the last axis
            raise FormatError(f"{where}.shape: palette needs a tensor of at least one dimension")
        numel = math.prod(shape)
        return {
            "indices": PartSpec("U8", (bitpack.packed_size(numel, self.bits),)),
            "codebook": PartSpec(self.codebook_dtype, (self._codebooks(shape), 2**self.bits)),
        }

    def _batches(self, rows: int, n: int) -> list[tuple[int, int, int]]:
        """Column ranges [start, stop) of equal-length segments, with segment length.

        "row" is one range of whole rows, "group" its full groups then (if the
        rows are ragged) the short last group of each row.
        """
        if self.scope != "group":
            return [(0, n, n)]
        full = n // self.group * self.group
        batches = [(0, full, self.group)] if full else []
        if full < n:
            batches.append((full, n, n - full))
        return batches

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        indices, books = self._fit(x)
        return self._encoded(indices, books)

    def _encoded(self, indices: np.ndarray, books: np.ndarray) -> Encoded:
        return Encoded(
            parts={"indices": pack_codes(indices, self.bits), "codebook": books.reshape(-1, 2**self.bits)}, params={}
        )

    def _fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices (as the matrix of codebooks: 1 x N or rows x n) and stored codebooks (C', groups, K).

        ``weights``, of x's shape, weights each value's squared error in the k-means.
        """
        k = 2**self.bits
        rows, n = _layout(x.shape)
        shape = (1, -1) if self.scope == "tensor" else (rows, n)
        matrix = x.reshape(shape)
        weights = None if weights is None else weights.reshape(shape)
        indices = np.zeros(matrix.shape, np.uint8)
        ng = 1 if self.scope != "group" else -(-n // self.group)
        books = np.zeros((matrix.shape[0], ng, k), FLOAT_DTYPES[self.codebook_dtype])
        column = 0
        for start, stop, seg in self._batches(*matrix.shape) if x.size else []:
            count = (stop - start) // seg
            block = max(1, BLOCK_VALUES // (seg * count))
            for r0 in range(0, matrix.shape[0], block):
                part = matrix[r0 : r0 + block, start:stop].reshape(-1, seg)
                weight = None if weights is None else weights[r0 : r0 + block, start:stop].reshape(-1, seg)
                stored = float_part(fit_codebooks(part, k, self.iterations, weight), self.codebook_dtype)
                idx = nearest(part, stored.astype(np.float32))
                indices[r0 : r0 + block, start:stop] = idx.reshape(-1, stop - start)
                books[r0 : r0 + block, column : column + count] = stored.reshape(-1, count, k)
            column += count
        return indices, books

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """GPTQ (see ``gptq``): codebooks fitted first, then indices chosen column by column with error feedback.

        The k-means weights each value by its column's use, diag(H) (damped as
        GPTQ damps H).  The codebooks are then fixed, so the columns are taken
        most used first (``gptq.activation_order``); each goes to the nearest
        entry of its codebook as the earlier columns' errors left it.
        """
        if x.ndim != 2:
            raise ValueError("palette's GPTQ encoder needs a matrix (out, in) with the inputs on the last axis")
        rows, n = x.shape
        hessian = np.asarray(calibration.hessian)
        if hessian.shape != (n, n):
            raise ValueError(f"a Hessian of shape {hessian.shape} does not fit {n} input columns")
        if x.size == 0:
            return self.encode_array(x, refs)
        weights = np.broadcast_to(column_weights(hessian, gptq.DEFAULT_DAMPING), x.shape)
        _, books = self._fit(x, weights)
        table = books.astype(np.float32)
        indices = np.zeros((rows, n), np.uint8)

        def quantize(j: int, current: np.ndarray) -> np.ndarray:
            book = self._column_books(table, j)
            column = current[:, j]
            idx = nearest(column.reshape(len(book), -1), book).reshape(-1)
            indices[:, j] = idx
            return np.take_along_axis(book, idx.reshape(len(book), -1).astype(np.intp), axis=1).reshape(-1)

        gptq.compensate(x, hessian, quantize, order=gptq.activation_order(hessian))
        gptq.forget_factor()
        flat = indices.reshape(1, -1) if self.scope == "tensor" else indices
        return self._encoded(flat, books)

    def _column_books(self, table: np.ndarray, j: int) -> np.ndarray:
        """The sorted float32 codebooks that column j's values use: (rows, K), or (1, K) in tensor scope."""
        if self.scope == "group":
            return table[:, j // self.group]
        return table[:, 0]

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        book = math.prod(self.part_specs(params, shape, self.name)["codebook"].shape)
        # the indices, the codebook in float32, the result, one block's index and value temporaries
        return (1 if self.bits <= 8 else 4) * n + 4 * book + 4 * n + 32 * min(n, 2 * BLOCK_VALUES)

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        numel = math.prod(shape)
        k = 2**self.bits
        idx = unpack_codes(parts["indices"], self.bits, numel, f"{where}.indices")
        check_index_range(idx, k, f"{where}.indices")
        book = np.asarray(parts["codebook"]).astype(np.float32)
        if not np.isfinite(book).all():
            raise FormatError(f"{where}.codebook: holds NaN or infinite values")
        out = np.empty(numel, np.float32)
        if numel == 0:
            return out.reshape(shape)
        if self.scope == "tensor":
            for i in range(0, numel, BLOCK_VALUES):  # blocks bound the index temporaries
                out[i : i + BLOCK_VALUES] = book[0][idx[i : i + BLOCK_VALUES]]
            return out.reshape(shape)
        rows, n = _layout(shape)
        idx, out = idx.reshape(rows, n), out.reshape(rows, n)
        ng = -(-n // self.group) if self.scope == "group" else 1
        books = book.reshape(rows, ng, k)
        step = max(1, BLOCK_VALUES // max(n, 1))
        for r0 in range(0, rows, step):
            column = 0
            for start, stop, seg in self._batches(rows, n):
                count = (stop - start) // seg
                sub = idx[r0 : r0 + step, start:stop].reshape(-1, count, seg).astype(np.intp)
                found = np.take_along_axis(books[r0 : r0 + step, column : column + count], sub, axis=2)
                out[r0 : r0 + step, start:stop] = found.reshape(-1, stop - start)
                column += count
        return out.reshape(shape)
