"""The ``vq`` codec: vector quantization of weights with a learned codebook.

The last axis is cut into vectors of ``dim`` consecutive weights.  Each vector
is replaced by the index of one of k centroids (k <= 2**bits), learned by
k-means on the tensor itself.  Rows of different magnitude share one codebook
through a per-row scale: the codebook lives in units of the row's scale.

Decode, for a tensor of shape (..., n) seen as ``rows`` rows of n weights and
v = n / dim vectors per row (all arithmetic in float32)::

    idx[r, j]  = value r*v + j of ``indices``, unpacked at index_bits bits
    c          = codebook as float32                       (k, dim)
    s[r]       = scales[r] (or scales[0] when scale = "tensor"), as float32
    W[r, j*dim + i] = c[idx[r, j], i] * s[r]                (one rounding)

Cost in bits: rows*v*index_bits + k*dim*16 + n_scales*16, each part padded to
whole bytes, where index_bits = max(1, ceil(log2 k)).

With calibration (``Calibration("gptq", H)``, for a matrix (out, in)) the
encoder is a simplified GPTVQ: the same codebook (its k-means also weighting
each vector by its columns' use, diag(H)) and scales, then each vector's
codeword chosen left to right by GPTQ error compensation (``gptq``), in the
metric that the compensation's cost gives; last, each scale is refitted for
the output error where that lowers it.  The stored format and decoding are
the same.

>>> codec = VectorCodebook(dim=4, bits=4)
>>> x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
>>> enc = codec.encode(x)
>>> sorted(enc.parts), enc.params
(['codebook', 'indices', 'scales'], {'k': 16})
>>> y = codec.decode(enc.parts, enc.params, x.shape, "x")
>>> bool(np.linalg.norm(x - y) < 0.7 * np.linalg.norm(x))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_int, require_keys
from .core.fields import choice, integer, setting
from .core.tensor import Calibration, Encoded, PartSpec, TensorCodec
from .encoders import gptq
from .palette import column_weights
from .util import bitpack
from .util.arrays import check_index_range

SCALE_MODES = ("row", "tensor")
F16_MAX = 65504.0
# Distance matrices are computed this many entries at a time: small blocks stay
# in cache and keep the matrix library from spreading tiny products over threads.
BLOCK_ENTRIES = 1 << 16
# k-means++ seeding costs one pass over the sample per centroid; above this
# many centroids a random sample of distinct vectors seeds Lloyd instead.
KMEANSPP_MAX = 1024


def index_bits(k: int) -> int:
    """Bits per stored index for a codebook of k entries."""
    return max(1, (k - 1).bit_length())


def _rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every row of x, computed in blocks."""
    c = centroids.astype(np.float32)
    ct = np.ascontiguousarray(c.T)
    half_norms = 0.5 * (c * c).sum(axis=1)
    out = np.empty(len(x), dtype=np.int64)
    step = max(64, BLOCK_ENTRIES // len(c))
    buffer = np.empty((min(step, len(x)), len(c)), dtype=np.float32)
    for start in range(0, len(x), step):
        # argmin ||x - c||^2 = argmin (||c||^2 / 2 - x.c): one small matmul per block.
        xb = x[start : start + step]
        scores = np.matmul(xb, ct, out=buffer[: len(xb)])
        np.subtract(half_norms, scores, out=scores)
        out[start : start + step] = scores.argmin(axis=1)
    return out


def _weighted_means(x, weight, assign, k, old):
    """Weighted centroid of each cluster; an empty cluster keeps its old centroid."""
    mass = np.bincount(assign, weights=weight, minlength=k)
    sums = np.stack([np.bincount(assign, weights=weight * x[:, i], minlength=k) for i in range(x.shape[1])], 1)
    new = old.astype(np.float64).copy()
    full = mass > 0
    new[full] = sums[full] / mass[full, None]
    return new, full


def kmeans(x: np.ndarray, weight: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted k-means (Lloyd) on x (m, dim) with k <= m; returns (k, dim) float64."""
    m = len(x)
    if k <= KMEANSPP_MAX:
        # k-means++: each new centroid drawn with probability ~ weight * distance^2.
        centroids = np.empty((k, x.shape[1]))
        norms = (x * x).sum(axis=1)
        dist = np.full(m, np.inf)
        pick = int(rng.choice(m, p=weight / weight.sum()))
        for j in range(k):
            c = x[pick]
            centroids[j] = c
            np.minimum(dist, np.maximum(norms - 2 * (x @ c) + c @ c, 0), out=dist)
            cdf = np.cumsum(weight * dist)
            pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")) if cdf[-1] > 0 else 0
            pick = min(pick, m - 1)
    else:
        centroids = x[rng.choice(m, size=k, replace=False)].astype(np.float64)
    for _ in range(iters):
        assign = nearest(x, centroids)
        centroids, full = _weighted_means(x, weight, assign, k, centroids)
        empty = np.flatnonzero(~full)
        if empty.size:
            # Move empty centroids onto the worst-represented sample points.
            err = weight * ((x - centroids[assign]) ** 2).sum(1)
            centroids[empty] = x[np.argsort(-err, kind="stable")[: empty.size]]
    return centroids


def _fit_scales(rows: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """Per row, the scale s minimising ||row - s * approx||, rounded to float16."""
    num = (approx.astype(np.float64) * rows).sum(axis=1)
    den = (approx.astype(np.float64) ** 2).sum(axis=1)
    fitted = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(fitted, -F16_MAX, F16_MAX).astype(np.float16)


@dataclass(frozen=True)
class VectorCodebook(TensorCodec):
    """k-means vector quantization: ``dim`` weights per index, 2**``bits`` centroids."""

    name = "vq"
    chainable_parts = ("codebook", "scales")
    calibrations = ("gptq",)

    dim: int = setting(4, integer(2, 8), "weights per vector")
    bits: int = setting(8, integer(4, 16), "codebook size in bits: at most 2**bits centroids, one index per vector")
    scale: str = setting("row", choice(*SCALE_MODES), "one scale per row, or one for the tensor")
    # Encoder settings that files of format 1.1 / 1.2 record in the config.
    train: int = setting(65536, integer(1, 1 << 24), "encoder: vectors sampled to train the codebook", "recorded")
    iters: int = setting(12, integer(0, 1000), "encoder: k-means iterations", "recorded")
    seed: int = setting(0, integer(0, 2**32 - 1), "encoder: random seed of the sample and k-means++", "recorded")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1 and shape[-1] > 0 and shape[-1] % self.dim == 0 and int(np.prod(shape)) > 0

    def _n_scales(self, shape):
        return _rows(shape) if self.scale == "row" else 1

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        rows, vectors, weight = self._normalised(x)
        codebook = self._train(vectors, weight)
        idx = nearest(vectors, codebook)
        scales = _fit_scales(rows, codebook.astype(np.float32)[idx].reshape(rows.shape))
        return self._encoded(idx, codebook, scales)

    def _normalised(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows that share a scale, their vectors in units of the row's RMS, and each vector's weight."""
        if np.abs(x).max() > F16_MAX:
            raise ValueError("vq: values must lie within the float16 range")
        rows = x.reshape(self._n_scales(x.shape), -1)
        # Normalise each row (or the tensor) by its RMS so one codebook fits all rows.
        rms = np.sqrt((rows.astype(np.float64) ** 2).mean(axis=1))
        scale = np.where(rms > 0, rms, 1.0)
        vectors = (rows / scale[:, None]).astype(np.float32).reshape(-1, self.dim)
        # A vector's error counts in the original units: weight it by its row's scale^2.
        weight = np.repeat(scale**2, rows.shape[1] // self.dim)
        return rows, vectors, weight

    def _train(self, vectors: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """The float16 codebook (k, dim): weighted k-means on a seeded sample of the vectors."""
        k = min(2**self.bits, len(vectors))
        rng = np.random.default_rng(self.seed)
        # Train on a sample, then assign every vector once: the cost is one pass.
        sample = np.sort(rng.choice(len(vectors), size=min(len(vectors), max(self.train, k)), replace=False))
        centroids = kmeans(vectors[sample], weight[sample], k, self.iters, rng)
        return np.clip(centroids, -F16_MAX, F16_MAX).astype(np.float16)

    def _encoded(self, idx: np.ndarray, codebook: np.ndarray, scales: np.ndarray) -> Encoded:
        k = len(codebook)
        parts = {"indices": bitpack.pack(idx.reshape(-1), index_bits(k)), "codebook": codebook, "scales": scales}
        return Encoded(parts, {"k": k})

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """GPTQ for vectors (a simplified GPTVQ): codebook and scales first, then codes with error feedback.

        The k-means also weights each vector by the mean use, diag(H), of its
        columns; the scales are the plain encoder's.  The columns are then
        taken left to right (``gptq.compensate``): at the first column of a
        vector every row gets the codeword nearest (in the metric of
        ``_vector_metrics``) to its vector as the earlier errors left it,
        divided by the row's scale, and the vector's columns take that
        codeword's values.  Last, each scale is refitted for the chosen
        codewords by least squares in the H-weighted sense, kept only where
        it lowers the output error.
        """
        if x.ndim != 2:
            raise ValueError("vq's GPTQ encoder needs a matrix (out, in) with the inputs on the last axis")
        n = x.shape[1]
        hessian = np.asarray(calibration.hessian, np.float64)
        if hessian.shape != (n, n):
            raise ValueError(f"a Hessian of shape {hessian.shape} does not fit {n} input columns")
        rows, vectors, weight = self._normalised(x)
        use = column_weights(hessian, gptq.DEFAULT_DAMPING).reshape(-1, self.dim).mean(axis=1)
        codebook = self._train(vectors, weight * np.tile(use, len(vectors) // len(use)))
        plain = nearest(vectors, codebook)
        scales = _fit_scales(rows, codebook.astype(np.float32)[plain].reshape(rows.shape))
        row_scales = np.broadcast_to(scales.astype(np.float32), (x.shape[0],))
        idx = self._compensated(x, hessian, codebook.astype(np.float32), row_scales)
        scales = self._refit_scales(x, hessian, codebook.astype(np.float32)[idx].reshape(x.shape), scales)
        return self._encoded(idx, codebook, scales)

    def _compensated(self, w: np.ndarray, hessian: np.ndarray, codebook: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Codeword indices (rows, n / dim) chosen by ``gptq.compensate``; scales (rows,) float32 as stored."""
        idx = np.zeros((w.shape[0], w.shape[1] // self.dim), np.int64)
        inverse = np.divide(1.0, scales, out=np.zeros(scales.shape), where=scales != 0)
        chosen = np.empty((w.shape[0], self.dim), np.float32)
        metrics = self._vector_metrics(hessian)

        def quantize(j: int, current: np.ndarray) -> np.ndarray:
            if j % self.dim == 0:  # the vector's first column: choose its codeword
                v = j // self.dim
                target = current[:, j : j + self.dim] * inverse[:, None]
                idx[:, v] = nearest(
                    (target @ metrics[v]).astype(np.float32), (codebook @ metrics[v]).astype(np.float32)
                )
                # Exactly what decode computes: one float32 product per value.
                chosen[:] = codebook[idx[:, v]] * scales[:, None]
            return chosen[:, j % self.dim].astype(np.float64)

        # A block a multiple of dim: a vector's columns are up to date when its first one is reached.
        gptq.compensate(w, hessian, quantize, block=max(gptq.BLOCK // self.dim, 1) * self.dim)
        gptq.forget_factor()
        return idx

    def _vector_metrics(self, hessian: np.ndarray) -> list[np.ndarray]:
        """Per vector, the map T under which |(w - q) T|^2 is what GPTQ's error feedback costs.

        With U the upper Cholesky factor that ``gptq.compensate`` uses and B a
        vector's columns, the feedback after rounding the vector's values
        (as they were when its first column was reached) by r costs
        |r U_BB^-1|^2: T = U_BB^-1.  Plain distances ignore that some columns
        can pass their error on and others cannot (measured: a higher output
        error than no feedback at all at dim 8).
        """
        upper = gptq.inverse_cholesky(hessian, gptq.DEFAULT_DAMPING)
        return [np.linalg.inv(upper[j : j + self.dim, j : j + self.dim]) for j in range(0, len(upper), self.dim)]

    def _refit_scales(self, w: np.ndarray, hessian: np.ndarray, approx: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Scales minimising tr((W - s A) H (W - s A)^T) for the chosen codewords A, where that is lower.

        The output error of a scale group is a parabola in its scale s:
        <W,W> - 2 s <A,W> + s^2 <A,A> in the H inner product.  Its minimum,
        rounded to float16, replaces the old scale only where it is lower.
        """
        a = approx.astype(np.float64)
        ha = (a @ hessian).reshape(len(scales), -1, w.shape[1])  # one matrix product for all groups
        a, x = a.reshape(ha.shape), w.astype(np.float64).reshape(ha.shape)
        aw, aa = np.einsum("gri,gri->g", ha, x), np.einsum("gri,gri->g", ha, a)
        fitted = np.where(aa > 0, aw / np.where(aa > 0, aa, 1.0), 0.0)
        new = np.clip(fitted, -F16_MAX, F16_MAX).astype(np.float16)

        def cost(s):  # the parabola, less the <W,W> both candidates share
            s = s.astype(np.float32).astype(np.float64)
            return s * s * aa - 2 * s * aw

        return np.where(cost(new) < cost(scales), new, scales)

    def groups_last_axis(self) -> bool:
        return True  # vectors of dim consecutive values along a row

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        if not VectorCodebook.accepts(self, tuple(shape)):
            raise FormatError(f"{where}: vq with dim {self.dim} cannot hold a tensor of shape {tuple(shape)}")
        require_keys(params, where, {"k"})
        n_vectors = int(np.prod(shape, dtype=np.int64)) // self.dim
        k = require_int(params["k"], f"{where}.k", 1, min(2**self.bits, n_vectors))
        return {
            "indices": PartSpec("U8", (bitpack.packed_size(n_vectors, index_bits(k)),)),
            "codebook": PartSpec("F16", (k, self.dim)),
            "scales": PartSpec("F16", (self._n_scales(shape),)),
        }

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        specs = self.part_specs(params, shape, self.name)
        small = sum(math.prod(specs[name].shape) for name in ("codebook", "scales"))
        # the indices (uint32 per vector), codebook and scales in float32 (twice), rows and the scaled result
        return 8 * (n // self.dim) + 8 * small + 8 * n

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        k = params["k"]
        n_vectors = int(np.prod(shape, dtype=np.int64)) // self.dim
        idx = bitpack.unpack(parts["indices"], index_bits(k), n_vectors, f"{where}.indices")
        check_index_range(idx, k, f"{where}.indices")
        codebook = np.asarray(parts["codebook"]).astype(np.float16).astype(np.float32)
        scales = np.asarray(parts["scales"]).astype(np.float16).astype(np.float32)
        rows = codebook[idx].reshape(len(scales), -1)
        with np.errstate(invalid="ignore", over="ignore"):  # stored inf and NaN are data
            return (rows * scales[:, None]).reshape(shape)
