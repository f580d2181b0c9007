"""Entropy of a next-token distribution from the log-probabilities a backend returns.

Shared by the backends that only see log-probabilities (vLLM offline, OpenAI-compatible
servers): `exact_entropy` when all V are returned, `topk_entropy` when only the K most
likely are. Pure numpy; knows nothing about engines or requests.
"""

from __future__ import annotations

import numpy as np

from thinklab.config import ENTROPY_ESTIMATORS


def topk_entropy(logprobs: np.ndarray, vocab_size: int, estimator: str = "lower") -> np.ndarray:
    """Estimate each row's entropy (nats) from its K largest log-probabilities. (T, K) -> (T,).

    With p_1 >= ... >= p_K the known probabilities and r = 1 - sum(p) the unseen tail mass,
    H = -sum_known p log p + H_tail, and every tail token has probability <= p_K, so
    H_tail >= r * (-log p_K). Two estimators of H_tail:
      "lower":   r * (-log p_K), a lower bound on the true entropy (tight when the tail is a
                 few tokens just under p_K);
      "uniform": -r log(r / (V - K)), the tail spread evenly over the other V - K tokens,
                 an upper bound on the true entropy.
    Masked tokens (-inf, from top-k/top-p) count 0; when r is tiny (K covers the
    support) both are exact. Rows may hold fewer than K finite entries.
    """
    if estimator not in ENTROPY_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not valid; choose one of {ENTROPY_ESTIMATORS}")
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"expected a (tokens, K) array of log-probabilities, got shape {lp.shape}")
    finite = np.isfinite(lp)
    p = np.where(finite, np.exp(np.where(finite, lp, 0.0)), 0.0)
    known = -(p * np.where(finite, lp, 0.0)).sum(axis=1)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    tail = np.where(tail < 1e-6, 0.0, tail)  # float32 rounding of vLLM's values, not a real tail
    if estimator == "lower":
        p_k = np.where(finite, lp, np.inf).min(axis=1)  # log of the smallest known probability
        tail_term = tail * np.where(np.isfinite(p_k), -p_k, 0.0)
    else:
        n_rest = max(vocab_size - lp.shape[1], 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            tail_term = np.where(tail > 0, -tail * np.log(tail / n_rest), 0.0)
    return np.maximum(known + tail_term, 0.0)  # -0.0 and rounding below zero for point masses


def exact_entropy(logprobs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of full-vocabulary log-probabilities. (T, V) -> (T,)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    finite = np.isfinite(lp)
    return np.maximum(-(np.where(finite, np.exp(np.where(finite, lp, 0.0)) * lp, 0.0)).sum(axis=1), 0.0)


__all__ = ["ENTROPY_ESTIMATORS", "exact_entropy", "topk_entropy"]
