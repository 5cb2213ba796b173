"""Planted ground truth: images generated with a group's trigger word should be attributed to that
group's exemplars (docs/method.md §14). Reports Recall@K and mAP per method.

Queries come in two disjoint splits, so that settings are chosen on one and reported on the other:
``tune`` (subjects and seeds used to choose f, lambda, ...) and ``test`` (what the README reports).
A group in ``ground_truth.json`` may list its own ``prompts`` (any dataset); otherwise the demo's
vocabulary fills ``{trigger}, a {fg} {shape} on a {bg} background``; with given prompts the two
splits differ by their seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.datasets import open_dataset
from ..data.ground_truth import load_ground_truth
from ..generation import GenerationSettings, generate
from ..score import ranking
from .metrics import average_precision, recall_at_k

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from ..attribute import Attributor

SPLITS: dict[str, dict] = {
    "test": {"subjects": [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "white", "green")],
             "first_seed": 100},
    "tune": {"subjects": [("square", "green", "purple"), ("circle", "white", "orange"),
                          ("triangle", "blue", "yellow")],
             "first_seed": 500},
}


@dataclass(frozen=True)
class GroundTruthQuery:
    """One ground-truth query: a generation whose top-ranked training images should be its group's exemplars.

    Attributes:
        trigger: The group's trigger word; names the group whose exemplars are relevant.
        prompt: The generation's prompt.
        seed: The generation's seed.
    """
    trigger: str
    prompt: str
    seed: int


def queries_for(truth: dict, split: str = "test") -> list[GroundTruthQuery]:
    """The queries of one split: per group, its own ``prompts`` or the demo vocabulary's, with seeds
    counted up from the split's first seed (docs/method.md §14).

    Args:
        truth: The parsed ground_truth.json (``das_sd.data.ground_truth.load_ground_truth``).
        split: "test" (seeds from 100, the reported split) or "tune" (seeds from 500, for choosing settings).

    Returns:
        The queries, group by group in file order.

    Raises:
        ValueError: When ``split`` is not one of ``SPLITS``.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}")
    spec = SPLITS[split]
    out = []
    for group in truth["groups"]:
        prompts = group.get("prompts") or [f"{group['trigger']}, a {fg} {shape} on a {bg} background"
                                           for shape, fg, bg in spec["subjects"]]
        out += [GroundTruthQuery(group["trigger"], p, spec["first_seed"] + i) for i, p in enumerate(prompts)]
    return out


def generate_queries(pipe: StableDiffusionPipeline, data: str | Path, split: str = "test", steps: int = 25,
                     progress: bool = False) -> list[tuple[GroundTruthQuery, torch.Tensor]]:
    """The split's generations (final latents): what every store of the same model and LoRA is
    evaluated on, so an ablation generates them once.

    Args:
        pipe: The pipeline with the attributed LoRA loaded.
        data: Dataset folder holding ground_truth.json.
        split: "test" or "tune" (see ``queries_for``).
        steps: Denoising steps per generation (guidance is ``GenerationSettings``' default, 4.0).
        progress: Show a progress bar.

    Returns:
        ``(query, latents)`` per query; latents are the final latents, (1, 4, h/8, w/8).
    """
    queries = queries_for(load_ground_truth(data), split)
    return [(q, generate(pipe, GenerationSettings(prompt=q.prompt, seed=q.seed, steps=steps)).latents)
            for q in tqdm(queries, desc="generate", unit="query", disable=not progress)]


def evaluate_ground_truth(attributor: Attributor, data: str | Path, split: str = "test",
                          methods: list[str] | None = None, ks: tuple[int, ...] = (5, 10), steps: int = 25,
                          progress: bool = False,
                          generations: list[tuple[GroundTruthQuery, torch.Tensor]] | None = None) -> dict:
    """Recall@k and AP of each group's exemplars, per method, averaged over a split's queries (docs/method.md §14).

    Args:
        attributor: The attributor of the store under test; its pipeline generates the queries.
        data: Dataset folder holding ground_truth.json; its exemplar files must be rows of the store.
        split: "test" or "tune" (see ``queries_for``).
        methods: Methods to rank with; None means every method the store supports.
        ks: The k of each reported Recall@k.
        steps: Denoising steps when the queries are generated here.
        progress: Show a progress bar.
        generations: The split's queries already generated with this LoRA (``generate_queries``);
            None generates them.

    Returns:
        ``{"split", "queries": count, "groups": {trigger: exemplar count}, "chance_ap": mean |R| / N,
        "methods": {method: {"recall@k": ..., "ap": mAP}}, "ap_per_group": {method: {trigger: mAP}}}``,
        values rounded to 4 decimals.

    Raises:
        ValueError: When an exemplar file of a group is not a training row of the store, or (from
            ``load_ground_truth``) when ground_truth.json is malformed.
        FileNotFoundError: When ``data`` holds no ground_truth.json.
    """
    truth = load_ground_truth(data)
    key_of = {s.relpath: s.key for s in open_dataset(data)}
    stored = set(attributor.store.keys())
    methods = methods or attributor.methods
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    per_group: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    relevant_of = {}
    for group in truth["groups"]:
        missing = [f for f in group["files"] if f not in key_of or key_of[f] not in stored]
        if missing:
            raise ValueError(f"{Path(data) / 'ground_truth.json'}: {len(missing)} exemplar(s) of "
                             f"{group['trigger']!r} are not in the store, e.g. {missing[0]}")
        relevant_of[group["trigger"]] = {key_of[f] for f in group["files"]}
    if generations is None:
        generations = generate_queries(attributor.pipe, data, split, steps)
    for q, latents in tqdm(generations, desc="ground truth", unit="query", disable=not progress):
        features = attributor.query_features(latents, [q.prompt])
        for name in methods:
            score = ranking(name, attributor.scores(latents, [q.prompt], name, features))
            ranked = [attributor.rows[i].key for i in torch.argsort(score[0], descending=True).tolist()]
            relevant = relevant_of[q.trigger]
            metrics = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in ks}
            metrics["ap"] = average_precision(ranked, relevant)
            for key, value in metrics.items():
                rows[name].setdefault(key, []).append(value)
            per_group[name].setdefault(q.trigger, []).append(metrics["ap"])
    return {
        "split": split,
        "queries": len(generations),
        "groups": {t: len(r) for t, r in relevant_of.items()},
        "chance_ap": float(np.mean([len(r) for r in relevant_of.values()])) / len(attributor.rows),
        "methods": {m: {k: round(float(np.mean(v)), 4) for k, v in rows[m].items()} for m in methods},
        "ap_per_group": {m: {t: round(float(np.mean(v)), 4) for t, v in g.items()} for m, g in per_group.items()},
    }
