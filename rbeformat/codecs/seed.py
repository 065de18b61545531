"""The ``seed`` codec: weights as pseudo-random bases picked by a seed (SeedLM).

The last axis is cut into blocks of ``block`` (C) consecutive weights.  Each
block w is stored as an S-bit seed s, P small signed integers q and an E-bit
exponent e, and rebuilt as w ~ U(s) q 2**k: U(s) is a C x P matrix that an
S-bit linear-feedback shift register (see ``lfsr``) generates from s.  Only the
seed is stored for the basis, so a block costs (S + P*Q + E) / C bits per
weight; the encoder searches all 2**S - 1 seeds for the best fit.

Decode, every step exact (integers, then one exact power-of-two scaling)::

    x[s, n]   = LFSR state after S*(n+1) steps from state s     (n = 0..C*P-1)
    u[s, i, j] = x[s, i*P + j] - 2**(S-1)                        (integer)
    q[b, j]   = coeffs[b*P + j] - 2**(Q-1)                       (integer)
    m[b, i]   = sum_j u[seed[b], i, j] * q[b, j]                 (integer, |m| < 2**24)
    W[b*C + i] = float32(m[b, i]) * 2**(exponents[b] - exp_bias - (S-1))

Seed 0 (the all-zero register, which never changes) is invalid.  The value of
u/2**(S-1) is ``lfsr.values`` of the state, so U(s) = u[s] / 2**(S-1).

>>> codec = SeedCodec(block=8, rank=3, seed_bits=10)
>>> x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
>>> enc = codec.encode(x)
>>> y = codec.decode(enc.parts, enc.params, x.shape, "x")
>>> codec.bit_cost(enc.params, x.shape) / x.size
3.25
>>> bool(np.linalg.norm(x - y) < 0.6 * np.linalg.norm(x))
True
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FormatError
from .core.base import require_int, require_keys
from .core.fields import integer, setting
from .core.tensor import Encoded, PartSpec, TensorCodec
from .util import bitpack, lfsr

# One search step scores this many (block, seed) pairs at once (64 MiB of float32).
SCORE_ENTRIES = 1 << 24
# Blocks are decoded this many at a time, and fitted in chunks of this many
# basis entries (blocks x candidates x C x P), to bound memory.
CHUNK_BLOCKS = 1 << 15
CHUNK_ENTRIES = 1 << 22
# Seed tables are built this many seeds at a time.
TABLE_SEEDS = 4096
# Exponent trials around the smallest exponent that avoids clipping, and sweeps
# of coordinate descent over the integer coefficients.
EXP_TRIALS = (-1, 0, 1)
REFINE_SWEEPS = 1


@functools.lru_cache(maxsize=8)
def basis_table(block: int, rank: int, seed_bits: int) -> np.ndarray:
    """u for every seed: (2**S, C, P) int32; row s is the integer basis of seed s."""
    states = lfsr.state_table(seed_bits, block * rank, stride=seed_bits)
    return (states.astype(np.int32) - 2 ** (seed_bits - 1)).reshape(-1, block, rank)


@functools.lru_cache(maxsize=4)
def search_tables(block: int, rank: int, seed_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per seed: the basis U (float32), its pseudo-inverse, and projector features.

    The projection energy of w on span U(s) is w^T Pr(s) w, linear in the
    products w_i w_j: features[(i,j), s] = Pr(s)[i,j] * (1 if i == j else 2)
    for i <= j, so one matmul scores many blocks against all seeds.  Column 0
    (the invalid seed) is all zeros.
    """
    u = basis_table(block, rank, seed_bits).astype(np.float64) / 2 ** (seed_bits - 1)
    iu, ju = np.triu_indices(block)
    pinv = np.zeros((len(u), rank, block), dtype=np.float32)
    features = np.zeros((len(iu), len(u)), dtype=np.float32)
    for start in range(1, len(u), TABLE_SEEDS):  # in slices of seeds, to bound memory
        seeds = slice(start, start + TABLE_SEEDS)
        a, sv, bt = np.linalg.svd(u[seeds], full_matrices=False)
        keep = sv > sv[:, :1] * 1e-6  # a rank-deficient basis projects on its true span
        inv_sv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
        pinv[seeds] = np.einsum("sji,sj,skj->sik", bt, inv_sv, a)
        a = a * keep[:, None, :]
        proj = np.einsum("sip,sip->si", a[:, iu], a[:, ju])  # Pr[i, j] for i <= j
        features[:, seeds] = (proj * np.where(iu == ju, 1.0, 2.0)).T
    return u.astype(np.float32), pinv, features


def _candidates(blocks: np.ndarray, features: np.ndarray, count: int) -> np.ndarray:
    """For each block, the best-projecting seed in each of ``count`` equal seed ranges."""
    iu, ju = np.triu_indices(blocks.shape[1])
    n_seeds = features.shape[1]
    step = max(1, SCORE_ENTRIES // n_seeds)
    out = np.empty((len(blocks), count), dtype=np.int32)
    offsets = np.arange(count) * (n_seeds // count)
    buffer = np.empty((min(step, len(blocks)), n_seeds), dtype=np.float32)  # reused: no page faults
    for start in range(0, len(blocks), step):
        w = blocks[start : start + step]
        scores = np.matmul(w[:, iu] * w[:, ju], features, out=buffer[: len(w)])
        out[start : start + step] = scores.reshape(len(w), count, -1).argmax(axis=2) + offsets
    out[out == 0] = 1  # the zero column only wins for an all-zero block, where any seed does
    return out


def _fitted(pinv: np.ndarray, cands: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Unquantized least-squares coefficients of each block on each candidate basis."""
    return np.einsum("nkpc,nc->nkp", pinv[cands], w)


def _power_of_two(value: Any, where: str) -> int:
    value = integer(1, 64)(value, where)
    if value & (value - 1):
        raise FormatError(f"{where}: expected a power of two, found {value}")
    return value


@dataclass(frozen=True)
class SeedCodec(TensorCodec):
    """SeedLM: C weights = LFSR basis U(seed) (C x P) times P Q-bit coefficients * 2**e."""

    name = "seed"

    block: int = setting(8, integer(2, 32), "weights per block (C)")
    rank: int = setting(3, integer(1, 8), "basis vectors per block (P), at most the block")
    coef_bits: int = setting(4, integer(2, 8), "bits per coefficient (Q)")
    exp_bits: int = setting(4, integer(1, 6), "bits of each block's shared exponent (E)")
    seed_bits: int = setting(16, integer(min(lfsr.TAPS), max(lfsr.TAPS)), "bits of the LFSR seed (S)")
    # An encoder setting that files of format 1.1 / 1.2 record in the config.
    candidates: int = setting(8, _power_of_two, "encoder: seeds kept per block for the exact fit", "recorded")

    def check_settings(self, where: str) -> None:
        if self.rank > self.block:
            raise FormatError(f"{where}.rank: expected at most the block ({self.block}), found {self.rank}")
        # Keeps every decode product and sum an exact float32 integer.
        if self.rank << (self.seed_bits + self.coef_bits - 2) > 1 << 24:
            raise FormatError(f"{where}: rank * 2**(seed_bits + coef_bits - 2) exceeds 2**24")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1 and shape[-1] > 0 and shape[-1] % self.block == 0 and int(np.prod(shape)) > 0

    def _bias_range(self) -> tuple[int, int]:
        # Every scale 2**(e - bias - (S-1)) times |m| < 2**24 stays a normal float32.
        s1 = self.seed_bits - 1
        return 2**self.exp_bits - 1 - s1 - 103, 126 - s1

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        blocks = x.reshape(-1, self.block)
        u, pinv, features = search_tables(self.block, self.rank, self.seed_bits)
        cands = _candidates(blocks, features, self.candidates)
        size = max(1, CHUNK_ENTRIES // (self.candidates * self.block * self.rank))
        chunks = [slice(i, i + size) for i in range(0, len(blocks), size)]
        # The exponent window reaches the largest coefficient; tinier blocks round coarser.
        top = max(int(self._ideal_exponent(_fitted(pinv, cands[c], blocks[c])).max()) for c in chunks)
        low, high = self._bias_range()
        bias = min(max(2**self.exp_bits - 1 - top, low), high)
        fits = [self._quantize(blocks[c], cands[c], u, pinv, bias) for c in chunks]
        seeds, coefs, exps = (np.concatenate(column) for column in zip(*fits))
        parts = {
            "seeds": bitpack.pack(seeds, self.seed_bits),
            "coeffs": bitpack.pack(coefs.reshape(-1) + 2 ** (self.coef_bits - 1), self.coef_bits),
            "exponents": bitpack.pack(exps, self.exp_bits),
        }
        return Encoded(parts, {"exp_bias": bias})

    def _ideal_exponent(self, t: np.ndarray) -> np.ndarray:
        """Smallest k with every round(t / 2**k) in the Q-bit range, over the last axis."""
        half = 2 ** (self.coef_bits - 1)
        need = np.maximum(t.max(axis=-1) / (half - 0.5), -t.min(axis=-1) / (half + 0.5))
        with np.errstate(divide="ignore"):
            k = np.ceil(np.log2(need))
        return np.where(need > 0, k, -1000).astype(np.int64)

    def _quantize(self, w, cands, u, pinv, bias):
        """Quantizes each candidate at a few exponents; keeps the least squared error.

        Returns the chosen seeds, integer coefficients and exponent codes.
        """
        half = 2 ** (self.coef_bits - 1)
        lo_k, hi_k = -bias, 2**self.exp_bits - 1 - bias  # the exponents the window allows
        t = _fitted(pinv, cands, w)  # (n, kc, P)
        k0 = self._ideal_exponent(t)
        basis = u[cands]  # (n, kc, C, P)
        rows = np.arange(len(w))
        best_err = np.full(len(w), np.inf)
        seeds, coefs, exps = np.ones(len(w), np.int64), np.zeros((len(w), self.rank)), np.zeros(len(w), np.int64)
        for delta in EXP_TRIALS:
            k = np.clip(k0 + delta, lo_k, hi_k)
            step = np.ldexp(np.float32(1), k.astype(np.int32))[..., None]
            q = np.clip(np.rint(t / step), -half, half - 1)
            r = w[:, None, :] - np.einsum("nkcp,nkp->nkc", basis, q * step)
            for _ in range(REFINE_SWEEPS):
                # Rounding each coefficient alone is not the best integer fit of a
                # non-orthogonal basis: move each one to its best value given the rest.
                for j in range(self.rank):
                    col = basis[..., j] * step
                    move = np.rint((col * r).sum(axis=2) / np.maximum((col * col).sum(axis=2), 1e-30))
                    new = np.clip(q[..., j] + move, -half, half - 1)
                    r -= col * (new - q[..., j])[..., None]
                    q[..., j] = new
            err = (r.astype(np.float64) ** 2).sum(axis=2)
            pick = err.argmin(axis=1)
            better = err[rows, pick] < best_err
            best_err[better] = err[rows, pick][better]
            seeds[better] = cands[rows, pick][better]
            coefs[better] = q[rows, pick][better]
            exps[better] = k[rows, pick][better] + bias
        return seeds, coefs.astype(np.int64), exps

    def groups_last_axis(self) -> bool:
        return True  # blocks of consecutive values along a row

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        if not self.accepts(tuple(shape)):
            raise FormatError(f"{where}: seed with block {self.block} cannot hold a tensor of shape {tuple(shape)}")
        require_keys(params, where, {"exp_bias"})
        require_int(params["exp_bias"], f"{where}.exp_bias", *self._bias_range())
        n = int(np.prod(shape, dtype=np.int64)) // self.block
        return {
            "seeds": PartSpec("U8", (bitpack.packed_size(n, self.seed_bits),)),
            "coeffs": PartSpec("U8", (bitpack.packed_size(n * self.rank, self.coef_bits),)),
            "exponents": PartSpec("U8", (bitpack.packed_size(n, self.exp_bits),)),
        }

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        blocks = n // self.block
        table = 4 * 2**self.seed_bits * self.block * self.rank  # basis_table (cached): its states, a copy, the result
        chunk = min(blocks, CHUNK_BLOCKS) * self.block * (4 * self.rank + 24)
        # seeds and exponents (uint32, int32), coefficients (uint32, int32 twice), the result
        return 3 * table + chunk + 8 * blocks + 12 * blocks * self.rank + 4 * n

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) // self.block
        seeds = bitpack.unpack(parts["seeds"], self.seed_bits, n, f"{where}.seeds")
        if n and int(seeds.min()) == 0:
            raise FormatError(f"{where}.seeds: seed 0 is invalid (block {int(np.argmin(seeds))})")
        q = bitpack.unpack(parts["coeffs"], self.coef_bits, n * self.rank, f"{where}.coeffs")
        q = q.astype(np.int32).reshape(n, self.rank) - 2 ** (self.coef_bits - 1)
        shift = bitpack.unpack(parts["exponents"], self.exp_bits, n, f"{where}.exponents").astype(np.int32)
        shift -= params["exp_bias"] + self.seed_bits - 1
        table = basis_table(self.block, self.rank, self.seed_bits)
        out = np.empty((n, self.block), dtype=np.float32)
        for i in range(0, n, CHUNK_BLOCKS):
            basis = table[seeds[i : i + CHUNK_BLOCKS]]  # (n, C, P) int32
            m = np.einsum("bcp,bp->bc", basis, q[i : i + CHUNK_BLOCKS])  # exact: |m| < 2**24
            out[i : i + CHUNK_BLOCKS] = np.ldexp(m.astype(np.float32), shift[i : i + CHUNK_BLOCKS, None])
        return out.reshape(shape)
