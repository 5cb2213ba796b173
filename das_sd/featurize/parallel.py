"""Featurization spread over processes or machines: ``--shard I/N`` parts, merged; Ray drives them.

Which blocks a part takes is planned in ``das_sd.featurize.plan``: part i of n writes blocks i, i + n,
..., block number recorded, into its own partial store ``STORE/parts/part-i-of-n/`` (same identity,
so a part is resumable and refuses another model exactly like a store). Merging moves the parts'
shards into STORE in block order: every block holds the same samples, batched the same way, as in a
single process, so the merged store is identical to a single-process one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..data.datasets import Dataset
from ..store import FeatureStore, StoreError
from .build import featurize_dataset
from .plan import PARTS, FeaturizeJob, rows_of


def merge_parts(store_dir: str | Path, dataset: Dataset | None = None) -> FeatureStore:
    """Move the shards of every part into the store, in block order, and remove the parts.

    Resumable: shards an interrupted merge already moved are recognised and kept.

    Args:
        store_dir: Folder of the feature store whose ``parts/`` are merged (the store is created
            when it does not exist yet).
        dataset: The dataset, to mark the store complete when it holds every sample; None leaves
            the completeness flag as it is.

    Returns:
        The merged store.

    Raises:
        StoreError: When there are no parts, they come from different I/N splits, some part is
            missing or unfinished, the parts' blocks are not 0..n-1, the parts or the store have
            another identity, or the store changed since the parts were planned.
    """
    store_dir = Path(store_dir).expanduser().resolve()
    found = sorted((store_dir / PARTS).glob("part-*-of-*"))
    if not found:
        raise StoreError(f"{store_dir}: no parts to merge (no {PARTS}/part-I-of-N folders)")
    parts = [FeatureStore.open(p) for p in found]
    counts = {p.manifest["info"].get("part", [None, None])[1] for p in parts}
    if len(counts) != 1:
        raise StoreError(f"{store_dir / PARTS}: parts of different splits {sorted(map(str, counts))}; keep one I/N set")
    n = counts.pop()
    present = {p.manifest["info"]["part"][0] for p in parts}
    absent = [f"{i}/{n}" for i in range(n) if i not in present]
    unfinished = [p.root.name for p in parts if not p.manifest.get("complete")]
    if absent or unfinished:
        raise StoreError(f"{store_dir}: cannot merge yet: parts not started {absent}, not finished {unfinished}; "
                         "run `das-sd featurize --shard I/N` for them first")
    identity = parts[0].identity
    for p in parts[1:]:
        p.check_identity(identity)
    entries = sorted(((s["block"], p, s) for p in parts for s in p.manifest["shards"]), key=lambda e: e[0])
    if [e[0] for e in entries] != list(range(len(entries))):
        raise StoreError(f"{store_dir / PARTS}: blocks {[e[0] for e in entries]} are not 0..{len(entries) - 1}")
    info = {k: v for k, v in parts[0].manifest["info"].items() if k not in ("part", "base_rows", "last_run")}
    store = FeatureStore.open_or_create(store_dir, identity, shard_size=parts[0].shard_size, info=info,
                                        moved_shards=True)
    have = set(store.keys())
    adopted = [e for e in entries if e[2]["keys"][0] in have]  # by an earlier, interrupted merge
    if len(store) - sum(len(e[2]["keys"]) for e in adopted) != parts[0].manifest["info"]["base_rows"]:
        raise StoreError(f"{store_dir}: the store changed since the parts were planned; featurize them again")
    store.manifest.setdefault("probes", parts[0].manifest.get("probes"))
    for _, part, entry in entries[len(adopted):]:
        store.adopt_shard(part.root / entry["file"], entry, part.checksum(entry["file"]))
    if dataset is not None:
        store.mark_complete(not store.missing(rows_of(dataset)))
    shutil.rmtree(store_dir / PARTS)
    return store


def featurize_on_ray(address: str | None, workers: int | None, job: FeaturizeJob,
                     progress: bool = True) -> FeatureStore:
    """Run the n parts of ``job`` as Ray tasks (one CPU, or one GPU where the cluster has them, each),
    then merge them into ``job.store``.

    The workers load the model and open the dataset themselves: ``job`` must name its base and LoRA
    as paths they can read, and they must see ``job.store`` (a shared filesystem on a multi-machine
    cluster). ``address`` None starts a local cluster.

    Args:
        address: Address of a running Ray cluster; None starts a local one (when Ray is not
            initialised yet).
        workers: Number of parts (and of a local cluster's CPUs); None: one part per GPU of the
            cluster when it has GPUs and ``job.device`` allows CUDA, else one per CPU.
        job: The featurization; its base and LoRA must be paths the workers can read.
        progress: Show a tqdm bar of the parts done.

    Returns:
        The merged store.
    """
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({"num_cpus": workers} if address is None and workers else {}))
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= 1 and job.device in (None, "cuda")
    n = workers or int(resources.get("GPU" if use_gpu else "CPU", 1))
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_ray_part)
    pending = [task.remote(job, (i, n)) for i in range(n)]
    bar = tqdm(total=n, desc="ray parts", unit="part", disable=not progress)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)  # re-raises a worker's error here
        bar.update(len(done))
    bar.close()
    return merge_parts(job.store, job.open_dataset())


def _ray_part(job: FeaturizeJob, part: tuple[int, int]) -> int:
    """One part, in a Ray worker process: load the pipeline and LoRA, featurize the part's blocks."""
    import torch

    from ..models.loading import load_lora, load_pipeline

    torch.set_num_threads(1)  # one CPU per task: threads beyond it only contend
    pipe = load_pipeline(job.base, device=job.device)
    load_lora(pipe, job.lora)
    store = featurize_dataset(pipe, job.open_dataset(), job.store, Path(job.base), Path(job.lora),
                              job.feature_sets(), batch_size=job.batch_size, shard_size=job.shard_size,
                              progress=False, autocast_dtype=job.autocast_dtype, part=part,
                              allow_partial=job.allow_partial, max_memory=job.max_memory,
                              resolution=job.resolution, buckets=job.buckets)
    return len(store)
