"""Featurize a dataset into a feature store: resumable, incremental, refusing a mismatched store.

A store holds several feature sets computed in one pass over the data, one per output function the
methods need (das: f = l1 with per-timestep normalisation and residual weights; dtrak: f = square;
trak: f = loss), plus each sample's latent for the latent-similarity baseline.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import Dataset
from ..latents import encode_images, encode_prompts, native_resolution
from ..models.fingerprint import lora_fingerprint, model_fingerprint
from ..models.probe import pipeline_probes
from ..store import FeatureStore
from .featurizer import Featurizer, alphas_cumprod_of, features_together
from .gradients import num_lora_parameters
from .plan import default_feature_sets, part_work, rows_of, whole_work
from .settings import FeaturizerSettings


def store_identity(pipe, base_path: Path, lora_path: Path, feature_sets: dict[str, FeaturizerSettings],
                   resolution: int, autocast_dtype: torch.dtype | None = None) -> dict:
    """Everything a stored feature depends on; a store opened with a different identity is refused."""
    num_train = len(alphas_cumprod_of(pipe))
    return {
        "base_fingerprint": model_fingerprint(base_path),
        "lora_fingerprint": lora_fingerprint(lora_path),
        "lora_parameters": num_lora_parameters(pipe.unet),
        "resolution": resolution,
        "compute_dtype": str(autocast_dtype or torch.float32).removeprefix("torch."),
        "store_dtype": "float32",
        "feature_sets": {
            name: s.to_dict() | {"timesteps": s.feature_timesteps(num_train)} for name, s in feature_sets.items()
        },
    }


def featurize_dataset(pipe, dataset: Dataset, store_dir: str | Path, base_path: Path, lora_path: Path,
                      feature_sets: dict[str, FeaturizerSettings] | None = None, batch_size: int = 16,
                      shard_size: int = 256, resolution: int | None = None, progress: bool = True,
                      autocast_dtype: torch.dtype | None = None, on_shard=None,
                      part: tuple[int, int] | None = None) -> FeatureStore:
    """Compute the features of every dataset sample missing from the store and append them.

    With ``part = (i, n)`` only every n-th block of the work (blocks i, i + n, ...) is done, into the
    partial store ``STORE/parts/part-i-of-n`` (see ``das_sd.featurize.parallel``); the parts are
    merged afterwards into a store identical to one built in a single process.
    """
    feature_sets = feature_sets or default_feature_sets()
    resolution = resolution or native_resolution(pipe)
    identity = store_identity(pipe, base_path, lora_path, feature_sets, resolution, autocast_dtype)
    info = {"das_sd_version": __version__, "base_path": str(base_path), "lora_path": str(lora_path),
            "dataset_root": str(dataset.root), "dataset_format": dataset.format}
    if part is not None:
        store, plan = part_work(store_dir, identity, info, dataset, shard_size, part)
    else:
        store, plan = whole_work(store_dir, identity, info, dataset, shard_size)
    if "probes" not in store.manifest:  # lets a host's own pipeline be checked against the store
        store.manifest["probes"] = pipeline_probes(pipe)
    featurizers = {name: Featurizer(pipe, s, autocast_dtype) for name, s in feature_sets.items()}
    by_key = dataset.by_key()
    todo = sum(len(block) for _, block in plan)
    bar = tqdm(total=todo, desc="featurize", unit="img", disable=not progress or todo == 0)
    start = time.time()
    for number, block in plan:
        samples = [by_key[r.key] for r in block]
        arrays = featurize_samples(pipe, dataset, samples, featurizers, resolution, batch_size, bar)
        store.append_shard(block, arrays, extra={"block": number} if part is not None else None)
        if on_shard is not None:
            on_shard(store)
    bar.close()
    store.manifest["info"]["last_run"] = {"samples": todo, "seconds": round(time.time() - start, 2)}
    store.mark_complete(not store.missing(rows_of(dataset)) if part is None else True)
    return store


def featurize_samples(pipe, dataset: Dataset, samples, featurizers: dict[str, Featurizer], resolution: int,
                      batch_size: int, bar=None) -> dict[str, torch.Tensor]:
    """Arrays of one shard: latents, and features + residuals per feature set."""
    latents = encode_images(pipe, dataset, resolution, samples=samples)
    cond = encode_prompts(pipe, [s.caption for s in samples])
    keys = [s.key for s in samples]
    parts: dict[str, list[torch.Tensor]] = {"latents": [latents.cpu()]}
    for i in range(0, len(samples), batch_size):
        sl = slice(i, i + batch_size)
        features = features_together(list(featurizers.values()), latents[sl], cond[sl], keys[sl])
        for (name, featurizer), phi in zip(featurizers.items(), features):
            parts.setdefault(f"features.{name}", []).append(phi.cpu())
            parts.setdefault(f"residuals.{name}", []).append(featurizer.residuals(latents[sl], cond[sl], keys[sl]).cpu())
        if bar is not None:
            bar.update(len(keys[sl]))
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
