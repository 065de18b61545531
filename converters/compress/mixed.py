"""Mixed precision: which tensors get a rule's costlier chain, within an average bit budget.

A recipe rule may name an ``upgrade`` chain beside its ``codec`` (or a list
of ever costlier ones), and the recipe a ``budget_bits``: the average bit cost per weight (``bit_cost``, the
parts stored raw, an upper bound of what lossless coding then stores) over
every tensor those rules take.  Each such tensor is scored by how much output
error the upgrade removes, measured with fast uncalibrated encodes: with
calibration statistics, E|(W - Q) x|^2 = tr((W - Q) H (W - Q)^T), the error a
layer adds to its output on the calibration text; without, |W - Q|^2.  The
steps that remove the most error per extra stored bit are taken, greedily,
until the budget is spent (``pick``).  The result is a plain choice of chains
per tensor.  A recipe's ``budget_sensitivity = "model"`` scores the upgrades by
the drift of the whole model's outputs instead (``converters/compress/sensitivity.py``).

>>> pick([Candidate("a", 100, (4.5, 6.5), (11.0, 1.0)), Candidate("b", 100, (4.5, 6.5), (2.0, 1.0))], 5.5)
{'a': 1}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rbeformat.chain import Chain
from rbeformat.codecs.core.tensor import Calibration
from rbeformat.codecs.encoders import gptq
from rbeformat.writer import stored_part_bytes


@dataclass(frozen=True)
class Candidate:
    """One tensor that mixed precision may upgrade: its size, and the bit cost per weight and the
    error of the rule's chain (level 0) and of each upgrade (levels 1, 2, ...)."""

    name: str
    weights: int
    bits: tuple[float, ...]
    errors: tuple[float, ...]


def pick(candidates: list[Candidate], budget_bits: float) -> dict[str, int]:
    """{name: level} for the tensors that get an upgrade, within an average of ``budget_bits``.

    Greedy over every tensor's steps between the levels on the lower convex hull of its
    (bits, error) points, largest error removed per extra bit first (bits count the
    tensor's size): the allocation a budgeted choice of one level per tensor makes when
    each tensor's error falls ever slower as its bits grow.
    """
    total = sum(c.weights for c in candidates)
    spent = sum(c.weights * c.bits[0] for c in candidates)
    limit = budget_bits * total
    steps = [(gain, order, c, low, high) for c in candidates for order, (low, high, gain) in enumerate(hull_steps(c))]
    level: dict[str, int] = {}
    blocked: set[str] = set()
    for _, _, c, low, high in sorted(steps, key=lambda s: (-s[0], s[1], s[2].name)):
        if c.name in blocked or level.get(c.name, 0) != low:
            continue
        extra = c.weights * (c.bits[high] - c.bits[low])
        if spent + extra > limit:
            blocked.add(c.name)  # its later steps would skip this one
            continue
        level[c.name] = high
        spent += extra
    return level


def hull_steps(c: Candidate) -> list[tuple[int, int, float]]:
    """(from level, to level, error removed per extra bit) along the lower convex hull of the levels."""
    points = sorted(range(len(c.bits)), key=lambda i: c.bits[i])
    hull = [0]
    for i in points:
        if c.bits[i] <= c.bits[hull[-1]] or c.errors[i] >= c.errors[hull[-1]]:
            continue  # costs no more, or gains nothing over the last kept level
        while len(hull) > 1 and _slope(c, hull[-2], hull[-1]) <= _slope(c, hull[-1], i):
            hull.pop()  # the last kept level lies above the line to this one
        hull.append(i)
    return [(a, b, _slope(c, a, b)) for a, b in zip(hull, hull[1:])]


def _slope(c: Candidate, a: int, b: int) -> float:
    return (c.errors[a] - c.errors[b]) / (c.weights * (c.bits[b] - c.bits[a]))


def candidate(
    name: str,
    x: np.ndarray,
    base: Chain,
    upgrades: tuple[Chain, ...],
    calibration: Calibration | None,
    counts: str = "raw",
    measure: Callable[[np.ndarray], float] | None = None,
) -> Candidate:
    """Scores one tensor (values as float32) at the rule's chain and at each upgrade;
    ``counts`` says how bits are counted (``"raw"`` or ``"stored"``, see the module).

    Without ``measure``, the error is the layer's output error of fast uncalibrated
    encodes; with it, ``measure(decoded)`` of the encodes the converter will make
    (calibrated where ``calibration`` is given), e.g. a model's drift
    (``converters/compress/sensitivity.py``)."""
    errors, bits = [], []
    for chain in (base, *upgrades):
        calibrated = measure and calibration and calibration.method in chain.codec.calibrations
        encoded = chain.codec.encode(x, calibration=calibration) if calibrated else chain.codec.encode(x)
        decoded = chain.codec.decode(encoded.parts, encoded.params, x.shape, name)
        errors.append(measure(decoded) if measure else _error(x, decoded, calibration))
        bits.append(_bits(chain, encoded, x.shape, counts) / x.size)
    return Candidate(name, int(x.size), tuple(bits), tuple(errors))


def _bits(chain: Chain, encoded, shape: tuple[int, ...], counts: str) -> float:
    """A chain's bits for one tensor; a part stored by a lossy chain of its own counts raw
    (its stored size would need that chain's encoder run too)."""
    if counts == "raw" or any(not sub.lossless for sub in chain.parts.values()):
        return float(chain.codec.bit_cost(encoded.params, shape))
    return 8.0 * sum(stored_part_bytes(arr) for arr in encoded.parts.values())


def _error(x: np.ndarray, decoded: np.ndarray, calibration: Calibration | None) -> float:
    if calibration is not None and x.ndim == 2 and calibration.hessian.shape == (x.shape[1],) * 2:
        return gptq.output_error(x, decoded, calibration.hessian, calibration.samples)
    d = x.astype(np.float64) - decoded
    return float((d * d).sum())
