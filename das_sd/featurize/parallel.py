"""Featurization spread over processes or machines: ``--shard I/N`` parts, merged; Ray drives them.

The work of a featurization is the list of blocks ``store.plan(rows)``: the samples missing from the
store, cut into shard-sized blocks in dataset order. Part i of n takes blocks i, i + n, ... and writes
them, block number recorded, into its own partial store ``STORE/parts/part-i-of-n/`` (same identity,
so a part is resumable and refuses another model exactly like a store). Merging moves the parts'
shards into STORE in block order: every block holds the same samples, batched the same way, as in a
single process, so the merged store is identical to a single-process one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..data.datasets import Dataset
from ..store import MANIFEST, FeatureStore, Row, StoreError, blocks_of

PARTS = "parts"


def parse_part(text: str) -> tuple[int, int]:
    """'I/N' (0 <= I < N) -> (I, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def part_dir(store_dir: str | Path, part: tuple[int, int]) -> Path:
    return Path(store_dir).expanduser().resolve() / PARTS / f"part-{part[0]:03d}-of-{part[1]:03d}"


def _main_store_rows(store_dir: Path, identity: dict) -> tuple[set[str], int]:
    if (store_dir / MANIFEST).is_file():
        store = FeatureStore.open(store_dir, identity)
        return set(store.keys()), len(store)
    return set(), 0


def part_work(store_dir: str | Path, identity: dict, info: dict, dataset: Dataset, shard_size: int,
              part: tuple[int, int]) -> tuple[FeatureStore, list[tuple[int, list[Row]]]]:
    """The partial store of ``part`` and its blocks still to do, as (block number, rows)."""
    from .build import check_dataset, rows_of

    store_dir = Path(store_dir).expanduser().resolve()
    have, base_rows = _main_store_rows(store_dir, identity)
    rows = [r for r in rows_of(dataset) if r.key not in have]
    mine = [(j, block) for j, block in enumerate(blocks_of(rows, shard_size)) if j % part[1] == part[0]]
    store = FeatureStore.open_or_create(part_dir(store_dir, part), identity, shard_size=shard_size,
                                        info=info | {"part": list(part), "base_rows": base_rows})
    if store.manifest["info"].get("base_rows") != base_rows:
        raise StoreError(f"{store.root}: this part was planned when {store_dir} held "
                         f"{store.manifest['info'].get('base_rows')} rows, it now holds {base_rows}; "
                         f"delete {store.root.parent} and featurize the parts again")
    check_dataset(store, dataset)
    done = set(store.keys())
    return store, [(j, block) for j, block in mine if block[0].key not in done]


def merge_parts(store_dir: str | Path, dataset: Dataset | None = None) -> FeatureStore:
    """Move the shards of every part into the store, in block order, and remove the parts."""
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
        from .build import rows_of

        store.mark_complete(not store.missing(rows_of(dataset)))
    shutil.rmtree(store_dir / PARTS)
    return store


def featurize_on_ray(address: str | None, workers: int | None, store_dir: str | Path, job: dict,
                     progress: bool = True) -> FeatureStore:
    """Run the n parts as Ray tasks (one CPU, or one GPU where the cluster has them, each), then merge.

    ``job`` holds what a worker needs to load everything itself: base, lora, data (and its flags),
    feature_sets, batch_size, shard_size, device, autocast. Workers must see ``store_dir`` (a shared
    filesystem on a multi-machine cluster). ``address`` None starts a local cluster.
    """
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({"num_cpus": workers} if address is None and workers else {}))
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= 1 and job.get("device") in (None, "cuda")
    n = workers or int(resources.get("GPU" if use_gpu else "CPU", 1))
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_ray_part)
    pending = [task.remote(str(store_dir), job, (i, n)) for i in range(n)]
    bar = tqdm(total=n, desc="ray parts", unit="part", disable=not progress)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)  # re-raises a worker's error here
        bar.update(len(done))
    bar.close()
    return merge_parts(store_dir, _open_job_dataset(job))


def _open_job_dataset(job: dict) -> Dataset:
    from ..data.datasets import open_dataset

    return open_dataset(job["data"], **job.get("dataset_options", {}))


def _ray_part(store_dir: str, job: dict, part: tuple[int, int]) -> int:
    """One part, in a Ray worker process: load the pipeline and LoRA, featurize the part's blocks."""
    import torch

    from ..models.loading import load_lora, load_pipeline
    from .build import featurize_dataset

    torch.set_num_threads(1)  # one CPU per task: threads beyond it only contend
    pipe = load_pipeline(job["base"], device=job.get("device"))
    load_lora(pipe, job["lora"])
    store = featurize_dataset(pipe, _open_job_dataset(job), store_dir, Path(job["base"]), Path(job["lora"]),
                              job["feature_sets"], batch_size=job["batch_size"], shard_size=job["shard_size"],
                              progress=False, autocast_dtype=job.get("autocast"), part=part)
    return len(store)
