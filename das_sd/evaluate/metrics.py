"""Ranking metrics against planted ground truth (docs/method.md §14)."""

from __future__ import annotations

from collections.abc import Sequence


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Recall@k: the fraction of the relevant items found among the first k of a ranking.

    Args:
        ranked: Item ids (training keys), best first.
        relevant: The ids that should rank high (a group's exemplars); must not be empty.
        k: How many of the first ranked items count.

    Returns:
        |top_k ∩ relevant| / |relevant|, in [0, 1].

    Raises:
        ValueError: When ``relevant`` is empty.
    """
    if not relevant:
        raise ValueError("no relevant items")
    return len(set(ranked[:k]) & relevant) / len(relevant)


def average_precision(ranked: Sequence[str], relevant: set[str]) -> float:
    """Average precision: the mean of precision@i over the ranks i of the relevant items (docs/method.md §14).

    Args:
        ranked: Item ids (training keys), best first; the full ranking, not a top-k.
        relevant: The ids that should rank high (a group's exemplars); must not be empty. Relevant ids
            missing from ``ranked`` count as found at no rank (precision 0).

    Returns:
        AP in [0, 1]; 1 when every relevant item ranks above every other.

    Raises:
        ValueError: When ``relevant`` is empty.
    """
    if not relevant:
        raise ValueError("no relevant items")
    hits, total = 0, 0.0
    for i, item in enumerate(ranked, 1):
        if item in relevant:
            hits += 1
            total += hits / i
    return total / len(relevant)
