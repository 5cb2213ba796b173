"""Ranking metrics (das_sd/evaluate/metrics.py) and the ground-truth harness against known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_sd.data.datasets import open_dataset
from das_sd.data.ground_truth import load_ground_truth
from das_sd.evaluate.groundtruth import evaluate_ground_truth
from das_sd.evaluate.metrics import average_precision, recall_at_k


def brute_force_ap(ranked: list[str], relevant: set[str]) -> float:
    """AP as the area under the precision-recall steps: precision at each relevant item's 1-based rank."""
    ranks = np.array(sorted(i + 1 for i, item in enumerate(ranked) if item in relevant), dtype=float)
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def test_metrics_match_brute_force_on_random_rankings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        items = [f"k{i}" for i in range(40)]
        ranked = list(rng.permutation(items))
        relevant = set(rng.choice(items, size=int(rng.integers(1, 12)), replace=False))
        assert average_precision(ranked, relevant) == pytest.approx(brute_force_ap(ranked, relevant))
        k = int(rng.integers(1, 40))
        assert recall_at_k(ranked, relevant, k) == sum(item in relevant for item in ranked[:k]) / len(relevant)
    assert average_precision(["a", "b", "c", "d"], {"a", "b"}) == 1.0
    assert average_precision(["c", "d", "a", "b"], {"a", "b"}) == pytest.approx((1 / 3 + 2 / 4) / 2)
    with pytest.raises(ValueError):
        recall_at_k(["a"], set(), 1)


# the scorer's two methods take the names of methods ranked by t itself (das_sd.score.ranking), so
# that the effects t it returns are the ranking
PLANTED, INVERSE = "das-signed", "tracin"


class PlantedScorer:
    """The real demo attributor with methods that know the answer: t = 1 for the exemplars of the
    query's trigger word, 0 elsewhere (PLANTED), or the other way round (INVERSE)."""

    def __init__(self, attributor, data):
        self._inner = attributor
        key_of = {s.relpath: s.key for s in open_dataset(data)}
        self._exemplars = {g["trigger"]: {key_of[f] for f in g["files"]} for g in load_ground_truth(data)["groups"]}
        self.methods = [PLANTED, INVERSE]

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def query_features(self, latents, prompts):
        return None

    def scores(self, latents, prompts, name, features=None):
        trigger = prompts[0].split(",")[0]
        hit = torch.tensor([float(r.key in self._exemplars[trigger]) for r in self._inner.rows])
        return (hit if name == PLANTED else 1 - hit)[None]


def test_a_scorer_that_ranks_the_exemplars_first_gets_map_1(demo):
    from das_sd.attribute import Attributor

    scorer = PlantedScorer(Attributor(demo["store"], device="cpu"), demo["data"])
    report = evaluate_ground_truth(scorer, demo["data"], split="test", steps=2)
    n, per_group = len(scorer.rows), 8
    assert report["methods"][PLANTED] == {"recall@5": 5 / per_group, "recall@10": 1.0, "ap": 1.0}
    # exemplars ranked last: ranks n - 7 .. n, the smallest AP there is
    worst = np.mean([(i + 1) / (n - per_group + i + 1) for i in range(per_group)])
    assert report["methods"][INVERSE]["ap"] == pytest.approx(worst, abs=1e-4)
    assert report["methods"][INVERSE]["recall@10"] == 0.0
