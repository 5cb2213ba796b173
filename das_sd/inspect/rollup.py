"""Credit shares: attribution scores of many generations rolled up per training image and per group.

Normalisation (recorded in every report): for each generation q, the share of training image i is

    share[q, i] = c[q, i] / sum_j c[q, j],   c = max(score, 0)

where score is the method's ranking score (t^2 for DAS, so c = score). Shares of one generation sum
to 1, so every generation carries the same weight however large its raw scores are. The signed view
keeps direction: signed[q, i] = t[q, i] / sum_j |t[q, j]| (t the method's signed effect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORMALISATION = "share[q, i] = max(score[q, i], 0) / sum_j max(score[q, j], 0) per generation q"
SIGNED_NORMALISATION = "signed[q, i] = t[q, i] / sum_j |t[q, j]| per generation q"


def credit_shares(scores: np.ndarray) -> np.ndarray:
    """(Q, N) ranking scores -> (Q, N) shares, each row summing to 1 (all zero rows stay zero)."""
    credit = np.clip(np.asarray(scores, dtype=np.float64), 0, None)
    total = credit.sum(axis=1, keepdims=True)
    return np.divide(credit, total, out=np.zeros_like(credit), where=total > 0)


def signed_shares(effects: np.ndarray) -> np.ndarray:
    """(Q, N) signed effects t -> t / sum |t| per row."""
    effects = np.asarray(effects, dtype=np.float64)
    total = np.abs(effects).sum(axis=1, keepdims=True)
    return np.divide(effects, total, out=np.zeros_like(effects), where=total > 0)


@dataclass
class ImageCredit:
    """One training image's credit over all inspected generations."""
    index: int
    total_share: float  # sum over generations of its share
    mean_share: float  # total / number of generations
    mean_signed_share: float
    top_k_count: int  # generations in whose top-k it appears
    top_generations: list[tuple[int, float]]  # (generation index, share), largest first


def image_credits(shares: np.ndarray, signed: np.ndarray, top_k: int, per_image: int = 5) -> list[ImageCredit]:
    q, n = shares.shape
    k = min(top_k, n)
    top = np.argpartition(-shares, k - 1, axis=1)[:, :k] if n else np.zeros((q, 0), dtype=int)
    counts = np.bincount(top.ravel(), minlength=n)
    best = np.argsort(-shares, axis=0, kind="stable")[:per_image].T  # (N, per_image) generation indices
    return [ImageCredit(i, float(shares[:, i].sum()), float(shares[:, i].mean()), float(signed[:, i].mean()),
                        int(counts[i]), [(int(g), float(shares[g, i])) for g in best[i]])
            for i in range(n)]


@dataclass
class GroupCredit:
    name: str
    size: int  # training images in the group
    size_share: float  # size / N: the share a group would get if credit ignored content
    mean_share: float  # mean over generations of the group's summed share
    ci_low: float  # bootstrap 95 % interval over generations
    ci_high: float
    per_generation: list[float]


def group_credits(shares: np.ndarray, groups: list[str], bootstrap: int = 1000, seed: int = 0) -> list[GroupCredit]:
    """Per group: the summed share per generation, its mean, and a bootstrap 95 % interval that
    resamples generations with replacement. Groups come out largest mean share first."""
    names = sorted(set(groups))
    member = np.zeros((len(groups), len(names)))
    member[np.arange(len(groups)), [names.index(g) for g in groups]] = 1.0
    per_group = shares @ member  # (Q, G)
    q = per_group.shape[0]
    rng = np.random.default_rng(seed)
    draws = per_group[rng.integers(0, q, size=(bootstrap, q))].mean(axis=1) if q else np.zeros((0, len(names)))
    low, high = (np.quantile(draws, [0.025, 0.975], axis=0) if q else (np.zeros(len(names)),) * 2)
    sizes = member.sum(axis=0)
    out = [GroupCredit(name, int(sizes[g]), float(sizes[g] / len(groups)), float(per_group[:, g].mean()),
                       float(low[g]), float(high[g]), [float(x) for x in per_group[:, g]])
           for g, name in enumerate(names)]
    return sorted(out, key=lambda c: -c.mean_share)
