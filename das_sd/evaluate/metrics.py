"""Ranking metrics against planted ground truth."""

from __future__ import annotations

from collections.abc import Sequence


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Fraction of the relevant items found among the first k."""
    if not relevant:
        raise ValueError("no relevant items")
    return len(set(ranked[:k]) & relevant) / len(relevant)


def average_precision(ranked: Sequence[str], relevant: set[str]) -> float:
    """Mean of precision@i over the ranks i of the relevant items (over the full ranking)."""
    if not relevant:
        raise ValueError("no relevant items")
    hits, total = 0, 0.0
    for i, item in enumerate(ranked, 1):
        if item in relevant:
            hits += 1
            total += hits / i
    return total / len(relevant)
