"""Building a feature store, in one place for the CLI, the app and the demo: featurize a dataset into
the store (resuming whatever an earlier run left), then index every feature set whose index is stale,
as one generation.

Callers show progress their own way: ``progress`` turns the tqdm bars on (the app's gr.Progress
tracks them), and ``notify`` receives the sentences a user should read (the stage being run, bad
samples skipped, a slow autocast); None drops them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.datasets import Dataset
from ..io import printable
from ..registry import INDEX_DTYPES, check_choice
from ..score import LambdaRule, build_indexes, refresh_indexes
from ..store import FeatureStore
from ..store_manifest import MANIFEST
from .build import featurize_dataset
from .plan import FeaturizeJob, autocast_dtype, parse_part
from .settings import FeaturizerSettings

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

Notify = Callable[[str], None]


def _say(notify: Notify | None, message: str) -> None:
    if notify is not None:
        notify(message)


def load_model(base: str | Path | None, lora: str | Path, device: str | None = None) -> StableDiffusionPipeline:
    """The base pipeline with the LoRA whose training set is featurized.

    Args:
        base: Base pipeline folder; None or "embedded" for the embedded tiny SD.
        lora: LoRA file or folder (diffusers, peft or kohya safetensors).
        device: Torch device name; None for CUDA when available, else the CPU.

    Returns:
        The pipeline, on ``device``, with the LoRA loaded as adapter "default".

    Raises:
        ModelError: When the base folder or the LoRA cannot be loaded (see ``models.loading``).
    """
    from ..models.loading import load_lora, load_pipeline

    pipe = load_pipeline(base, device=device)
    load_lora(pipe, lora)
    return pipe


def build_store(dataset: Dataset, store_dir: str | Path, base: Path, lora: Path,
                feature_sets: dict[str, FeaturizerSettings] | None = None, *,
                pipe: StableDiffusionPipeline | None = None,
                reuse_complete: bool = False, rule: LambdaRule | None = None, progress: bool = True,
                notify: Notify | None = None) -> FeatureStore:
    """Featurize the samples of ``dataset`` the store lacks (all of them for a new store, the rest of
    an interrupted one), then index every feature set whose index is missing or stale.

    ``pipe``: the base + LoRA pipeline, when the caller has it loaded (else it is loaded here, only
    if there is something to featurize). ``reuse_complete``: a store marked complete is indexed as
    it is, without loading the model or checking it against ``dataset`` (a cache whose identity
    the caller has checked, as the demo does).

    Args:
        dataset: The training dataset.
        store_dir: Folder of the feature store, created or resumed.
        base: The base pipeline folder.
        lora: The LoRA file trained on ``dataset``.
        feature_sets: Feature set name -> settings; None: das, dtrak and trak with default settings.
        pipe: The base + LoRA pipeline, when the caller has it loaded.
        reuse_complete: Index a store marked complete as it is (see above).
        rule: The lambda rule of the indexes; None: the default rho.
        progress: Show the tqdm bars.
        notify: Receives the stage being run; None drops it.

    Returns:
        The featurized and indexed store.

    Raises:
        StoreError: When an existing store has another identity or holds samples no longer in
            ``dataset``.
    """
    store = None
    if reuse_complete and (Path(store_dir) / MANIFEST).is_file():
        store = FeatureStore.open(store_dir)
        store = store if store.manifest.get("complete") else None
    if store is None:
        _say(notify, f"featurizing {len(dataset)} training images into {store_dir}")
        pipe = pipe if pipe is not None else load_model(base, lora)
        store = featurize_dataset(pipe, dataset, store_dir, base, lora, feature_sets, progress=progress)
    _say(notify, "indexing the feature store")
    refresh_indexes(store, rule)
    return store


def check_autocast(name: str, device: str | None, notify: Notify | None = None) -> torch.dtype | None:
    """The autocast dtype of ``--autocast name`` on ``device``, refused where it is not offered.

    Args:
        name: The --autocast flag: "fp32", "fp16" or "bf16".
        device: Torch device name; None for the default device (CUDA when available).
        notify: Receives a warning when bfloat16 would be emulated (slower) on this CPU.

    Returns:
        None for fp32 (no autocast), else the dtype.

    Raises:
        ValueError: When ``name`` is unknown, or is fp16 on a device other than CUDA.
    """
    from ..models.loading import default_device
    from .featurizer import autocast_supported, cpu_has_fast_bfloat16

    dtype = autocast_dtype(name)
    kind = torch.device(device or default_device())
    if not autocast_supported(dtype, kind):
        raise ValueError(f"--autocast {name} is for CUDA devices; on {kind.type} use bf16 "
                         "(fast where the CPU has AVX-512 BF16 or AMX) or fp32")
    if dtype is not None and kind.type == "cpu" and not cpu_has_fast_bfloat16():
        _say(notify, f"warning: this CPU has neither AVX-512 BF16 nor AMX: --autocast {name} will be slower than fp32")
    return dtype


def open_job_dataset(job: FeaturizeJob, notify: Notify | None = None) -> Dataset:
    """The job's dataset; the bad samples it skipped (``skip_bad``) are listed through ``notify``.

    Args:
        job: The featurization job.
        notify: Receives the list of skipped samples; None drops it.

    Returns:
        The opened dataset.

    Raises:
        DatasetError: When the dataset cannot be read (or has a bad sample without ``skip_bad``).
    """
    dataset = job.open_dataset()
    if dataset.skipped:
        _say(notify, "\n".join([f"skipped {len(dataset.skipped)} bad sample(s):"]
                               + [f"  {printable(item)}" for item in dataset.skipped]))
    return dataset


def featurize(job: FeaturizeJob, *, shard: str | None = None, merge: bool = False, ray: str | None = None,
              ray_workers: int | None = None, progress: bool = True, notify: Notify | None = None) -> FeatureStore:
    """`das-sd featurize`: compute the features ``job.store`` lacks in this process; or only part
    ``shard`` ('I/N') of them; or spread the parts over a Ray cluster (``ray``: its address, '' for a
    local one) and merge them; or ``merge`` the finished parts. Indexing is ``index_store``'s.

    Args:
        job: The featurization job.
        shard: 'I/N' to compute only part I of N (``--shard``); None for all the work.
        merge: Merge the finished parts into ``job.store`` instead of computing (``--merge``).
        ray: Address of a Ray cluster to run the parts on, '' for a local one; None: no Ray.
        ray_workers: Number of Ray parts; None: one per GPU (else CPU) of the cluster.
        progress: Show the tqdm bars.
        notify: Receives skipped samples and warnings; None drops them.

    Returns:
        The store (for ``shard``: the part's partial store).

    Raises:
        ValueError: When more than one of ``shard``, ``merge`` and ``ray`` is given, ``shard`` or
            ``job.autocast`` is invalid, ``job.lora`` is None (except for ``merge``), or
            ``job.sets`` names no or unknown feature sets.
    """
    modes = [flag for flag, on in (("--shard", shard is not None), ("--merge", merge), ("--ray", ray is not None)) if on]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} exclude each other: give one of them")
    if merge:  # the parts carry the model, settings and identity
        from .parallel import merge_parts

        return merge_parts(job.store, open_job_dataset(job, notify))
    part = parse_part(shard) if shard is not None else None
    autocast = check_autocast(job.autocast, job.device, notify)
    dataset = open_job_dataset(job, notify)
    if job.lora is None:
        raise ValueError("--lora is required: the LoRA trained on --data (only --merge goes without)")
    from ..models.loading import resolve_base, resolve_lora_file

    job = replace(job, base=resolve_base(job.base), lora=resolve_lora_file(job.lora))
    feature_sets = job.feature_sets()
    if ray is not None:  # the workers load the model: not this process
        from .parallel import featurize_on_ray

        job = replace(job, store=Path(job.store).expanduser().resolve(), data=dataset.root)
        return featurize_on_ray(ray or None, ray_workers, job, progress)
    return featurize_dataset(load_model(job.base, job.lora, job.device), dataset, job.store, job.base, job.lora,
                             feature_sets, batch_size=job.batch_size, shard_size=job.shard_size,
                             progress=progress, autocast_dtype=autocast, part=part, allow_partial=job.allow_partial,
                             max_memory=job.max_memory, resolution=job.resolution, buckets=job.buckets)


def index_store(store_dir: str | Path, rule: LambdaRule | None = None, dtype: str = "float32",
                notify: Notify | None = None) -> dict[str, dict]:
    """`das-sd index`: solve the kernel of every feature set of the store and write their indexes as
    one generation (``dtype``: storage of the train-side vectors, a key of INDEX_DTYPES).

    Args:
        store_dir: Folder of the feature store.
        rule: The lambda rule; None: the default rho (docs/method.md §10).
        dtype: Storage of the train-side vectors: "float32", "float16" or "int8".
        notify: Receives a note when index files an interrupted run left are removed.

    Returns:
        Feature set name -> its index info (lambda, generation, ...).

    Raises:
        ValueError: When ``dtype`` is not one of das_sd.registry.INDEX_DTYPES.
        StoreError: When there is no store, or its manifest is damaged or lacks the feature sets.
    """
    from ..store_integrity import require_identity

    check_choice("--dtype", dtype, INDEX_DTYPES)
    store = FeatureStore.open(store_dir)
    require_identity(store.root / MANIFEST, store.identity, ("feature_sets",), "das-sd index")
    orphans = store.remove_orphan_indexes()
    if orphans:
        _say(notify, f"removed {len(orphans)} index file(s) an interrupted `das-sd index` left")
    return build_indexes(store, sorted(store.identity["feature_sets"]), rule or LambdaRule(), getattr(torch, dtype))

