"""``sparse.mask``, ``sparse.deltas`` and ``nm24``: zeros and the kept values, scattered per forward.

``SparseDecoder`` holds the values and the packed mask, or the packed delta codes (as a mask where
they are wider than ``base.MAX_GATHER_BITS``); ``NM24Decoder`` the packed 13-bit pattern codes and
the values.  Both check the index structure at build, as the reference decode does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rbeformat import FormatError
from rbeformat.codecs import sparse as sparse_codec
from rbeformat.codecs.util import bitpack

from .base import MAX_GATHER_BITS, Site, WeightDecoder, padded_packed, unpack


class SparseDecoder(WeightDecoder):
    """Zeros, then the kept values at the positions a bit mask or a delta code stream gives."""

    def __init__(self, site: Site):
        self.numel = math.prod(site.shape)
        params = site.params
        self.count, self.index = params["count"], params["index"]
        super().__init__(
            site, f"sparse {params['count']} of {self.numel} kept ({params['index']}), scattered per forward"
        )
        raw = site.array(self.index)
        if self.index == "mask":  # the reference's checks: padding bits, then the count
            kept = sparse_codec.mask_indices(raw, self.numel, site.where)
        else:
            kept = sparse_codec.delta_indices(raw, params["width"], params["codes"], self.numel, site.where)
        if kept.size != self.count:
            raise FormatError(f"{site.where}: index structure names {kept.size} elements, values holds {self.count}")
        if self.index == "deltas" and params["width"] <= MAX_GATHER_BITS:
            self.width, self.codes = params["width"], params["codes"]
            self.register_buffer("deltas", torch.from_numpy(padded_packed(raw, self.width, self.codes)).to(site.device))
        else:  # a mask in place of deltas wider than the unpacker reads
            self.index = "mask"
            if params["index"] == "deltas":
                flags = np.zeros(self.numel, np.uint8)
                flags[kept] = 1
                raw = np.packbits(flags, bitorder="little")
            self.register_buffer("mask", torch.from_numpy(padded_packed(raw, 1, self.numel)).to(site.device))
        self.hold(site, "values")

    def decode(self) -> torch.Tensor:
        values = self.value("values")
        out = torch.zeros(self.numel, device=values.device)
        if self.index == "mask":
            out.masked_scatter_(unpack(self.mask, 1, self.numel).bool(), values)
            return out.view(self.shape)
        codes = unpack(self.deltas, self.width, self.codes).long()
        escape = (1 << self.width) - 1
        kept = codes != escape
        end = torch.cumsum(torch.where(kept, codes + 1, codes), 0)  # an escape advances by itself
        out[end[kept] - 1] = values
        return out.view(self.shape)


class NM24Decoder(WeightDecoder):
    """2 of every 4 values kept: a base-6 pattern code per 5 groups names their positions."""

    def __init__(self, site: Site):
        super().__init__(site, "nm24 2:4, scattered per forward")
        self.groups = math.prod(site.shape) // 4
        self.blocks = -(-self.groups // sparse_codec.GROUPS_PER_CODE)
        raw = site.array("patterns")
        codes = bitpack.unpack(raw, sparse_codec.CODE_BITS, self.blocks, f"{site.where} patterns").astype(np.int64)
        if codes.size and int(codes.max()) >= sparse_codec.CODE_LIMIT:
            raise FormatError(
                f"{site.where}: pattern code {int(codes.max())} is not below 6**5 = {sparse_codec.CODE_LIMIT}"
            )
        digits = (codes[:, None] // sparse_codec.DIGIT_WEIGHTS % 6).reshape(-1)
        if digits[self.groups :].any():
            raise FormatError(f"{site.where}: padding groups of the last pattern code must have pattern 0")
        self.register_buffer(
            "patterns", torch.from_numpy(padded_packed(raw, sparse_codec.CODE_BITS, self.blocks)).to(site.device)
        )
        self.register_buffer("pairs", torch.from_numpy(sparse_codec.PAIRS.copy()).to(site.device), persistent=False)
        self.register_buffer(
            "digit_weights", torch.from_numpy(sparse_codec.DIGIT_WEIGHTS.copy()).to(site.device), persistent=False
        )
        self.hold(site, "values")

    def decode(self) -> torch.Tensor:
        codes = unpack(self.patterns, sparse_codec.CODE_BITS, self.blocks)
        digits = (codes[:, None] // self.digit_weights % 6).reshape(-1)[: self.groups]
        values = self.value("values").reshape(self.groups, 2)
        out = torch.zeros((self.groups, 4), device=values.device)
        return out.scatter_(1, self.pairs[digits], values).view(self.shape)
