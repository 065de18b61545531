"""Mixed precision: which tensors get a rule's costlier chain, within an average bit budget.

A recipe rule may name an ``upgrade`` chain beside its ``codec``, and the
recipe a ``budget_bits``: the average bit cost per weight (``bit_cost``, the
parts stored raw, an upper bound of what lossless coding then stores) over
every tensor those rules take.  Each such tensor is scored by how much output
error the upgrade removes, measured with fast uncalibrated encodes: with
calibration statistics, E|(W - Q) x|^2 = tr((W - Q) H (W - Q)^T), the error a
layer adds to its output on the calibration text; without, |W - Q|^2.  The
tensors that gain most per extra bit get the upgrade, greedily, until the
budget is spent.  The result is a plain choice of chains per tensor.

>>> pick([Candidate("a", 100, 4.5, 6.5, 10.0), Candidate("b", 100, 4.5, 6.5, 1.0)], 5.5)
{'a'}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rbeformat.chain import Chain
from rbeformat.codecs import gptq
from rbeformat.codecs.tensor import Calibration


@dataclass(frozen=True)
class Candidate:
    """One tensor that may get the upgrade: its size, both bit costs per weight, and the error removed."""

    name: str
    weights: int
    base_bits: float
    upgrade_bits: float
    gain: float


def pick(candidates: list[Candidate], budget_bits: float) -> set[str]:
    """The names that get the upgrade: best gain per extra bit first, while the average stays within budget."""
    total = sum(c.weights for c in candidates)
    spent = sum(c.weights * c.base_bits for c in candidates)
    limit = budget_bits * total
    chosen = set()
    ranked = sorted(candidates, key=lambda c: c.gain / max(c.upgrade_bits - c.base_bits, 1e-9), reverse=True)
    for c in ranked:
        extra = c.weights * (c.upgrade_bits - c.base_bits)
        if c.gain > 0 and spent + extra <= limit:
            chosen.add(c.name)
            spent += extra
    return chosen


def candidate(name: str, x: np.ndarray, base: Chain, upgrade: Chain, calibration: Calibration | None) -> Candidate:
    """Scores one tensor (values as float32) for the upgrade."""
    errors, bits = [], []
    for chain in (base, upgrade):
        encoded = chain.codec.encode(x)
        decoded = chain.codec.decode(encoded.parts, encoded.params, x.shape, name)
        errors.append(_error(x, decoded, calibration))
        bits.append(chain.codec.bit_cost(encoded.params, x.shape) / x.size)
    return Candidate(name, int(x.size), bits[0], bits[1], errors[0] - errors[1])


def _error(x: np.ndarray, decoded: np.ndarray, calibration: Calibration | None) -> float:
    if calibration is not None and x.ndim == 2 and calibration.hessian.shape == (x.shape[1],) * 2:
        return gptq.output_error(x, decoded, calibration.hessian)
    d = x.astype(np.float64) - decoded
    return float((d * d).sum())
