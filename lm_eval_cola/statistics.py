"""Paired comparisons of two ways of answering the same documents: a predictor against the
full model, a gold oracle against its decoy. Each document is one pair of outcomes, so the
intervals and tests below resample or count pairs, never the two sides apart."""

from __future__ import annotations

import math

import numpy as np

#: bootstrap resamples of the documents for the paired interval
RESAMPLES = 10_000


def paired_interval(
    chosen: list[bool], reference: list[bool], seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of mean(chosen) - mean(reference), documents resampled in pairs."""
    differences = np.asarray(chosen, dtype=float) - np.asarray(reference, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(differences), size=(RESAMPLES, len(differences)))
    means = differences[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def mcnemar(chosen: list[bool], reference: list[bool]) -> float:
    """Exact McNemar p-value: of the documents where the two disagree, how unlikely a split
    this uneven is if each is equally likely to be the right one."""
    wins = sum(c and not r for c, r in zip(chosen, reference, strict=True))
    losses = sum(r and not c for c, r in zip(chosen, reference, strict=True))
    n, low = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2 * tail)
