"""Ablations of DAS's options (docs/method.md §17, the options) through the same instruments.

Each featurizer variant changes one setting of the store's das feature set and gets its own
das-only store (featurized once, cached under the run folder, indexed with the store's lambda rule);
the variants of the scorer (leverage, squared vs signed) are methods of the original store. Every
row is measured the same way: planted ground truth on both query splits and, when LDS queries are
given, LDS from one shared set of retrained LoRAs (see das_sd.evaluate.lds: retrained models do not
depend on the featurizer settings, so the ablation adds no retraining).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..featurize.featurizer import store_autocast
from ..featurize.settings import FeaturizerSettings, uniform_grid
from ..io import atomic_write_json
from .groundtruth import generate_queries

if TYPE_CHECKING:
    from ..attribute import Attributor

# one changed setting per variant; the base store's das settings give the rest
FEATURIZER_VARIANTS: dict[str, dict] = {
    "f=mean": {"output": "mean"},
    "f=l1": {"output": "l1"},
    "f=square": {"output": "square"},
    "f=loss": {"output": "loss"},
    "normalisation off": {"normalize": False},
    "normalisation on": {"normalize": True},
    "residual=scale-free": {"residual": "scale-free"},
    "residual=magnitude": {"residual": "magnitude"},
    "residual=none": {"residual": "none"},
    "residual=signed": {"residual": "signed", "residual_timesteps": 0},  # the signed form needs the feature rows
    "K=10": {"num_timesteps": 10},
    "K=20": {"num_timesteps": 20},
    "K=50": {"num_timesteps": 50},
    "k=512": {"projection_dim": 512},
    "k=2048": {"projection_dim": 2048},
    "k=8192": {"projection_dim": 8192},
}
# scorer variants: another method of the same store
METHOD_VARIANTS: dict[str, str] = {"leverage off": "das-noleverage", "signed (t_i, not t_i^2)": "das-signed"}


def base_das_settings(attributor: Attributor) -> FeaturizerSettings:
    """The das feature set's settings as recorded in the store (an explicit timestep list is kept only
    when it is not the uniform grid that num_timesteps gives).

    Args:
        attributor: The attributor of the base store; its pipeline gives the scheduler's timesteps.

    Returns:
        The settings the variants change one field of.
    """
    from ..featurize.featurizer import alphas_cumprod_of

    recorded = attributor.store.identity["feature_sets"]["das"]
    names = {f.name for f in fields(FeaturizerSettings)}
    settings = FeaturizerSettings(**{k: v for k, v in recorded.items() if k in names and k != "timesteps"})
    grid = uniform_grid(settings.num_timesteps, len(alphas_cumprod_of(attributor.pipe)))
    if recorded.get("timesteps") not in (None, grid):
        settings = replace(settings, timesteps=list(recorded["timesteps"]))
    return settings


def variant_rows(attributor: Attributor, names: list[str] | None = None) -> list[tuple[str, dict]]:
    """(name, overrides) of the featurizer variants that change something in this store's settings.

    Args:
        attributor: The attributor of the base store.
        names: Variant names (keys of ``FEATURIZER_VARIANTS``); None means all of them.

    Returns:
        ``(name, overrides)`` per variant that differs from the base store, in the order asked.

    Raises:
        ValueError: When a name is not a known variant, or a K= variant would replace the store's explicit
            timestep list.
    """
    base = base_das_settings(attributor)
    unknown = [n for n in names or [] if n not in FEATURIZER_VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; expected some of {list(FEATURIZER_VARIANTS)}")
    rows = []
    for name in names or list(FEATURIZER_VARIANTS):
        overrides = FEATURIZER_VARIANTS[name]
        if all(getattr(base, k) == v for k, v in overrides.items()):
            continue  # the base store itself
        if "num_timesteps" in overrides and base.timesteps is not None:
            raise ValueError(f"{attributor.store.root}: the das set has an explicit timestep list; variant {name!r} would "
                             "replace it with a uniform grid")
        rows.append((name, overrides))
    return rows


def variant_store(attributor: Attributor, folder: Path, overrides: dict, progress: bool = True) -> Attributor:
    """An Attributor on a das-only store of the same model, LoRA and dataset with ``overrides``
    applied (featurized and indexed once; a rerun resumes or reuses it).

    Args:
        attributor: The attributor of the base store; its pipeline is shared.
        folder: Where the variant's store is built (or found).
        overrides: ``FeaturizerSettings`` fields to change from ``base_das_settings``.
        progress: Show a progress bar while featurizing.

    Returns:
        An Attributor on the variant store, indexed with the base store's das lambda rule.
    """
    from ..attribute import Attributor
    from ..data.datasets import open_dataset
    from ..featurize.build import featurize_dataset
    from ..score import LambdaRule, build_index

    store = attributor.store
    settings = replace(base_das_settings(attributor), **overrides)
    info = store.manifest["info"]
    dataset = open_dataset(info["dataset_root"], info.get("dataset_format", "auto"))
    autocast = store_autocast(store.identity.get("compute_dtype", "float32"), attributor.pipe.unet.device)
    built = featurize_dataset(attributor.pipe, dataset, folder, attributor.base_path, attributor.lora_path,
                              {"das": settings}, resolution=attributor.resolution, progress=progress,
                              shard_size=store.manifest["shard_size"], autocast_dtype=autocast)
    if "das" not in built.manifest.get("indexes", {}):
        rule = store.manifest.get("indexes", {}).get("das", {}).get("lambda_rule", {})
        build_index(built, "das", LambdaRule.from_description(rule))
    return Attributor(built, pipe=attributor.pipe)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=-" else "-" for c in name)


def measure(attributor: Attributor, methods: list[str], data: str | Path | None, generations: dict,
            lds_run: dict | None, progress: bool) -> dict[str, dict]:
    """Ground truth on both splits and (optionally) LDS of some methods of one store, each
    instrument run once for all of them.

    Args:
        attributor: The attributor of the store measured.
        methods: Methods of that store to measure.
        data: Dataset folder with ground_truth.json; None skips ground truth.
        generations: Per split, the generated queries (``generate_queries``).
        lds_run: ``{"workdir", "queries", "settings", "workers"}`` for ``run_lds``; None skips LDS.
        progress: Show progress bars.

    Returns:
        Per method, ``{"method", "store_id", "groundtruth_<split>": metrics, "lds": {set: {"lds", "ci",
        "queries"}}, "chosen_rho"}`` (the ground truth and LDS keys only when measured).
    """
    from .groundtruth import evaluate_ground_truth
    from .lds import run_lds

    rows: dict[str, dict] = {m: {"method": m, "store_id": attributor.store.store_id} for m in methods}
    if data is not None:
        for split, generated in generations.items():
            report = evaluate_ground_truth(attributor, data, split=split, methods=methods, progress=progress,
                                           generations=generated)
            for m in methods:
                rows[m][f"groundtruth_{split}"] = report["methods"][m]
    if lds_run is not None:
        results = run_lds(attributor, lds_run["workdir"], lds_run["queries"], lds_run["settings"], methods,
                          workers=lds_run.get("workers", 1), progress=progress)
        for m in methods:
            rows[m]["lds"] = {name: {"lds": block["lds"][m]["lds"], "ci": block["lds"][m]["ci"],
                                     "queries": block["queries"]} for name, block in results["query_sets"].items()}
            rows[m]["chosen_rho"] = results["lambda"].get(m, {}).get("chosen_rho")
    return rows


def ablation_table(results: dict) -> str:
    """A markdown table of an ablation run: one row per variant, ground truth and LDS columns.

    Args:
        results: The run's results (``run_ablations``, as in ablations.json).

    Returns:
        The table as markdown text: Recall@10 and mAP per split, LDS with its 95 % interval per query set.
    """
    rows = results["rows"]
    sets = sorted({s for r in rows.values() for s in r.get("lds", {})}, key=["val", "gen"].index)
    head = ["variant", "R@10 tune", "mAP tune", "R@10 test", "mAP test"] + [f"LDS {s} [95% CI]" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name]
        for split in ("tune", "test"):
            gt = r.get(f"groundtruth_{split}")
            cells += [f"{gt['recall@10']:.3f}", f"{gt['ap']:.3f}"] if gt else ["", ""]
        for s in sets:
            v = r.get("lds", {}).get(s)
            cells.append(f"{v['lds']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ablations(attributor: Attributor, workdir: str | Path, variants: list[str] | None = None,
                  data: str | Path | None = None, lds_run: dict | None = None, method_variants: bool = True,
                  progress: bool = True) -> dict:
    """Measure the base store's das, its scorer variants and each featurizer variant. Results also go
    to workdir/ablations.json.

    Args:
        attributor: The attributor of the base store.
        workdir: Run folder; variant stores are built under ``stores/`` in it.
        variants: Featurizer variants to run (keys of ``FEATURIZER_VARIANTS``); None means all.
        data: A dataset with ground_truth.json; None skips ground truth.
        lds_run: ``{"workdir", "queries" (LDSQueries), "settings" (LDSSettings), "workers"}``; None skips LDS.
        method_variants: Also measure the scorer variants (``METHOD_VARIANTS``) the store supports.
        progress: Show progress bars.

    Returns:
        ``{"base_store", "base_settings", "rows": {variant name: measurements (``measure``), featurizer
        variants with "changed" and, when featurized in one go, "featurize_seconds"}, "seconds"}``.

    Raises:
        ValueError: From ``variant_rows``, for an unknown or inapplicable variant.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows_to_build = variant_rows(attributor, variants)
    started = time.time()
    out = {"base_store": str(attributor.store.root), "base_settings": asdict(base_das_settings(attributor)),
           "rows": {}}
    # every store shares the model and LoRA, hence the generations: made once per split
    generations = {split: generate_queries(attributor.pipe, data, split, progress=progress)
                   for split in ("tune", "test")} if data is not None else {}
    scorer_rows = {"das (base store)": "das"}
    if method_variants:
        scorer_rows |= {name: m for name, m in METHOD_VARIANTS.items() if m in attributor.methods}
    measured = measure(attributor, list(scorer_rows.values()), data, generations, lds_run, progress)
    out["rows"] = {name: measured[m] for name, m in scorer_rows.items()}
    for name, overrides in rows_to_build:
        variant = variant_store(attributor, workdir / "stores" / _slug(name), overrides, progress)
        out["rows"][name] = measure(variant, ["das"], data, generations, lds_run, progress)["das"] | {"changed": overrides}
        last_run = variant.store.manifest["info"].get("last_run", {})
        if last_run.get("samples") == len(variant.store):  # featurized in one go (not reused from a cache)
            out["rows"][name]["featurize_seconds"] = last_run["seconds"]
    out["seconds"] = round(time.time() - started, 1)
    atomic_write_json(workdir / "ablations.json", json.loads(json.dumps(out)))
    return out
