"""Share of the positive influence: the one number an attribution is read by (docs/method.md §13).

For a generation q and training image i (of the store's N), with score the method's ranking score
(``das_sd.score.ranking``: t^2 for das, so every das score counts):

    share[q, i] = c[q, i] / sum_j c[q, j],   c = max(score, 0)

A generation's shares sum to 1 whatever the scale of its raw scores (6.663e-06 or 40), so they can be
read alone and compared across generations, methods and stores. ``das-sd inspect`` rolls them up over
many generations; every single attribution (CLI, app, host plugins, PNG provenance) reports its top-k
images' shares of the same N-image total.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

NORMALISATION = "share[q, i] = max(score[q, i], 0) / sum_j max(score[q, j], 0) per generation q"

Scores = TypeVar("Scores")  # a numpy array or a torch tensor


def positive_credit(scores: Scores) -> Scores:
    """The credit a score gives: ``max(score, 0)`` (a negative ranking score gives none).

    Args:
        scores: Ranking scores, a numpy array or torch tensor of any shape.

    Returns:
        ``scores`` clipped below at 0, of the same type and shape.
    """
    return scores.clip(0, None)


def credit_shares(scores: np.ndarray, total: np.ndarray | None = None) -> np.ndarray:
    """Each generation's share of positive credit per training image (``NORMALISATION``).

    Args:
        scores: (Q, M) ranking scores: all N training images of the store (M = N), or only some
            (the top-k) when ``total`` is given.
        total: (Q,) sum over all N images of ``positive_credit(score)`` per generation, for ``scores``
            that hold only some of them; None: the row sums of ``scores``' own credit.

    Returns:
        (Q, M) float64 shares ``max(score, 0) / total``; with M = N each row sums to 1; a row whose
        total is 0 (no positive score) is all 0.
    """
    credit = positive_credit(np.asarray(scores, dtype=np.float64))
    total = credit.sum(axis=1, keepdims=True) if total is None else np.asarray(total, dtype=np.float64).reshape(-1, 1)
    return np.divide(credit, total, out=np.zeros_like(credit), where=total > 0)


def share_text(share: float | None, score: float, sign: int) -> str:
    """A share of influence as people read it: a percentage, with as many digits as it needs.

    Args:
        share: The share (0..1), or None when not known.
        score: The raw ranking score, shown when the share is None.
        sign: Sign of the signed effect t, shown with the raw score.

    Returns:
        E.g. ``"23.4%"``, ``"0.21%"``, ``"<0.01%"``; ``"score 0.0123 (+)"`` without a share.
    """
    if share is None:
        return f"score {score:.3g} ({'+' if sign >= 0 else '−'})"
    percent = 100 * share
    if percent == 0 or percent >= 0.01:
        return f"{percent:.1f}%" if percent >= 1 or percent == 0 else f"{percent:.2f}%"
    return "<0.01%"
