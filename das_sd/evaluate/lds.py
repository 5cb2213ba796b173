"""Linear Datamodeling Score (docs/method.md §15): do summed attributions predict retrained models?

M random subsets S_j (half of the training set each) are drawn from a seed; the LoRA is retrained
on each with the attributed LoRA's own recipe (its seed rule: subset j, repeat r trains with seed
recipe.seed + 1000 j + r); for every query x the model output y_j(x) is L_simple averaged over a
fixed timestep grid and fixed noise draws (the same for every subset, so subsets are compared on
equal terms). A method's prediction is yhat_j(x) = -sum_{i in S_j} score_i(x); LDS is the mean over
queries of the Spearman correlation between yhat_j(x) and y_j(x) over j, with a bootstrap 95 %
interval over queries.

Retrained LoRAs and outputs are cached under the run folder, so an interrupted run resumes, a run
can grow M, and every store of the same fine-tune (ablations) is scored from the same retrained
models; results go to lds-<store id>.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..io import atomic_write_json
from ..registry import GRADIENT_METHOD_NAMES
from ..score import ranking
from .lds_lambda import lambda_curves
from .lds_outputs import retrained_outputs
from .lds_queries import LDSQueries, split_queries
from .lds_settings import LDSSettings
from .lds_stats import lds, oracle_scores
from .lds_subsets import check_retraining_plan, draw_subsets, retrain_subsets, retraining_plan
from .retrain import attributed_recipe_and_data

if TYPE_CHECKING:
    from ..attribute import Attributor


def evaluate_lds(attributor: Attributor, queries: LDSQueries, masks: np.ndarray, outputs: np.ndarray,
                 methods: list[str], settings: LDSSettings, features: dict[str, torch.Tensor] | None = None) -> dict:
    """LDS of each method on one query set, scored with the store's own index (its lambda).

    Args:
        attributor: The attributor of the store.
        queries: The query set.
        masks: (M, N) bool subset masks.
        outputs: (M, Q) model outputs of the retrained LoRAs on ``queries``.
        methods: Methods to evaluate.
        settings: Gives ``bootstrap``.
        features: The queries' features per feature set when the caller has them; None computes them.

    Returns:
        ``{method: lds summary}`` (see ``lds``).
    """
    out = {}
    for name in methods:
        score = ranking(name, attributor.scores(queries.latents, queries.prompts, name, features))
        out[name] = lds(score.double().cpu().numpy(), masks, outputs, settings.bootstrap)
    return out


def run_lds(attributor: Attributor, workdir: str | Path, query_sets: list[LDSQueries], settings: LDSSettings,
            methods: list[str] | None = None, workers: int = 1, progress: bool = True,
            ray_address: str | None = None) -> dict:
    """Retrain on M subsets with the attributed LoRA's recipe, then score every method on every
    query set from the same retrained models. Results are also written to workdir/lds-<store id>.json.

    Args:
        attributor: The attributor of the store under test; its LoRA needs a lora_record.json.
        workdir: Run folder: retrained LoRAs, cached outputs, plan.json and the results (resumable).
        query_sets: The query sets (``val_queries``, ``gen_queries``); each is split into tune and reported parts.
        settings: The LDS settings.
        methods: Methods to evaluate; None means the store's gradient methods.
        workers: Parallel trainings.
        progress: Show progress bars.
        ray_address: Ray cluster to train on ("" for a local one); None: no Ray.

    Returns:
        ``{"plan", "methods", "query_sets": {name: {"queries", "tune_queries", "query_keys", "tune_keys",
        "lds_store_lambda": {method: summary}, "lds": {method: summary at the chosen rho, plus an oracle
        row}}}, "lambda": {method: {"chosen_rho", "curve"}}}``.

    Raises:
        ValueError: When ``workdir`` holds a run with other retraining settings, or the LoRA's
            recipe or dataset cannot be recovered (``attributed_recipe_and_data``).
    """
    workdir = Path(workdir)
    recipe, dataset = attributed_recipe_and_data(attributor)
    masks = draw_subsets(len(dataset), settings)
    check_retraining_plan(workdir, retraining_plan(attributor, recipe, settings))
    folders = retrain_subsets(attributor.base_path, dataset, masks, recipe, workdir, settings.repeats, workers, progress,
                              ray_address)
    methods = methods or [m for m in attributor.methods if m in GRADIENT_METHOD_NAMES]
    plan = json.loads(json.dumps({"settings": asdict(settings), "recipe": asdict(recipe),
                                  "store_id": attributor.store.store_id}))
    results = {"plan": plan, "methods": methods, "query_sets": {}}
    parts, reported = [], []
    for queries in query_sets:
        tune, report = split_queries(queries, settings)
        tune_out = retrained_outputs(attributor.base_path, folders, tune, settings, progress) if tune else None
        report_out = retrained_outputs(attributor.base_path, folders, report, settings, progress)
        report_features = attributor.query_features(report.latents, report.prompts)  # once, for every method
        tune_features = attributor.query_features(tune.latents, tune.prompts) if tune else None
        parts.append((tune_features, tune_out, report_features, report_out, report.name))
        reported.append((tune, report, report_features, report_out))
    curves = lambda_curves(attributor, parts, masks, methods, settings)
    for tune, report, features, outputs in reported:
        per_method = evaluate_lds(attributor, report, masks, outputs, methods, settings, features)  # store's lambda
        block = {"queries": len(report.keys), "tune_queries": len(tune.keys) if tune else 0,
                 "query_keys": report.keys, "tune_keys": tune.keys if tune else [],
                 "lds_store_lambda": per_method, "lds": {}}
        for name in methods:  # kernel methods at the lambda chosen on the tune queries
            chosen = curves.get(name, {}).get("chosen_rho")
            block["lds"][name] = per_method[name] if chosen is None else next(
                p["report"][report.name] for p in curves[name]["points"] if p["rho"] == chosen)
        block["lds"]["oracle (fitted to these outputs)"] = lds(oracle_scores(masks, outputs), masks, outputs,
                                                               settings.bootstrap)
        results["query_sets"][report.name] = block
    results["lambda"] = {name: {"chosen_rho": c["chosen_rho"],
                                "curve": [{"rho": p["rho"], "lambda": p["lambda"], "tune": p["tune"],
                                           "report": {k: v["lds"] for k, v in p["report"].items()}}
                                          for p in c["points"]]}
                         for name, c in curves.items()}
    atomic_write_json(workdir / f"lds-{attributor.store.store_id}.json", results)
    return results
