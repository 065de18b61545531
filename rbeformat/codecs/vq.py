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

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from . import bitpack
from .arrays import check_index_range
from .base import require_int, require_keys
from .fields import choice, integer, setting
from .tensor import Encoded, PartSpec, TensorCodec

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
        if np.abs(x).max() > F16_MAX:
            raise ValueError("vq: values must lie within the float16 range")
        rows = x.reshape(self._n_scales(x.shape), -1)
        # Normalise each row (or the tensor) by its RMS so one codebook fits all rows.
        rms = np.sqrt((rows.astype(np.float64) ** 2).mean(axis=1))
        scale = np.where(rms > 0, rms, 1.0)
        vectors = (rows / scale[:, None]).astype(np.float32).reshape(-1, self.dim)
        # A vector's error counts in the original units: weight it by its row's scale^2.
        weight = np.repeat(scale**2, rows.shape[1] // self.dim)
        k = min(2**self.bits, len(vectors))
        rng = np.random.default_rng(self.seed)
        # Train on a sample, then assign every vector once: the cost is one pass.
        sample = np.sort(rng.choice(len(vectors), size=min(len(vectors), max(self.train, k)), replace=False))
        centroids = kmeans(vectors[sample], weight[sample], k, self.iters, rng)
        codebook = np.clip(centroids, -F16_MAX, F16_MAX).astype(np.float16)
        idx = nearest(vectors, codebook)
        scales = _fit_scales(rows, codebook.astype(np.float32)[idx].reshape(rows.shape))
        parts = {"indices": bitpack.pack(idx, index_bits(k)), "codebook": codebook, "scales": scales}
        return Encoded(parts, {"k": k})

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

    def decode_parts(self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str,
                     refs: dict[str, np.ndarray]) -> np.ndarray:
        k = params["k"]
        n_vectors = int(np.prod(shape, dtype=np.int64)) // self.dim
        idx = bitpack.unpack(parts["indices"], index_bits(k), n_vectors, f"{where}.indices")
        check_index_range(idx, k, f"{where}.indices")
        codebook = np.asarray(parts["codebook"]).astype(np.float16).astype(np.float32)
        scales = np.asarray(parts["scales"]).astype(np.float16).astype(np.float32)
        rows = codebook[idx].reshape(len(scales), -1)
        with np.errstate(invalid="ignore", over="ignore"):  # stored inf and NaN are data
            return (rows * scales[:, None]).reshape(shape)
