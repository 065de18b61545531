"""``vq``: each row a run of codebook vectors times its scale, decoded per forward."""

from __future__ import annotations

import math

import torch

from rbeformat.codecs.util import bitpack
from rbeformat.codecs.util.arrays import check_index_range
from rbeformat.codecs.vq import index_bits

from .base import Site, WeightDecoder, padded_packed, unpack


class VQDecoder(WeightDecoder):
    """W[r, j*dim + i] = codebook[idx[r, j], i] * scales[r]."""

    def __init__(self, site: Site):
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
