"""Counterfactual removal (docs/method.md §16): remove a method's top-k training images, retrain,
regenerate with the same seed, and see how far the generation moves.

For every sampled generation (prompt, seed) of the attributed LoRA and every method, the k
highest-ranked training images are removed and the LoRA is retrained on the rest with the attributed
LoRA's own recipe and seed; the generation is redone with the same prompt and seed, and its distance
to the original is measured in pixels (RMS over RGB in [0, 1]) and in latents (L2 of the final
latents). A method whose top-k matter more moves the generation further. Controls: k images removed
at random (seeded per generation and draw), and the full set retrained (the retraining's own noise
floor, which is 0 when training is deterministic). Medians over generations per method.

Retrained LoRAs and per-generation results are cached under the run folder: a rerun resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..io import atomic_write_json
from ..registry import GRADIENT_METHOD_NAMES
from .retrain import attributed_recipe_and_data, run_training_jobs, training_job

if TYPE_CHECKING:
    from ..attribute import Attributor

RANDOM = "random"
FULL = "full set (retraining noise)"


@dataclass
class CounterfactualSettings:
    """Settings of a counterfactual-removal run (docs/method.md §16).

    Attributes:
        top_k: Training images removed per method (and per random control).
        random_draws: Random-removal controls per generation.
        random_seed: Seed of the random removals (with the generation and draw index).
        steps: Denoising steps of each generation.
        guidance: Classifier-free guidance scale of each generation.
    """
    top_k: int = 10
    random_draws: int = 1  # random-removal controls per generation
    random_seed: int = 0
    steps: int = 25  # generation settings: the demo defaults
    guidance: float = 4.0


def removal_sets(attributor: Attributor, prompt: str, seed: int, latents: torch.Tensor, methods: list[str],
                 settings: CounterfactualSettings, generation: int) -> dict[str, list[str]]:
    """Training keys to remove, per method and per random control, for one generation.

    Args:
        attributor: The attributor of the store under test.
        prompt: The generation's prompt.
        seed: The generation's seed (not used: the random draws are seeded by ``generation``).
        latents: (1, 4, h, w) the generation's final latents.
        methods: Methods whose top-k are removed.
        settings: Gives ``top_k``, ``random_draws`` and ``random_seed``.
        generation: Index of the generation in the run; seeds its random draws.

    Returns:
        ``{method: its top-k keys, "random-<d>": k random keys (sorted), FULL: []}``.
    """
    keys = attributor.store.keys()
    out = {}
    features = attributor.query_features(latents, [prompt])
    for name in methods:
        top = attributor.attribute_latents(latents, [prompt], name, settings.top_k, features=features)[0]
        out[name] = [r.key for r in top.results]
    for d in range(settings.random_draws):
        rng = np.random.default_rng([settings.random_seed, generation, d])
        out[f"{RANDOM}-{d}"] = sorted(keys[i] for i in rng.choice(len(keys), settings.top_k, replace=False))
    out[FULL] = []
    return out


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).flatten().norm())


def run_counterfactual(attributor: Attributor, workdir: str | Path, prompts: list[str], seeds: int,
                       settings: CounterfactualSettings, methods: list[str] | None = None, workers: int = 1,
                       progress: bool = True, ray_address: str | None = None) -> dict:
    """Retrain without each method's top-k for every generation, regenerate, and measure how far each
    generation moved; results also go to workdir/counterfactual.json (docs/method.md §16).

    Args:
        attributor: The attributor of the store under test; its LoRA needs a lora_record.json.
        workdir: Run folder: plan.json, retrained LoRAs and per-generation distances (resumable).
        prompts: Prompts of the generations.
        seeds: Generations per prompt, with seeds 0..seeds-1.
        settings: The run's settings.
        methods: Methods to test; None means the store's gradient methods.
        workers: Parallel trainings.
        progress: Show progress bars.
        ray_address: Ray cluster to train on ("" for a local one); None: no Ray.

    Returns:
        The summary of ``summarize``.

    Raises:
        ValueError: When ``workdir`` holds a run with other settings (or, from
            ``attributed_recipe_and_data``, when the LoRA's recipe or dataset cannot be recovered).
    """
    from ..generation import GenerationSettings, generate
    from ..models.loading import load_lora, load_pipeline

    workdir = Path(workdir)
    recipe, dataset = attributed_recipe_and_data(attributor)
    methods = methods or [m for m in attributor.methods if m in GRADIENT_METHOD_NAMES]
    plan = json.loads(json.dumps({"settings": asdict(settings), "recipe": asdict(recipe), "prompts": prompts,
                                  "seeds": seeds, "methods": methods, "store_id": attributor.store.store_id}))
    plan_file = workdir / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise ValueError(f"{workdir}: holds a counterfactual run with other settings; use another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, plan)

    generations, jobs = [], []
    for p, prompt in enumerate(prompts):
        for seed in range(seeds):
            index = len(generations)
            gen = GenerationSettings(prompt=prompt, seed=seed, steps=settings.steps, guidance=settings.guidance)
            original = generate(attributor.pipe, gen)
            removed = removal_sets(attributor, prompt, seed, original.latents, methods, settings, index)
            folders = {}
            for name, keys in removed.items():
                # the full set is the same job for every generation: trained once
                out = workdir / "full" if name == FULL else workdir / f"gen-{index:03d}" / _folder(name)
                gone = set(keys)
                if name != FULL or index == 0:
                    jobs.append(training_job(attributor.base_path, dataset,
                                             [k for k in dataset.keys if k not in gone], out, recipe, recipe.seed))
                folders[name] = out
            generations.append({"prompt": prompt, "seed": seed, "settings": gen, "original": original,
                                "removed": removed, "folders": folders})
    run_training_jobs(jobs, workers, progress, ray_address, desc="retrain without top-k")

    pipe = load_pipeline(attributor.base_path, device=attributor.pipe.unet.device)
    rows = []
    for g in generations:
        result_file = workdir / f"gen-{len(rows):03d}" / "distances.json"
        if result_file.is_file():
            rows.append(json.loads(result_file.read_text()))
            continue
        row = {"prompt": g["prompt"], "seed": g["seed"], "removed": g["removed"], "pixel": {}, "latent": {}}
        original_pixels = torch.from_numpy(np.asarray(g["original"].images[0], dtype=np.float32) / 255.0)
        for name, folder in g["folders"].items():
            load_lora(pipe, folder, adapter_name="counterfactual")
            try:
                again = generate(pipe, g["settings"])
            finally:
                pipe.delete_adapters("counterfactual")
            pixels = torch.from_numpy(np.asarray(again.images[0], dtype=np.float32) / 255.0)
            row["pixel"][name] = _distance(pixels, original_pixels) / original_pixels.numel() ** 0.5
            row["latent"][name] = _distance(again.latents, g["original"].latents)
        atomic_write_json(result_file, row)
        rows.append(row)
    return summarize(rows, methods, settings, plan, workdir)


def _folder(name: str) -> str:
    return name.replace(" ", "_")


def summarize(rows: list[dict], methods: list[str], settings: CounterfactualSettings, plan: dict,
              workdir: Path) -> dict:
    """Median pixel and latent distances per method; random draws pooled into one control. Also written
    to workdir/counterfactual.json.

    Args:
        rows: Per generation, ``{"prompt", "seed", "removed", "pixel": {name: distance}, "latent": {...}}``.
        methods: The methods tested.
        settings: Gives ``top_k`` and ``random_draws``.
        plan: The run's plan (as in plan.json).
        workdir: Run folder.

    Returns:
        ``{"plan", "generations", "top_k", "median": {method, "random (control)", FULL: {"pixel", "latent"}},
        "per_generation": rows}``; pixel distances are RMS over RGB in [0, 1], latent ones L2.
    """
    def medians(kind: str, names: list[str]) -> float:
        return float(np.median([r[kind][n] for r in rows for n in names]))
    randoms = [f"{RANDOM}-{d}" for d in range(settings.random_draws)]
    table = {name: {"pixel": medians("pixel", [name]), "latent": medians("latent", [name])} for name in methods}
    table[f"{RANDOM} (control)"] = {"pixel": medians("pixel", randoms), "latent": medians("latent", randoms)}
    table[FULL] = {"pixel": medians("pixel", [FULL]), "latent": medians("latent", [FULL])}
    results = {"plan": plan, "generations": len(rows), "top_k": settings.top_k, "median": table, "per_generation": rows}
    atomic_write_json(workdir / "counterfactual.json", results)
    return results
