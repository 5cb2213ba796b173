"""The LDS statistic (docs/method.md §15): Spearman rank correlation, LDS of a method's scores with
its bootstrap interval over queries, and the oracle datamodel fitted to the outputs themselves.
"""

from __future__ import annotations

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation, with average ranks for ties.

    Args:
        a: 1-D values.
        b: 1-D values, as many as ``a``.

    Returns:
        The correlation in [-1, 1]; nan when either side is constant.
    """
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, bootstrap: int = 1000,
        seed: int = 0) -> dict:
    """LDS of one method on one query set (docs/method.md §15).

    The prediction for subset j is ``-masks[j] @ scores[q]``; queries whose Spearman correlation is nan
    (a constant side) are dropped.

    Args:
        scores: (Q, N) the method's ranking keys (``das_sd.score.ranking``: t^2 for das, not signed t).
        masks: (M, N) bool subset masks (``draw_subsets``).
        outputs: (M, Q) model outputs of the retrained LoRAs (``retrained_outputs``).
        bootstrap: Resamples of the queries for the 95 % interval.
        seed: Seed of the bootstrap.

    Returns:
        ``{"lds": mean over queries, "ci": [low, high] 95 % bootstrap interval, "per_query": (Q,) list with
        nan for dropped queries, "queries": queries kept}``; lds and ci are nan when no query is kept.
    """
    predictions = -(masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T)  # (M, Q)
    per_query = np.array([spearman(predictions[:, q], outputs[:, q]) for q in range(outputs.shape[1])])
    valid = per_query[~np.isnan(per_query)]
    if valid.size == 0:
        return {"lds": float("nan"), "ci": [float("nan")] * 2, "per_query": per_query.tolist(), "queries": 0}
    rng = np.random.default_rng(seed)
    means = valid[rng.integers(0, valid.size, size=(bootstrap, valid.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"lds": float(valid.mean()), "ci": [float(low), float(high)], "per_query": per_query.tolist(),
            "queries": int(valid.size)}


def oracle_scores(masks: np.ndarray, outputs: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Attributions fitted to the retrained outputs themselves (a ridge linear datamodel per query,
    with intercept): the best any method could do on these subsets.

    Args:
        masks: (M, N) bool subset masks.
        outputs: (M, Q) model outputs of the retrained LoRAs.
        ridge: Ridge penalty of the fit (on the intercept too).

    Returns:
        (Q, N) float64 scores in the method convention (yhat = -mask @ score).
    """
    x = masks.astype(np.float64)
    x = np.hstack([x, np.ones((x.shape[0], 1))])
    gram = x.T @ x + ridge * np.eye(x.shape[1])
    beta = np.linalg.solve(gram, x.T @ outputs)  # (N + 1, Q)
    return -beta[:-1].T
