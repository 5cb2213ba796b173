"""The retraining side of LDS (docs/method.md §15): the M seeded random training subsets, the seed of
each retraining, the LoRAs retrained on them, and the run folder's plan.json that says which
retrained LoRAs a folder holds (so that a run resumes or grows, and refuses other settings).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io import atomic_write_json
from .lds_settings import LDSSettings
from .retrain import run_training_jobs, training_job

if TYPE_CHECKING:
    from ..attribute import Attributor
    from ..data.datasets import Dataset
    from ..lora_record import LoraRecipe


def draw_subsets(n: int, settings: LDSSettings) -> np.ndarray:
    """Draw the M random training subsets, seeded by ``settings.subset_seed``.

    Subset j is the same draw for any M > j, so a run can grow.

    Args:
        n: Number of training samples N.
        settings: Gives M (``subsets``), ``fraction`` and ``subset_seed``.

    Returns:
        (M, N) bool masks, each selecting round(fraction N) (at least 1) training samples.
    """
    rng = np.random.default_rng(settings.subset_seed)
    size = max(1, round(settings.fraction * n))
    masks = np.zeros((settings.subsets, n), dtype=bool)
    for j in range(settings.subsets):
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks


def subset_seed(recipe_seed: int, subset: int, repeat: int) -> int:
    """Training seed of one retraining: ``recipe_seed + 1000 subset + repeat`` (docs/method.md §15).

    Args:
        recipe_seed: The attributed LoRA's own training seed.
        subset: Subset index j.
        repeat: Repeat index r on that subset.

    Returns:
        The seed.
    """
    return recipe_seed + 1000 * subset + repeat


def retrain_subsets(base: Path, dataset: Dataset, masks: np.ndarray, recipe: LoraRecipe, workdir: Path,
                    repeats: int = 1, workers: int = 1, progress: bool = True,
                    ray_address: str | None = None) -> list[list[Path]]:
    """Retrain the LoRA on every subset and repeat (finished ones are kept, see ``run_training_jobs``).

    Args:
        base: Folder of the base model.
        dataset: The full training dataset, in store row order (the masks' columns).
        masks: (M, N) bool subset masks.
        recipe: The attributed LoRA's recipe; repeat r on subset j trains with ``subset_seed``.
        workdir: Run folder; LoRAs go to ``subset-JJJ/seed-R`` under it.
        repeats: LoRAs per subset.
        workers: Parallel trainings.
        progress: Show a progress bar.
        ray_address: Ray cluster to train on ("" for a local one); None: no Ray.

    Returns:
        The LoRA folders, ``[subset][repeat]``.
    """
    keys = dataset.keys
    jobs, folders = [], []
    for j, mask in enumerate(masks):
        row = []
        for r in range(repeats):
            out = workdir / f"subset-{j:03d}" / f"seed-{r}"
            jobs.append(training_job(base, dataset, [k for k, m in zip(keys, mask) if m], out, recipe,
                                     subset_seed(recipe.seed, j, r)))
            row.append(out)
        folders.append(row)
    run_training_jobs(jobs, workers, progress, ray_address)
    return folders


def retraining_plan(attributor: Attributor, recipe: LoraRecipe, settings: LDSSettings) -> dict:
    """What the retrained LoRAs of a run folder depend on: the subset rule, the recipe, the base model
    and the training rows. Not the store's featurizer settings, so that every store of the same
    fine-tune (ablations) is scored from the same retrained models; not M, so that a run can grow
    (subset j is the same draw for any M >= j + 1).

    Args:
        attributor: The attributor of the store (base fingerprint and training rows).
        recipe: The attributed LoRA's recipe.
        settings: Gives the subset rule (``fraction``, ``repeats``, ``subset_seed``).

    Returns:
        The plan as a JSON-ready dict, as it reads back from plan.json.
    """
    identity = attributor.store.identity
    return json.loads(json.dumps({
        "subsets": {"fraction": settings.fraction, "repeats": settings.repeats, "subset_seed": settings.subset_seed},
        "recipe": asdict(recipe), "base_fingerprint": identity["base_fingerprint"],
        "rows": attributor.store.keys_digest()}))  # as it reads back from plan.json


def check_retraining_plan(workdir: Path, plan: dict) -> None:
    """Refuse a run folder made for other retrained LoRAs, else create it and write its plan.json.

    Args:
        workdir: The run folder.
        plan: The run's plan (``retraining_plan``).

    Raises:
        ValueError: When ``workdir`` holds a plan.json that differs from ``plan`` (naming the fields).
    """
    plan_file = workdir / "plan.json"
    if plan_file.is_file():
        held = json.loads(plan_file.read_text())
        if held != plan:
            differs = sorted(k for k in set(held) | set(plan) if held.get(k) != plan.get(k))
            raise ValueError(f"{workdir}: holds an LDS run with other retraining settings ({', '.join(differs)} "
                             "differ); use another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, plan)
