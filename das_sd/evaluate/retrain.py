"""Retraining the attributed LoRA on other data: what LDS and counterfactual removal both repeat.

Every retraining uses the recipe recorded beside the attributed LoRA (lora_record.json) with a
chosen seed and subset of the store's dataset. Jobs are plain tuples (picklable for spawned
processes and Ray tasks); a job whose output folder already holds a LoRA record is skipped, so an
interrupted evaluation resumes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..attribute import Attributor
    from ..data.datasets import Dataset
    from ..lora_record import LoraRecipe


def attributed_recipe_and_data(attributor: Attributor) -> tuple[LoraRecipe, Dataset]:
    """The recipe the attributed LoRA was trained with (its lora_record.json) and the store's dataset:
    what every retraining of an evaluation repeats.

    Args:
        attributor: The attributor whose LoRA (``attributor.lora_path``) and store are evaluated.

    Returns:
        ``(recipe, dataset)``: the LoRA's training recipe and the store's dataset, opened from the
        ``dataset_root`` and ``dataset_format`` the store recorded.

    Raises:
        ValueError: When no lora_record.json lies beside the LoRA (it was not trained by
            ``das-sd train-lora``), or when the dataset's samples no longer match the store's rows.
    """
    from ..data.datasets import open_dataset
    from ..lora_record import read_record, recipe_from_record

    record = read_record(attributor.lora_path.parent)
    if not record:
        raise ValueError(f"{attributor.lora_path}: no lora_record.json beside it; evaluations retrain with the "
                         "attributed LoRA's recipe, so the LoRA must come from `das-sd train-lora`")
    recipe = recipe_from_record(record)
    info = attributor.store.manifest.get("info", {})
    dataset = open_dataset(info["dataset_root"], info.get("dataset_format", "auto"))
    if dataset.keys != attributor.store.keys():
        raise ValueError(f"{dataset.root}: the dataset no longer matches the store's rows")
    return recipe, dataset


def _train_one(job: tuple) -> str:
    """Worker: retrain the LoRA on one subset (skipped when its record is already there)."""
    base, data_root, data_format, keys, out, recipe_dict, threads = job
    from ..data.datasets import open_dataset
    from ..lora_record import LoraRecipe, read_record
    from ..train import train_lora

    if read_record(out):
        return out
    torch.set_num_threads(threads)
    dataset = open_dataset(data_root, data_format).subset(keys)
    train_lora(base, dataset, out, LoraRecipe(**recipe_dict), progress=False)
    return out


def training_job(base: Path, dataset: Dataset, keys: list[str], out: Path, recipe: LoraRecipe, seed: int,
                 threads: int = 1) -> tuple:
    """One retraining: the LoRA recipe with ``seed`` on the samples ``keys`` of ``dataset``, into ``out``.

    Args:
        base: Folder of the base model the LoRA is trained on.
        dataset: The full training dataset; only its root and format go into the job.
        keys: Sample keys of ``dataset`` to train on (the subset).
        out: Folder the retrained LoRA and its lora_record.json are written to.
        recipe: The attributed LoRA's training recipe; its own seed is replaced by ``seed``.
        seed: Training seed of this job.
        threads: Torch CPU threads of the worker (``run_training_jobs`` sets it again).

    Returns:
        A picklable job tuple for ``run_training_jobs``.
    """
    return (str(base), str(dataset.root), dataset.format, list(keys), str(out), asdict(recipe) | {"seed": seed},
            threads)


def run_training_jobs(jobs: list[tuple], workers: int = 1, progress: bool = True, ray_address: str | None = None,
                      desc: str = "retrain") -> None:
    """Train every job (already finished ones are skipped): in this process, in ``workers`` spawned
    processes, or as tasks on a Ray cluster when ``ray_address`` is given.

    Args:
        jobs: Job tuples from ``training_job``.
        workers: Parallel trainings; 1 trains in this process. The CPU threads are split among them.
        progress: Show a progress bar.
        ray_address: Address of a Ray cluster to run the jobs as tasks on; "" starts a local one of
            ``workers`` CPUs; None does not use Ray. The cluster's workers must see the output folders.
        desc: Label of the progress bar.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from tqdm.auto import tqdm

    threads = max(1, torch.get_num_threads() // max(1, workers))
    jobs = [job[:-1] + (threads if ray_address is None else 1,) for job in jobs]
    bar = tqdm(total=len(jobs), desc=desc, unit="lora", disable=not progress)
    if ray_address is not None:
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address or None, include_dashboard=False, log_to_driver=False,
                     **({"num_cpus": workers} if not ray_address and workers > 1 else {}))
        task = ray.remote(num_cpus=1)(_train_one)
        pending = [task.remote(job) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # re-raises a task's error here
            bar.update(len(done))
    elif workers <= 1:
        for job in jobs:
            _train_one(job)
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(_train_one, jobs):
                bar.update(1)
    bar.close()
