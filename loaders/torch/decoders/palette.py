"""``palette``: values looked up in a codebook per tensor, row or group, decoded per forward."""

from __future__ import annotations

import math

import torch

from .base import Site, WeightDecoder, unpack


class PaletteDecoder(WeightDecoder):
    """value = codebook[k][index], codebook k of the tensor, the row, or the row's group."""

    def __init__(self, site: Site):
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
