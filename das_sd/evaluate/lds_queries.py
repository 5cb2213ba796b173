"""The queries of LDS: a named set of clean latents and prompts (held-out real images or the LoRA's
generations), and its seeded split into a tune part that chooses lambda and a reported part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .lds_settings import LDSSettings

if TYPE_CHECKING:
    from ..attribute import Attributor


@dataclass
class LDSQueries:
    """One set of LDS queries: clean latents and their prompts.

    Attributes:
        name: The set's name: "val" (held-out real images), "gen" (generations), or "<name>-tune" for
            the tune part of a set (``split_queries``).
        keys: One stable id per query; fixes its noise draws.
        latents: (Q, 4, h, w) the queries' clean latents.
        prompts: One prompt per query.
    """
    name: str  # "val" (held-out real images) or "gen" (generations)
    keys: list[str]  # stable ids: fix each query's noise draws
    latents: torch.Tensor  # (Q, 4, h, w)
    prompts: list[str]


def split_queries(queries: LDSQueries, settings: LDSSettings) -> tuple[LDSQueries | None, LDSQueries]:
    """Split a query set: a seeded ``tune_fraction`` of the queries chooses lambda, the rest is reported.

    A set of one query, or ``tune_fraction`` 0, is not split (no tune part); otherwise both parts
    keep at least one query.

    Args:
        queries: The query set.
        settings: Gives ``tune_fraction`` and ``split_seed``.

    Returns:
        ``(tune, report)``: the tune part (named "<name>-tune") or None, and the reported part (named
        as ``queries``), each in the original order.
    """
    n = len(queries.keys)
    n_tune = min(n - 1, max(1, int(n * settings.tune_fraction))) if n > 1 and settings.tune_fraction > 0 else 0
    if n_tune == 0:
        return None, queries
    order = np.random.default_rng(settings.split_seed).permutation(n)

    def take(name: str, idx: np.ndarray) -> LDSQueries:
        idx = sorted(idx.tolist())
        return LDSQueries(name, [queries.keys[i] for i in idx], queries.latents[idx], [queries.prompts[i] for i in idx])
    return take(f"{queries.name}-tune", order[:n_tune]), take(queries.name, order[n_tune:])


def val_queries(attributor: Attributor, data: str | Path, limit: int | None = None) -> LDSQueries:
    """Held-out real images (a dataset folder the LoRA was not trained on) as LDS queries.

    Args:
        attributor: The attributor whose pipeline encodes the images at the store's resolution.
        data: The held-out dataset folder; captions become the prompts.
        limit: Use only the first ``limit`` images; None (or 0) uses all.

    Returns:
        The "val" query set, keyed by sample key, latents on the CPU.

    Raises:
        ValueError: When any image of ``data`` is a training image of the store.
    """
    from ..data.datasets import open_dataset
    from ..latents import encode_images

    dataset = open_dataset(data)
    overlap = set(dataset.keys) & set(attributor.store.keys())
    if overlap:
        raise ValueError(f"--val {data}: {len(overlap)} image(s) are training images of the store; "
                         "val queries must be held out")
    samples = dataset.samples[:limit] if limit else dataset.samples
    latents = encode_images(attributor.pipe, dataset, attributor.resolution, samples=samples)
    return LDSQueries("val", [s.key for s in samples], latents.cpu(), [s.caption for s in samples])


def gen_queries(attributor: Attributor, prompts: list[str], seeds: int) -> LDSQueries:
    """Generations of the attributed LoRA (final latents, no VAE round trip) as LDS queries.

    Args:
        attributor: The attributor whose pipeline generates (default ``GenerationSettings``).
        prompts: The prompts.
        seeds: Generations per prompt, with seeds 0..seeds-1.

    Returns:
        The "gen" query set, keys ``gen-{prompt index}-{seed}``.
    """
    from ..generation import GenerationSettings, generate

    keys, latents, texts = [], [], []
    for p, prompt in enumerate(prompts):
        for seed in range(seeds):
            latents.append(generate(attributor.pipe, GenerationSettings(prompt=prompt, seed=seed)).latents)
            keys.append(f"gen-{p}-{seed}")
            texts.append(prompt)
    return LDSQueries("gen", keys, torch.cat(latents), texts)
