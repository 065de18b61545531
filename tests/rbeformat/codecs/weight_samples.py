"""Sample inputs shared by the codec tests: synthetic weights, and arbitrary JSON for readers.

The error measure is ``harness.rel_err``.
"""

import numpy as np
from hypothesis import strategies as st

from rbeformat import FormatError


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def gptq_problem():
    """A calibrated-encoder problem: a (64, 128) weight and H = E[x x^T] of 2048 inputs mixed by a
    random matrix, with channels of different strength, so that H is far from diagonal."""
    rng = np.random.default_rng(21)
    mix = rng.standard_normal((128, 128)) / np.sqrt(128) + np.eye(128)
    x = (mix @ rng.standard_normal((128, 2048))) * np.exp(0.7 * rng.standard_normal(128))[:, None]
    return (rng.standard_normal((64, 128)) * 0.02).astype(np.float32), x @ x.T / x.shape[1]


def heavy(shape, seed=0):
    """Student t with 3 degrees of freedom, and rows whose magnitudes span 100x."""
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.uniform(np.log(0.01), np.log(1.0), shape[0]))[:, None]
    return (rng.standard_t(3, shape) * rows).astype(np.float32)


def wild(shape, seed=1):
    """Student t with 2 degrees of freedom: infinite variance, a few huge entries."""
    return np.random.default_rng(seed).standard_t(2, shape).astype(np.float32)


# Any JSON value, as a manifest may hold where a reader expects params or a config.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def only_format_errors(*calls):
    """Runs each call; any exception other than FormatError propagates and fails the test."""
    for call in calls:
        try:
            call()
        except FormatError:
            pass
