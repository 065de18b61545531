"""Error compensation for quantizing encoders (GPTQ): a choice of codes, not a format.

A Linear layer computes y = W x.  Quantizing W to Q costs, on inputs x
drawn from calibration data, E|(W - Q) x|^2 = tr((W - Q) H (W - Q)^T) with
H = E[x x^T], the layer's input second moments (its "Hessian").  GPTQ
quantizes the columns of W (the input axis, W's last axis) one at a time;
after each, it moves the rounding error of that column onto the columns not
yet quantized, in the proportions H says compensate it best:

    U  = upper Cholesky factor of (H + damping * mean(diag H) * I)^-1
    for each column j:  q_j = quantize(w_j);  e = (w_j - q_j) / U[j, j]
                        w_k -= e * U[j, k]   for every k > j

(Frantar et al., 2022, "GPTQ").  Updates are applied lazily per block of
columns, as a matrix product.  The quantizer sees the updated columns, so a
group's scale is fitted when the group's first column is reached.

The result is an ordinary set of codes and scales: decoding is unchanged,
and any reader decodes it with the codec's specification alone.

>>> rng = np.random.default_rng(0)
>>> w, x = rng.standard_normal((8, 32)), rng.standard_normal((32, 256))
>>> rounded = compensate(w, x @ x.T / 256, lambda j, w: np.round(w[:, j] * 2) / 2)
>>> plain = np.round(w * 2) / 2
>>> bool(np.linalg.norm((w - rounded) @ x) < np.linalg.norm((w - plain) @ x))
True
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

# Columns whose updates are applied together (one matrix product per block).
BLOCK = 128
DEFAULT_DAMPING = 0.01

ColumnQuantizer = Callable[[int, np.ndarray], np.ndarray]


def compensate(
    w: np.ndarray,
    hessian: np.ndarray,
    quantize: ColumnQuantizer,
    damping: float = DEFAULT_DAMPING,
    block: int = BLOCK,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Quantizes the columns of ``w`` (rows, n) one at a time with error feedback; returns the quantized values.

    ``quantize(j, current)`` returns column j quantized (rows,), where
    ``current`` is the matrix as updated so far, in its own column order (it
    may read the columns from j on, e.g. to fit a group's scale at the group's
    first column).  Columns are taken left to right, or in ``order`` (a
    permutation; the quantizer then may read column j only, and uses scales
    fitted beforehand).  ``block`` should be a
    multiple of the quantizer's group so that a group never spans two blocks.
    """
    # Column-major: every step reads or updates whole columns, which are then contiguous (the values,
    # and so the codes, are those of a row-major matrix; only the memory traffic changes).
    current = np.array(w, dtype=np.float64, order="F")
    n = current.shape[1]
    if hessian.shape != (n, n):
        raise ValueError(f"a Hessian of shape {hessian.shape} does not fit {n} input columns")
    permuted = order is not None
    order = np.asarray(order) if permuted else np.arange(n)
    upper = _factor(hessian, damping, order if permuted else None)
    # The columns in the order they are quantized (the matrix itself when unpermuted).
    work = np.asfortranarray(current[:, order]) if permuted else current
    out = np.empty_like(current)
    rows = current.shape[0]
    # Every temporary is column-major too: a row-major one subtracted from ``work`` is read across
    # its rows, five times slower at a 7 B model's shapes.  Each element gets the same products and
    # differences in the same order, so the same bits.
    step = np.empty((rows, block), order="F")  # one column's error times its row of U
    trailing = np.empty((rows, max(n - block, 0)), order="F")  # a block's errors times U's rows after it
    for start in range(0, n, block):
        stop = min(start + block, n)
        errors = np.empty((rows, stop - start), order="F")
        for k in range(start, stop):
            j = order[k]
            if permuted:  # only column j of ``current`` is kept up to date
                current[:, j] = work[:, k]
            q = quantize(j, current)
            out[:, j] = q
            e = (work[:, k] - q) / upper[k, k]
            errors[:, k - start] = e
            outer = np.multiply(e[:, None], upper[k, k:stop][None, :], out=step[:, : stop - k])
            work[:, k:stop] -= outer
        if stop < n:
            product = np.matmul(errors, upper[start:stop, stop:], out=trailing[:, : n - stop])
            work[:, stop:] -= product
    return out


# The last factor computed: layers that read one input (q, k and v) share one Hessian.  It holds its
# Hessian by a weak reference and goes when the Hessian goes, so no factor outlives its statistics.
_last_factor: dict = {}


def _factor(hessian: np.ndarray, damping: float, order: np.ndarray | None) -> np.ndarray:
    """inverse_cholesky of H (permuted by ``order``), reused while the same H comes again."""
    key = (hessian.shape, damping, None if order is None else order.tobytes())
    source = _last_factor.get("hessian")
    if source is not None and source() is hessian and _last_factor["key"] == key:
        return _last_factor["upper"]
    _last_factor.clear()  # the old factor is not kept beside the new one's work
    upper = inverse_cholesky(hessian, damping, order)
    _last_factor.update(hessian=weakref.ref(hessian, _forget_factor), key=key, upper=upper)
    return upper


def _forget_factor(reference: weakref.ref) -> None:
    if _last_factor.get("hessian") is reference:
        _last_factor.clear()


def kept_factor() -> np.ndarray | None:
    """The factor kept for the next call with the same H, if any (what it holds in memory)."""
    return _last_factor.get("upper")


def forget_factor() -> None:
    """Drops the factor kept for the next call with the same H.  An encoder calls it once a weight's
    slices are done: a weight reading the same input (k and v after q) then factors H again (a few
    seconds) rather than the factor (1 GB for a 7 B model's down projection) staying beside the
    error statistics and the decoding that follow."""
    _last_factor.clear()


def activation_order(hessian: np.ndarray) -> np.ndarray:
    """Columns by decreasing diag(H): the most used inputs first, while most columns can still absorb error."""
    return np.argsort(-np.diag(hessian), kind="stable")


def inverse_cholesky(
    hessian: np.ndarray, damping: float = DEFAULT_DAMPING, order: np.ndarray | None = None
) -> np.ndarray:
    """Upper triangular U with U^T U = (H + damping * mean(diag H) * I)^-1.

    Inputs that never fire (a zero row of H) get a unit diagonal: their
    columns then take no error from others, which is all they can do.
    With ``order``, of H with its rows and columns permuted so.  Memory: one
    n x n float64 matrix beside ``hessian``, worked in place.
    """
    forward = np.asarray(order) if order is not None else np.arange(len(hessian))
    # With P the reversal of the axes and P H P = L L^T, H = (P L P)(P L P)^T with P L P upper, so
    # H^-1 = U^T U for U = (P L P)^-1 = P L^-1 P: one Cholesky factor and one triangular inverse,
    # without forming H^-1 (a fifth of the arithmetic of inverting and factoring again).  The copy
    # is taken reversed, and factored and inverted in place.
    backward = forward[::-1]
    h = np.asarray(hessian)[np.ix_(backward, backward)].astype(np.float64, copy=False)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    live = np.ascontiguousarray(diag[~dead][::-1])  # averaged in the columns' own order
    scale = live.mean() if live.size else 1.0
    h[np.diag_indices_from(h)] = np.where(dead, 1.0, diag + damping * scale)
    cholesky_in_place(h)
    invert_lower(h)
    return h[::-1, ::-1]  # a view: the columns' work reads rows and blocks of it


# The Cholesky factor is computed in blocks of this many columns.
CHOLESKY_BLOCK = 256


def cholesky_in_place(a: np.ndarray) -> None:
    """Overwrites the symmetric positive definite ``a`` with its lower Cholesky factor (zeros above),
    block by block: each diagonal block factored, the blocks below solved against it, the rest
    updated a column block at a time (no n x n temporary).  LinAlgError when ``a`` is not positive
    definite."""
    n = len(a)
    for start in range(0, n, CHOLESKY_BLOCK):
        stop = min(start + CHOLESKY_BLOCK, n)
        a[start:stop, start:stop] = np.linalg.cholesky(a[start:stop, start:stop])
        a[start:stop, stop:] = 0
        if stop == n:
            break
        a[stop:, start:stop] = np.linalg.solve(a[start:stop, start:stop], a[stop:, start:stop].T).T
        below = a[stop:, start:stop]
        for column in range(stop, n, CHOLESKY_BLOCK):
            end = min(column + CHOLESKY_BLOCK, n)
            a[column:, column:end] -= below[column - stop :] @ below[column - stop : end - stop].T


# Triangular blocks this small are inverted by a solve; larger ones by halves, in matrix products.
INVERSE_LEAF = 128


def invert_lower(lower: np.ndarray) -> None:
    """Inverts a lower triangular matrix in place, by halves:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]].

    The lower left block takes one temporary of its size (C^-1 B, negated in place; the product
    with A^-1 written straight into B's place), not two (for a 7 B model's down projection, 242 MB
    each).  The same products in the same order: the same bits."""
    n = len(lower)
    if n <= INVERSE_LEAF:
        lower[...] = np.linalg.solve(lower, np.eye(n))
        return
    k = n // 2
    invert_lower(lower[:k, :k])
    invert_lower(lower[k:, k:])
    product = lower[k:, k:] @ lower[k:, :k]
    np.negative(product, out=product)
    np.matmul(product, lower[:k, :k], out=lower[k:, :k])  # B is read only by the product above


# output_error takes a matrix in slices of rows of about this many float64 bytes.
ERROR_SLICE_BYTES = 64 * 2**20


def output_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray, samples: np.ndarray | None = None) -> float:
    """tr((W - Q) H (W - Q)^T): the mean squared output error on the calibration inputs.

    With ``samples``, the N inputs X themselves (H = X^T X / N), as |(W - Q) X^T|^2 / N: the
    same number at N / n of the arithmetic for n inputs.  Rows add independently, so a large
    matrix is taken a slice of rows at a time: its float64 difference and product are never
    whole (for a 7 B model's down projection, 360 MB each)."""
    if samples is not None:
        return _sampled_output_error(w, q, samples)
    hessian = np.asarray(hessian, np.float64)
    rows = len(w)
    step = max(1, ERROR_SLICE_BYTES // (8 * max(1, hessian.shape[0])))
    total = 0.0
    for start in range(0, rows, step):
        part = slice(start, start + step)
        d = np.asarray(w[part], np.float64) - np.asarray(q[part], np.float64)
        total += float(np.sum((d @ hessian) * d))  # a product, not a triple loop
    return total


def _sampled_output_error(w: np.ndarray, q: np.ndarray, samples: np.ndarray) -> float:
    """|(W - Q) X^T|^2 / N in float64, by slices of rows of W and of tokens of X."""
    tokens, n = samples.shape
    step = max(1, ERROR_SLICE_BYTES // (8 * max(1, n)))  # rows of W, and tokens of X, per slice
    total = 0.0
    for start in range(0, len(w), step):
        d = np.asarray(w[start : start + step], np.float64) - np.asarray(q[start : start + step], np.float64)
        for first in range(0, tokens, step):
            product = d @ np.asarray(samples[first : first + step], np.float64).T
            total += float(np.sum(product * product))
    return total / tokens if tokens else 0.0
