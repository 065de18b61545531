"""``lowrank``: W = A @ B (+ R), rows from the rows of A, products as two thin matmuls."""

from __future__ import annotations

import torch

from .base import Site, WeightDecoder, checked_rows


class LowRankDecoder(WeightDecoder):
    """W = float32(A @ B, summed in float64) (+ R); products run as two thin matmuls."""

    def __init__(self, site: Site):
        super().__init__(site, f"lowrank rank {site.params['rank']}")
        if self.products_exact:
            self.own_form += ", linear as two matmuls"
        self.has_residual = site.codec.residual
        for part in ("A", "B") + (("residual",) if self.has_residual else ()):
            self.hold(site, part, linear_use=self.products_exact)

    def decode(self) -> torch.Tensor:
        out = (self.value("A").double() @ self.value("B").double()).float()
        return out + self.value("residual") if self.has_residual else out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = checked_rows(index, self.shape[0]).to(self.device)
        flat = index.reshape(-1)
        out = (self.part_rows("A", flat).double() @ self.value("B").double()).float()
        if self.has_residual:
            out = out + self.part_rows("residual", flat)
        return self.as_stored(out).view(*index.shape, self.shape[1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if not self.products_exact:
            return super().linear(x)
        y = self.part_linear("A", self.part_linear("B", x))  # x @ B.T @ A.T
        return y + self.part_linear("residual", x) if self.has_residual else y

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.products_exact:
            return super().matmul(x)
        y = self.part_matmul("B", self.part_matmul("A", x))  # x @ A @ B
        return y + self.part_matmul("residual", x) if self.has_residual else y
