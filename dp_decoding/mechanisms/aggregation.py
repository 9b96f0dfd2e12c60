"""The aggregation every mechanism consumes: the sum of the private rows' distributions."""

from __future__ import annotations

import numpy as np


def aggregate(logprobs: np.ndarray) -> np.ndarray:
    """Sum of the rows' distributions renormalised over the given columns.

    ``logprobs`` is ``[M, K]`` (log-probabilities of the K candidates under each prompt); each
    row is renormalised to a probability vector over the K candidates *before* summing, which
    is what bounds the sensitivity. Rows with no mass (all ``-inf``) become uniform.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    m = lp.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(lp - m)
    z = w.sum(axis=1, keepdims=True)
    p = np.where(z > 0, w / np.where(z > 0, z, 1.0), 1.0 / lp.shape[1])
    return p.sum(axis=0)
