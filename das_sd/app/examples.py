"""Example prompts the app offers before anything is typed: prompts the LoRA was trained on.

A LoRA answers to the words of its training captions (its trigger words above all), so the examples
come from the store's own data: with a ``ground_truth.json`` beside the dataset (the demo's planted
trigger words), one training caption per trigger word; otherwise a few training captions spread over
the store. No model is loaded: the captions are read from the store's manifest (or the dataset's
metadata while the store is not built yet).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.ground_truth import load_ground_truth
from ..store import FeatureStore, StoreError

EXAMPLES = 6  # few enough to read at a glance
log = logging.getLogger("das_sd.app")


def pick_examples(captions: list[str], triggers: list[str] | None = None, count: int = EXAMPLES) -> list[str]:
    """Example prompts from training captions: one per trigger word, else captions spread evenly.

    Args:
        captions: The training captions, in store order.
        triggers: Trigger words of the LoRA (ground truth); None or empty: none known.
        count: Most examples returned.

    Returns:
        Up to ``count`` distinct, non-blank captions: for each trigger word (in order) the first caption
        holding it as a comma-separated tag; without triggers (or captions holding them), captions at
        evenly spaced store positions.
    """
    captions = [c.strip() for c in captions if c and c.strip()]
    picked: list[str] = []
    for trigger in triggers or []:
        hit = next((c for c in captions if trigger in (t.strip() for t in c.split(","))), None)
        if hit and hit not in picked:
            picked.append(hit)
    if picked:
        return picked[:count]
    distinct = list(dict.fromkeys(captions))
    if len(distinct) <= count:
        return distinct
    return [distinct[i * len(distinct) // count] for i in range(count)]


def example_prompts(store: str | Path, dataset_root: str | Path | None, count: int = EXAMPLES) -> list[str]:
    """The app's example prompts for a store (see ``pick_examples``).

    Args:
        store: The feature store folder; its manifest holds the training captions.
        dataset_root: The dataset folder (for ``ground_truth.json``, and its captions while the
            store does not exist yet); None: not known.
        count: Most examples returned.

    Returns:
        The example prompts; empty when neither the store nor the dataset can be read (the app then
        shows none, and says so in the server log).
    """
    triggers = None
    if dataset_root is not None:
        try:
            triggers = [g["trigger"] for g in load_ground_truth(dataset_root)["groups"] if g.get("trigger")]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            triggers = None  # a dataset without planted truth: the usual case
    try:
        captions = [row.caption for row in FeatureStore.open(store).rows()]
    except StoreError:
        captions = []
    if not captions and dataset_root is not None:
        from ..data.datasets import DatasetError, open_dataset

        try:
            captions = [s.caption for s in open_dataset(dataset_root).samples]
        except (DatasetError, OSError, ValueError) as exc:
            log.warning("no example prompts: %s", exc)
    return pick_examples(captions, triggers, count)
