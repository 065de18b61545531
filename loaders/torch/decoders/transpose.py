"""``transpose``: W stored as V = W.T, its products handed to V's decoder."""

from __future__ import annotations

import torch

from .base import Site, WeightDecoder


class TransposeDecoder(WeightDecoder):
    """W stored as V = W.T: x @ W.T = x @ V and x @ W = x @ V.T go to V's decoder."""

    def __init__(self, site: Site):
        super().__init__(site, "transpose")
        self.hold(site, "values", linear_use=self.products_exact)

    @property
    def form(self) -> str:
        return f"transpose of [{self.part_forms['values']}]"

    def decode(self) -> torch.Tensor:
        return self.value("values").t().contiguous()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.part_matmul("values", x) if self.products_exact else super().linear(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.part_linear("values", x) if self.products_exact else super().matmul(x)
