"""Featurize a dataset into a feature store: resumable, incremental, refusing a mismatched store.

A store holds several feature sets computed in one pass over the data, one per output function the
methods need (das: f = l1 with per-timestep normalisation and residual weights; dtrak: f = square;
trak: f = loss), plus each sample's latent for the latent-similarity baseline.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import Dataset
from ..conditioning import Conditioning, model_family, size_time_ids
from ..latents import encode_images, encode_prompts, native_resolution
from ..lora_record import read_record
from ..models.fingerprint import lora_fingerprint, model_fingerprint
from ..models.loading import ModelError
from ..data.buckets import BucketSpec, default_buckets, kohya_buckets
from ..models.lora_files import kohya_training_resolution, lora_metadata
from ..registry import check_choice
from ..models.probe import pipeline_probes
from ..noising import prediction_type
from ..store import FeatureStore
from .featurizer import Featurizer, alphas_cumprod_of, features_and_residuals
from .lora_layers import lora_inventory, num_lora_parameters
from .plan import default_feature_sets, part_work, rows_of, whole_work
from .settings import FeaturizerSettings

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import StableDiffusionPipeline

    from ..data.datasets import Sample


def store_identity(pipe: StableDiffusionPipeline, base_path: Path, lora_path: Path,
                   feature_sets: dict[str, FeaturizerSettings], resolution: int,
                   autocast_dtype: torch.dtype | None = None) -> dict:
    """Everything a stored feature depends on; a store opened with a different identity is refused.

    Args:
        pipe: The base pipeline with the LoRA loaded.
        base_path: The base pipeline folder (fingerprinted).
        lora_path: The LoRA file (fingerprinted).
        feature_sets: Feature set name -> settings.
        resolution: Image side in pixels the latents are encoded at.
        autocast_dtype: The featurizing autocast dtype; None for float32.

    Returns:
        The identity: base and LoRA fingerprints, p, resolution, compute and store dtypes, the
        model family ("sd" / "sdxl", ``das_sd.conditioning``), the scheduler's prediction type (the target of f = loss and the residuals, docs/method.md §2),
        and per feature set its settings with the resolved timesteps.

    Raises:
        ValueError: When the base folder or the LoRA file cannot be read, or the UNet has no LoRA.
        ModelError: When the scheduler's prediction type is not one das-sd supports.
        FileNotFoundError: When the LoRA file does not exist.
    """
    num_train = len(alphas_cumprod_of(pipe))
    return {
        "base_fingerprint": model_fingerprint(base_path),
        "lora_fingerprint": lora_fingerprint(lora_path),
        "lora_parameters": num_lora_parameters(pipe.unet),
        "resolution": resolution,
        "compute_dtype": str(autocast_dtype or torch.float32).removeprefix("torch."),
        "store_dtype": "float32",
        "prediction_type": prediction_type(pipe),
        "model_family": model_family(pipe),
        "feature_sets": {
            name: s.to_dict() | {"timesteps": s.feature_timesteps(num_train)} for name, s in feature_sets.items()
        },
    }


def training_resolution(lora_path: Path) -> int | None:
    """The square image side a LoRA was trained at, when its files say so.

    das-sd's own record beside the file gives its recipe's resolution (None there: the model's
    native one); kohya's ``ss_resolution`` header gives (w, h), and a non-square w x h (bucketed
    training) the side of a square of the same area, a multiple of 8: das-sd featurizes every image
    center-cropped to one square (docs/method.md §2).

    Args:
        lora_path: The LoRA file.

    Returns:
        The side in pixels, or None when nothing records it.
    """
    record = read_record(lora_path)
    if record is not None:
        side = (record.get("recipe") or {}).get("resolution")
        return int(side) if side else None
    size = kohya_training_resolution(lora_path) if Path(lora_path).is_file() else None
    if size is None:
        return None
    return size[0] if size[0] == size[1] else 8 * round(math.sqrt(size[0] * size[1]) / 8)


def bucket_spec(mode: str, pipe: StableDiffusionPipeline, lora_path: Path, resolution: int) -> BucketSpec | None:
    """The aspect-ratio buckets to featurize with (docs/method.md §2).

    Args:
        mode: "auto": the buckets a kohya LoRA file records (``ss_enable_bucket``), else none; "on":
            those, else kohya's defaults scaled to ``resolution``; "off": none.
        pipe: The pipeline (its VAE factor and UNet depth fix the bucket step: 64 px for SD).
        lora_path: The LoRA file.
        resolution: The square side the featurization works at.

    Returns:
        The spec, or None for no buckets.

    Raises:
        ValueError: When ``mode`` is unknown or the file's bucket entries describe impossible buckets.
    """
    check_choice("--buckets", mode, ("auto", "on", "off"))
    if mode == "off":
        return None
    step = int(pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1))
    recorded = kohya_buckets(lora_metadata(lora_path), step) if Path(lora_path).is_file() else None
    if recorded is not None or mode == "auto":
        return recorded
    return default_buckets(resolution, step)


def lora_accounting(pipe: StableDiffusionPipeline, lora_path: Path, allow_partial: bool = False) -> dict:
    """What the store will differentiate of the UNet's LoRA, refused when that is not all of it.

    Args:
        pipe: The base pipeline with the LoRA loaded.
        lora_path: The LoRA file (named in the refusal).
        allow_partial: Accept a LoRA with parameters das-sd cannot differentiate.

    Returns:
        ``LoraInventory.record()``: parameters differentiated and left out, by kind.

    Raises:
        ModelError: When parameters would be left out and not ``allow_partial``.
        ValueError: When the UNet has no LoRA layer das-sd can differentiate.
    """
    inventory = lora_inventory(pipe.unet)
    if inventory.left_out and not allow_partial:
        raise ModelError(f"{lora_path}: {inventory.left_out_message()}. Attributing this LoRA would leave "
                         "them out: pass --allow-partial to attribute over the differentiated part only "
                         "(recorded in the store and shown with every attribution)")
    return inventory.record()


def featurize_dataset(pipe: StableDiffusionPipeline, dataset: Dataset, store_dir: str | Path, base_path: Path,
                      lora_path: Path, feature_sets: dict[str, FeaturizerSettings] | None = None, batch_size: int = 16,
                      shard_size: int = 256, resolution: int | None = None, progress: bool = True,
                      autocast_dtype: torch.dtype | None = None,
                      on_shard: Callable[[FeatureStore], None] | None = None,
                      part: tuple[int, int] | None = None, allow_partial: bool = False,
                      max_memory: int | None = None, buckets: str = "auto") -> FeatureStore:
    """Compute the features of every dataset sample missing from the store and append them.

    With ``part = (i, n)`` only every n-th block of the work (blocks i, i + n, ...) is done, into the
    partial store ``STORE/parts/part-i-of-n`` (see ``das_sd.featurize.parallel``); the parts are
    merged afterwards into a store identical to one built in a single process.

    Args:
        pipe: The base pipeline with the LoRA trained on ``dataset`` loaded.
        dataset: The training dataset.
        store_dir: Folder of the feature store, created or resumed.
        base_path: The base pipeline folder, for the store identity.
        lora_path: The LoRA file, for the store identity.
        feature_sets: Feature set name -> settings; None: ``default_feature_sets()``.
        batch_size: Samples per forward / backward pass (each takes K rows).
        shard_size: Samples per shard (a new store's; an existing store keeps its own).
        resolution: Image side in pixels; None: the LoRA's training resolution when its files
            record it (``training_resolution``), else the model's native resolution.
        progress: Show a tqdm bar.
        autocast_dtype: Run the UNet under autocast to this dtype; None for float32.
        on_shard: Called with the store after each shard is written.
        part: (I, N) to do only part I of N; None for all the work.
        allow_partial: Featurize over the LoRA parameters das-sd can differentiate when the LoRA
            also has others (DoRA magnitudes, LoRA biases, ...); they are recorded as left out in
            the manifest's ``info.lora_parameters``. False refuses such a LoRA.
        max_memory: Bytes one forward / backward pass may take (``Featurizer``); None: most of
            what the device has free. Changes how rows are cut into passes, not the features.
        buckets: "auto" (aspect-ratio buckets when the LoRA file says kohya trained with them),
            "on" (those, else kohya's defaults scaled to the resolution) or "off" (every image at
            the resolution square); see ``bucket_spec``.

    Returns:
        The store (or the part's partial store), marked complete when it holds every sample.

    Raises:
        ModelError: When the LoRA has parameters das-sd cannot differentiate and not ``allow_partial``.
        StoreError: When the store (or part) has another identity or holds samples no longer in
            ``dataset``.
    """
    feature_sets = feature_sets or default_feature_sets()
    accounting = lora_accounting(pipe, lora_path, allow_partial)
    resolution = resolution or training_resolution(lora_path) or native_resolution(pipe)
    spec = bucket_spec(buckets, pipe, lora_path, resolution)
    identity = store_identity(pipe, base_path, lora_path, feature_sets, resolution, autocast_dtype)
    identity["buckets"] = spec.to_dict() if spec else None
    info = {"das_sd_version": __version__, "base_path": str(base_path), "lora_path": str(lora_path),
            "dataset_root": str(dataset.root), "dataset_format": dataset.format, "lora_parameters": accounting}
    if part is not None:
        store, plan = part_work(store_dir, identity, info, dataset, shard_size, part)
    else:
        store, plan = whole_work(store_dir, identity, info, dataset, shard_size)
    if "probes" not in store.manifest:  # lets a host's own pipeline be checked against the store
        store.manifest["probes"] = pipeline_probes(pipe)
    featurizers = {name: Featurizer(pipe, s, autocast_dtype, max_memory) for name, s in feature_sets.items()}
    by_key = dataset.by_key()
    todo = sum(len(block) for _, block in plan)
    bar = tqdm(total=todo, desc="featurize", unit="img", disable=not progress or todo == 0)
    start = time.time()
    for number, block in plan:
        samples = [by_key[r.key] for r in block]
        arrays = featurize_samples(pipe, dataset, samples, featurizers, resolution, batch_size, bar, spec)
        store.append_shard(block, arrays, extra={"block": number} if part is not None else None)
        if on_shard is not None:
            on_shard(store)
    bar.close()
    store.manifest["info"]["last_run"] = {"samples": todo, "seconds": round(time.time() - start, 2)}
    store.mark_complete(not store.missing(rows_of(dataset)) if part is None else True)
    return store


def featurize_samples(pipe: StableDiffusionPipeline, dataset: Dataset, samples: list[Sample],
                      featurizers: dict[str, Featurizer], resolution: int,
                      batch_size: int, bar: tqdm | None = None, buckets: BucketSpec | None = None
                      ) -> dict[str, torch.Tensor]:
    """Arrays of one shard: latents, and features + residuals per feature set.

    Args:
        pipe: The base pipeline with the LoRA loaded.
        dataset: The dataset the samples come from (their images are read through it).
        samples: The shard's samples, in order.
        featurizers: Feature set name -> featurizer.
        resolution: Image side in pixels the latents are encoded at.
        batch_size: Samples per forward / backward pass.
        bar: Progress bar advanced by the samples done; None for none.
        buckets: Featurize each image in its aspect-ratio bucket (``data.buckets``); None: all at
            the ``resolution`` square.

    Returns:
        On the CPU, one row per sample: "latents" (n, C, H, W), and per feature set NAME
        "features.NAME" (n, k) and "residuals.NAME" (n,).
    """
    budget = next(iter(featurizers.values())).max_memory
    latents = encode_images(pipe, dataset, resolution, samples=samples, max_memory=budget)
    cond = encode_prompts(pipe, [s.caption for s in samples])
    keys = [s.key for s in samples]
    sdxl = isinstance(cond, Conditioning)
    # sizes after EXIF rotation, as trained: they pick the bucket and SDXL's size conditioning
    sizes = [dataset.load_image(s).size for s in samples] if buckets is not None or sdxl else []
    # the latents a store keeps (latent similarity, duplicate signals) are the square crops; the
    # features of a bucketed store come from each image in its bucket, as it was trained
    groups = {None: list(range(len(samples)))} if buckets is None else buckets_of(sizes, buckets)
    arrays: dict[str, list[torch.Tensor | None]] = {}
    for bucket, members in groups.items():
        x0 = latents[members] if bucket is None else encode_images(
            pipe, dataset, resolution, samples=[samples[i] for i in members], max_memory=budget, bucket=bucket)
        group_cond = cond[members]
        if sdxl:
            group_cond = group_cond.with_time_ids(size_time_ids([sizes[i] for i in members],
                                                                bucket or (resolution, resolution)))
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            sl = slice(start, start + len(rows))
            features, residuals = features_and_residuals(list(featurizers.values()), x0[sl], group_cond[sl],
                                                         [keys[i] for i in rows])
            for name, phi, e in zip(featurizers, features, residuals):
                for out, values in ((f"features.{name}", phi.cpu()), (f"residuals.{name}", e)):
                    column = arrays.setdefault(out, [None] * len(samples))
                    for j, i in enumerate(rows):
                        column[i] = values[j]
            if bar is not None:
                bar.update(len(rows))
    return {"latents": latents.cpu()} | {name: torch.stack(column) for name, column in arrays.items()}


def buckets_of(sizes: list[tuple[int, int]], spec: BucketSpec) -> dict[tuple[int, int], list[int]]:
    """The samples of each bucket, by position.

    Args:
        sizes: Each sample's image (width, height), after EXIF rotation (as trained).
        spec: The buckets.

    Returns:
        Bucket (width, height) -> positions, buckets in order of first appearance.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(spec.bucket_of(size), []).append(i)
    return groups
