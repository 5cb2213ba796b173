"""Credit shares: attribution scores of many generations rolled up per training image and per group.

Normalisation (recorded in every report): each generation's shares of positive credit
(``das_sd.shares``, the definition every single attribution reports too); they sum to 1, so every
generation carries the same weight however large its raw scores are. The signed view
keeps direction: signed[q, i] = t[q, i] / sum_j |t[q, j]| (t the method's signed effect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..shares import NORMALISATION, credit_shares

__all__ = ["NORMALISATION", "SIGNED_NORMALISATION", "GroupCredit", "ImageCredit", "credit_shares", "group_credits",
           "image_credits", "signed_shares"]

SIGNED_NORMALISATION = "signed[q, i] = t[q, i] / sum_j |t[q, j]| per generation q"


def signed_shares(effects: np.ndarray) -> np.ndarray:
    """Each generation's signed share per training image: direction kept (docs/method.md §13).

    Args:
        effects: (Q, N) signed effects t.

    Returns:
        (Q, N) float64 ``t / sum_j |t_j|`` per row; a row of zeros stays zero.
    """
    effects = np.asarray(effects, dtype=np.float64)
    total = np.abs(effects).sum(axis=1, keepdims=True)
    return np.divide(effects, total, out=np.zeros_like(effects), where=total > 0)


@dataclass
class ImageCredit:
    """One training image's credit over all inspected generations.

    Attributes:
        index: The image's row in the store.
        total_share: Sum over generations of its share.
        mean_share: Its mean share over the generations.
        mean_signed_share: Its mean signed share over the generations.
        top_k_count: Generations in whose top-k by share it appears.
        top_generations: ``(generation index, share)`` of its largest-share generations, largest first.
    """
    index: int
    total_share: float  # sum over generations of its share
    mean_share: float  # total / number of generations
    mean_signed_share: float
    top_k_count: int  # generations in whose top-k it appears
    top_generations: list[tuple[int, float]]  # (generation index, share), largest first


def image_credits(shares: np.ndarray, signed: np.ndarray, top_k: int, per_image: int = 5) -> list[ImageCredit]:
    """Roll the shares up per training image (docs/method.md §13).

    Args:
        shares: (Q, N) credit shares (``credit_shares``).
        signed: (Q, N) signed shares (``signed_shares``).
        top_k: k of the top-k counts (capped at N).
        per_image: Largest-share generations listed per image.

    Returns:
        One credit per training image, in row order.
    """
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
    """One group's credit over all inspected generations.

    Attributes:
        name: The group's name.
        size: Training images in the group.
        size_share: size / N: the share the group would get if credit ignored content.
        mean_share: Mean over generations of the group's summed share.
        ci_low: Lower end of the bootstrap 95 % interval of ``mean_share`` (resampling generations).
        ci_high: Upper end of that interval.
        per_generation: The group's summed share in each generation.
    """
    name: str
    size: int  # training images in the group
    size_share: float  # size / N: the share a group would get if credit ignored content
    mean_share: float  # mean over generations of the group's summed share
    ci_low: float  # bootstrap 95 % interval over generations
    ci_high: float
    per_generation: list[float]


def group_credits(shares: np.ndarray, groups: list[str], bootstrap: int = 1000, seed: int = 0) -> list[GroupCredit]:
    """Per group: the summed share per generation, its mean, and a bootstrap 95 % interval that
    resamples generations with replacement (docs/method.md §13).

    Args:
        shares: (Q, N) credit shares.
        groups: The group name of each of the N training images.
        bootstrap: Resamples of the generations.
        seed: Seed of the bootstrap.

    Returns:
        One credit per group, largest mean share first.
    """
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
