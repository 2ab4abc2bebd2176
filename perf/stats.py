"""How sure an accuracy comparison is: paired bootstrap intervals on the same sentences.

Two variants scored on the same sentences differ only where their answers differ, so the
interval of the *paired* difference is much narrower than two separate accuracy intervals
(Koehn 2004, "Statistical Significance Tests for Machine Translation Evaluation"; Efron &
Tibshirani 1993, ch. 13, percentile intervals).  The selection uses it to say whether a split
can resolve the accuracy budget at all.  Percentile intervals of a mean of -1/0/+1 values are
close to exact for a few hundred sentences or more; on a few dozen they are only a guide.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def paired_difference(
    correct: np.ndarray, reference: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict:
    """Accuracy of ``correct`` minus that of ``reference`` on the same sentences, with its interval.

    Args:
        correct, reference: bool arrays [n]: sentence i answered right by the variant / the reference.
        resamples: bootstrap samples of the n sentences, drawn with replacement; the same ``seed``
            draws the same samples for every variant compared on a split.
        level: coverage of the two-sided percentile interval.

    Returns:
        ``{"difference", "low", "high"}`` in accuracy units (0.01 = one point), ``"n"`` the
        sentences, ``"discordant"`` the sentences where exactly one of the two is right (only
        those move the difference).

    Raises:
        ValueError: the arrays are empty or their lengths differ.
    """
    correct, reference = np.asarray(correct, dtype=bool), np.asarray(reference, dtype=bool)
    if len(correct) != len(reference) or len(correct) == 0:
        raise ValueError(f"paired answers needed: got {len(correct)} and {len(reference)}")
    delta = correct.astype(np.int8) - reference.astype(np.int8)  # -1, 0, +1 per sentence
    if not delta.any():  # identical answers: the difference is exactly 0 on every resample
        low = high = 0.0
    else:
        rng = np.random.default_rng(seed)
        means = np.empty(resamples)
        step = max(1, 2_000_000 // len(delta))  # resamples per chunk: a few MB of indices at a time
        for start in range(0, resamples, step):
            rows = min(step, resamples - start)
            means[start : start + rows] = delta[rng.integers(0, len(delta), size=(rows, len(delta)))].mean(axis=1)
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "difference": round(float(delta.mean()), 5),
        "low": round(float(low), 5),
        "high": round(float(high), 5),
        "n": len(delta),
        "discordant": int(np.count_nonzero(delta)),
    }
