"""Fibonacci linear-feedback shift registers, the pseudo-random source of ``seed``.

An S-bit register holds a state x in [1, 2**S).  One step shifts it right by
one bit and feeds a new bit in at the top::

    f(x)    = XOR over the taps t of bit (S - t) of x
    next(x) = (x >> 1) | (f(x) << (S - 1))

where bit k of x is (x >> k) & 1 and the taps are the exponents (other than
the constant term) of a primitive feedback polynomial, so that every nonzero
state is visited once in a cycle of 2**S - 1 steps.  The all-zero state maps to
itself and is never used.  For S = 16 the polynomial is
x^16 + x^14 + x^13 + x^11 + 1: taps (16, 14, 13, 11), feedback bits 0, 2, 3, 5.

A generated value is a state read as a signed fraction, exactly in float32::

    value(x) = (x - 2**(S-1)) / 2**(S-1)        (in (-1, 1), exact)

>>> states(1, 16, 4).tolist()
[32768, 16384, 8192, 4096]
>>> float(values(np.array([1, 32768, 65535]), 16)[2])
0.999969482421875
"""

from __future__ import annotations

import numpy as np

# Primitive (maximal-length) feedback polynomials, as their nonzero exponents
# other than 0.  Each is checked by the tests to have period 2**S - 1.
TAPS: dict[int, tuple[int, ...]] = {
    8: (8, 6, 5, 4),
    9: (9, 5),
    10: (10, 7),
    11: (11, 9),
    12: (12, 6, 4, 1),
    13: (13, 4, 3, 1),
    14: (14, 5, 3, 1),
    15: (15, 14),
    16: (16, 14, 13, 11),
}


def step(x: np.ndarray, bits: int) -> np.ndarray:
    """One register step applied to every state of ``x`` (an unsigned integer array)."""
    x = np.asarray(x, dtype=np.uint32)
    feedback = np.zeros_like(x)
    for tap in TAPS[bits]:
        feedback ^= x >> np.uint32(bits - tap)
    return (x >> np.uint32(1)) | ((feedback & np.uint32(1)) << np.uint32(bits - 1))


def states(seed: int, bits: int, count: int, stride: int = 1) -> np.ndarray:
    """The ``count`` states after stride, 2*stride, ... steps from ``seed`` (uint32)."""
    x = np.array([seed], dtype=np.uint32)
    out = np.empty(count, dtype=np.uint32)
    for k in range(count):
        for _ in range(stride):
            x = step(x, bits)
        out[k] = x[0]
    return out


def values(x: np.ndarray, bits: int) -> np.ndarray:
    """States mapped exactly to float32 fractions in (-1, 1)."""
    half = np.float32(2 ** (bits - 1))
    return (np.asarray(x).astype(np.float32) - half) / half


def state_table(bits: int, count: int, stride: int = 1) -> np.ndarray:
    """States for every seed at once: row s holds ``states(s, bits, count, stride)``.

    Shape (2**bits, count), uint32.  Row 0 (the forbidden seed) is all zeros.
    """
    x = np.arange(2**bits, dtype=np.uint32)
    out = np.empty((2**bits, count), dtype=np.uint32)
    for k in range(count):
        for _ in range(stride):
            x = step(x, bits)
        out[:, k] = x
    return out


def period(bits: int, seed: int = 1) -> int:
    """Steps until ``seed`` comes back (2**bits - 1 for a primitive polynomial)."""
    # Advance every state once, then follow the permutation from the seed.
    successor = step(np.arange(2**bits, dtype=np.uint32), bits)
    x, n = int(successor[seed]), 1
    while x != seed:
        x, n = int(successor[x]), n + 1
    return n
