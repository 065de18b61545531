"""``seed``: each block of C values rebuilt from its seed's basis u(seed) and P coefficients, times a power of two.

The basis u(s) of every seed comes from one table per (S, C, P) and device (``seed_table``),
shared by every decoder that reads it and counted once (``shared_tensors``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rbeformat import FormatError
from rbeformat.codecs import seed as seed_codec
from rbeformat.codecs.util import bitpack

from .base import Site, WeightDecoder, unpack

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

    def __init__(self, site: Site):
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
