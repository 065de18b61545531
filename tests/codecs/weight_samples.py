"""Synthetic weight matrices and the error measure shared by the codec tests."""

import numpy as np


def rel_err(x, y):
    """Relative Frobenius error |x - y| / |x|."""
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def heavy(shape, seed=0):
    """Student t with 3 degrees of freedom, and rows whose magnitudes span 100x."""
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.uniform(np.log(0.01), np.log(1.0), shape[0]))[:, None]
    return (rng.standard_t(3, shape) * rows).astype(np.float32)
