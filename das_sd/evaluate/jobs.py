"""The evaluations from paths, as `das-sd eval ...` runs them: open the store's attributor, build the
query sets, run one evaluation and return its report. One function per evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..attribute import Attributor
    from .counterfactual import CounterfactualSettings
    from .lds_queries import LDSQueries
    from .lds_settings import LDSSettings


@dataclass(frozen=True)
class QuerySources:
    """Where an LDS run's queries come from; at least one of ``val`` and ``prompts``.

    Attributes:
        val: dataset folder of held-out real images (the "val" query set), or None.
        val_limit: use only the first N images of ``val`` (None: all).
        prompts: text file with one prompt per line (the "gen" query set, generated with seeds
            0..seeds-1), or None.
        seeds: generations per prompt.
    """

    val: str | Path | None = None
    val_limit: int | None = None
    prompts: str | Path | None = None
    seeds: int = 1

    def build(self, attributor: Attributor) -> list[LDSQueries]:
        """The query sets: the val images encoded, the prompts generated with the store's pipeline.

        Args:
            attributor: the attributed store's attributor (its pipeline encodes and generates).

        Returns:
            One ``LDSQueries`` per source given, val first.

        Raises:
            ValueError: when neither ``val`` nor ``prompts`` is given, or the prompt file is empty.
        """
        from ..io import read_prompt_file
        from .lds_queries import gen_queries, val_queries

        if not self.val and not self.prompts:
            raise ValueError("give --val DIR (held-out real images) and/or --prompts FILE (generations)")
        query_sets = []
        if self.val:
            query_sets.append(val_queries(attributor, self.val, self.val_limit))
        if self.prompts:
            query_sets.append(gen_queries(attributor, read_prompt_file(self.prompts), self.seeds))
        return query_sets


@dataclass(frozen=True)
class StoreTarget:
    """The store to evaluate, with its model and LoRA (or the overrides when they moved).

    Attributes:
        store: feature store folder.
        base: base model folder, when it moved since featurizing (None: the one the store names).
        lora: LoRA file or folder, likewise.
        device: "cpu", "cuda", ... (None: CUDA when available).
    """

    store: str | Path
    base: str | Path | None = None
    lora: str | Path | None = None
    device: str | None = None

    def open(self) -> Attributor:
        """Load the store's attributor (its pipeline with the LoRA).

        Returns:
            The ``Attributor`` of the store.
        """
        from ..attribute import Attributor

        return Attributor(self.store, device=self.device, base=self.base, lora=self.lora)


def dataset_of(attributor: Attributor, data: str | Path | None) -> str | Path | None:
    """``data``, or the dataset the store was featurized from when ``data`` is None.

    Args:
        attributor: the store's attributor.
        data: a dataset folder given by the user, or None.

    Returns:
        The dataset folder to evaluate against (None when neither is known).
    """
    return data or attributor.store.manifest.get("info", {}).get("dataset_root")


def ground_truth_report(target: StoreTarget, data: str | Path | None = None, split: str = "test",
                        methods: list[str] | None = None) -> dict:
    """Recall@5/10 and mAP of the planted exemplar groups per method (``das-sd eval groundtruth``).

    Args:
        target: the store.
        data: dataset with ground_truth.json (None: the store's dataset).
        split: "test" (report) or "tune" (choose settings).
        methods: methods to evaluate (None: all the store supports).

    Returns:
        The report of ``evaluate_ground_truth``.
    """
    from .groundtruth import evaluate_ground_truth

    attributor = target.open()
    return evaluate_ground_truth(attributor, dataset_of(attributor, data), split=split, methods=methods, progress=True)


def lds_report(target: StoreTarget, workdir: str | Path, sources: QuerySources, settings: LDSSettings,
               methods: list[str] | None = None, workers: int = 1, ray_address: str | None = None) -> dict:
    """The Linear Datamodeling Score of each method (``das-sd eval lds``), retraining cached in ``workdir``.

    Args:
        target: the store.
        workdir: retrained LoRAs and outputs (a rerun resumes).
        sources: where the queries come from.
        settings: subsets, repeats, lambda tuning split and output settings.
        methods: methods to evaluate (None: all the store supports).
        workers: retraining processes.
        ray_address: retrain as Ray tasks ("" a local cluster; None: no Ray).

    Returns:
        The report of ``run_lds``.
    """
    from .lds import run_lds

    attributor = target.open()
    return run_lds(attributor, workdir, sources.build(attributor), settings, methods, workers=workers,
                   ray_address=ray_address)


def ablations_report(target: StoreTarget, workdir: str | Path, variants: list[str] | None = None,
                     data: str | Path | None = None, ground_truth: bool = True, lds_workdir: str | Path | None = None,
                     sources: QuerySources | None = None, settings: LDSSettings | None = None, workers: int = 1,
                     method_variants: bool = True) -> dict:
    """One option of das changed at a time, each measured like the base store (``das-sd eval ablations``).

    Args:
        target: the base store.
        workdir: variant stores and ablations.json (a rerun resumes).
        variants: variant names such as "f=mean" (None: every featurizer option the store differs in).
        data: dataset with ground_truth.json (None: the store's dataset).
        ground_truth: measure on the planted ground truth.
        lds_workdir: LDS run folder whose retrained LoRAs all variants share (None: no LDS).
        sources: the LDS queries (needed with ``lds_workdir``).
        settings: the LDS settings (needed with ``lds_workdir``).
        workers: retraining processes for the LDS.
        method_variants: also measure the scorer variants (leverage off, signed scores).

    Returns:
        The report of ``run_ablations``.

    Raises:
        ValueError: when ``lds_workdir`` is given without ``sources`` or ``settings``.
    """
    from .ablations import run_ablations

    if lds_workdir and (sources is None or settings is None):
        raise ValueError("an LDS ablation needs its query sources and settings")
    attributor = target.open()
    lds_run = None
    if lds_workdir:
        lds_run = {"workdir": lds_workdir, "queries": sources.build(attributor), "settings": settings,
                   "workers": workers}
    return run_ablations(attributor, workdir, variants, dataset_of(attributor, data) if ground_truth else None,
                         lds_run, method_variants=method_variants)


def counterfactual_report(target: StoreTarget, workdir: str | Path, prompts: str | Path, seeds: int,
                          settings: CounterfactualSettings, methods: list[str] | None = None, workers: int = 1,
                          ray_address: str | None = None) -> dict:
    """Remove each method's top-k, retrain, regenerate and measure the change (``das-sd eval counterfactual``).

    Args:
        target: the store.
        workdir: retrained LoRAs and results (a rerun resumes).
        prompts: text file with one prompt per line (generated with seeds 0..seeds-1).
        seeds: generations per prompt.
        settings: top-k removed and random controls.
        methods: methods to evaluate (None: the store's gradient methods).
        workers: retraining processes.
        ray_address: retrain as Ray tasks ("" a local cluster; None: no Ray).

    Returns:
        The report of ``run_counterfactual``.
    """
    from ..io import read_prompt_file
    from .counterfactual import run_counterfactual

    attributor = target.open()
    return run_counterfactual(attributor, workdir, read_prompt_file(prompts), seeds, settings, methods,
                              workers=workers, ray_address=ray_address)
