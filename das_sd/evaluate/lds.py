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

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..featurize.settings import uniform_grid
from ..io import atomic_write_json
from ..conditioning import Conditioning, unet_kwargs
from ..noising import noisy_latents, prediction_type, training_target
from ..seeds import generator
from ..registry import GRADIENT_METHOD_NAMES
from ..score import ranking
from .retrain import attributed_recipe_and_data, run_training_jobs, training_job

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import StableDiffusionPipeline

    from ..attribute import Attributor
    from ..data.datasets import Dataset
    from ..train import LoraRecipe


@dataclass
class LDSSettings:
    """Settings of an LDS run (docs/method.md §15).

    Attributes:
        subsets: M, the number of random training subsets retrained on.
        fraction: Share of the training samples in each subset (round(fraction N), at least 1).
        repeats: LoRAs retrained per subset, with different seeds; their outputs are averaged.
        subset_seed: Seed of the subset draw.
        output_timesteps: Timesteps of the uniform grid that L_simple is averaged over.
        output_noise_draws: Noise draws per timestep of that average.
        output_seed: Seed of those noise draws.
        bootstrap: Resamples of the queries for the 95 % interval.
        tune_fraction: Share of each query set held out to choose lambda (never reported); 0: no tune part.
        split_seed: Seed of the tune / reported split of each query set.
        rho_grid: The rho tried for each kernel method (lambda = rho trace / min(N, k), das_sd.ridge).
    """
    subsets: int = 16  # M (the papers use 64)
    fraction: float = 0.5
    repeats: int = 1  # LoRAs per subset (different seeds), outputs averaged
    subset_seed: int = 0
    output_timesteps: int = 50  # timesteps of the L_simple average
    output_noise_draws: int = 4  # noise draws per timestep
    output_seed: int = 0
    bootstrap: int = 1000
    tune_fraction: float = 0.5  # of each query set, held out to choose lambda (never reported)
    split_seed: int = 0
    rho_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # lambda = rho trace / min(N, k)


def draw_subsets(n: int, settings: LDSSettings) -> np.ndarray:
    """Draw the M random training subsets, seeded by ``settings.subset_seed``.

    Subset j is the same draw for any M > j, so a run can grow.

    Args:
        n: Number of training samples N.
        settings: Gives M (``subsets``), ``fraction`` and ``subset_seed``.

    Returns:
        (M, N) bool masks, each selecting round(fraction N) (at least 1) training samples.
    """
    rng = np.random.default_rng(settings.subset_seed)
    size = max(1, round(settings.fraction * n))
    masks = np.zeros((settings.subsets, n), dtype=bool)
    for j in range(settings.subsets):
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks


def subset_seed(recipe_seed: int, subset: int, repeat: int) -> int:
    """Training seed of one retraining: ``recipe_seed + 1000 subset + repeat`` (docs/method.md §15).

    Args:
        recipe_seed: The attributed LoRA's own training seed.
        subset: Subset index j.
        repeat: Repeat index r on that subset.

    Returns:
        The seed.
    """
    return recipe_seed + 1000 * subset + repeat


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation, with average ranks for ties.

    Args:
        a: 1-D values.
        b: 1-D values, as many as ``a``.

    Returns:
        The correlation in [-1, 1]; nan when either side is constant.
    """
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, bootstrap: int = 1000,
        seed: int = 0) -> dict:
    """LDS of one method on one query set (docs/method.md §15).

    The prediction for subset j is ``-masks[j] @ scores[q]``; queries whose Spearman correlation is nan
    (a constant side) are dropped.

    Args:
        scores: (Q, N) the method's ranking keys (``das_sd.score.ranking``: t^2 for das, not signed t).
        masks: (M, N) bool subset masks (``draw_subsets``).
        outputs: (M, Q) model outputs of the retrained LoRAs (``retrained_outputs``).
        bootstrap: Resamples of the queries for the 95 % interval.
        seed: Seed of the bootstrap.

    Returns:
        ``{"lds": mean over queries, "ci": [low, high] 95 % bootstrap interval, "per_query": (Q,) list with
        nan for dropped queries, "queries": queries kept}``; lds and ci are nan when no query is kept.
    """
    predictions = -(masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T)  # (M, Q)
    per_query = np.array([spearman(predictions[:, q], outputs[:, q]) for q in range(outputs.shape[1])])
    valid = per_query[~np.isnan(per_query)]
    if valid.size == 0:
        return {"lds": float("nan"), "ci": [float("nan")] * 2, "per_query": per_query.tolist(), "queries": 0}
    rng = np.random.default_rng(seed)
    means = valid[rng.integers(0, valid.size, size=(bootstrap, valid.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"lds": float(valid.mean()), "ci": [float(low), float(high)], "per_query": per_query.tolist(),
            "queries": int(valid.size)}


def oracle_scores(masks: np.ndarray, outputs: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Attributions fitted to the retrained outputs themselves (a ridge linear datamodel per query,
    with intercept): the best any method could do on these subsets.

    Args:
        masks: (M, N) bool subset masks.
        outputs: (M, Q) model outputs of the retrained LoRAs.
        ridge: Ridge penalty of the fit (on the intercept too).

    Returns:
        (Q, N) float64 scores in the method convention (yhat = -mask @ score).
    """
    x = masks.astype(np.float64)
    x = np.hstack([x, np.ones((x.shape[0], 1))])
    gram = x.T @ x + ridge * np.eye(x.shape[1])
    beta = np.linalg.solve(gram, x.T @ outputs)  # (N + 1, Q)
    return -beta[:-1].T


@torch.no_grad()
def model_outputs(pipe: StableDiffusionPipeline, latents: torch.Tensor, cond: torch.Tensor | Conditioning, keys: list[str],
                  settings: LDSSettings, batch_size: int = 64) -> np.ndarray:
    """L_simple of each query, averaged over the timestep grid and noise draws (fixed per query key):
    the squared error to the scheduler's training target (docs/method.md §2, §15).

    All (query, timestep, draw) rows go through the UNet in batches: one row's noise depends only on
    its key and timestep, so batching changes nothing but float rounding.

    Args:
        pipe: The pipeline with the (retrained) LoRA loaded; its scheduler config gives the noise
            schedule and the prediction type.
        latents: (Q, 4, h, w) clean query latents x_0.
        cond: The queries' prompt conditioning: (Q, tokens, dim) text states or an SDXL ``Conditioning``.
        keys: One stable id per query; with the timestep it fixes the noise draws.
        settings: Gives ``output_timesteps``, ``output_noise_draws`` and ``output_seed``.
        batch_size: UNet rows per batch (whole (query, timestep) groups of draws, at least one).

    Returns:
        (Q,) float64 averaged L_simple.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod
    target_kind = prediction_type(pipe)
    timesteps = uniform_grid(settings.output_timesteps, scheduler.config.num_train_timesteps)
    unet, device = pipe.unet, pipe.unet.device
    draws = settings.output_noise_draws
    rows = [(q, t) for q in range(len(keys)) for t in timesteps]  # each with `draws` noise draws
    losses = np.zeros((len(keys), len(timesteps)))
    per_batch = max(1, batch_size // draws)
    for start in range(0, len(rows), per_batch):
        chunk = rows[start:start + per_batch]
        noise = torch.cat([_output_noise(settings.output_seed, keys[q], t, draws, latents.shape[1:]) for q, t in chunk])
        q_idx = torch.tensor([q for q, _ in chunk]).repeat_interleave(draws)
        t_idx = torch.tensor([t for _, t in chunk]).repeat_interleave(draws)
        noisy = noisy_latents(latents[q_idx], noise, t_idx, alphas)
        pred = unet(noisy.to(device), t_idx.to(device), **unet_kwargs(cond[q_idx].to(device), unet.dtype)).sample
        target = training_target(target_kind, latents[q_idx], noise, t_idx, alphas)
        per_row = ((pred.float().cpu() - target) ** 2).mean(dim=(1, 2, 3)).view(len(chunk), draws).mean(1)
        for (q, t), value in zip(chunk, per_row.tolist()):
            losses[q, timesteps.index(t)] = value
    return losses.mean(axis=1)


def _output_noise(seed: int, key: str, t: int, draws: int, shape) -> torch.Tensor:
    return torch.randn((draws, *shape), generator=generator(f"das-sd-lds:{seed}:{key}:{t}", drop_low_bit=True))


def cached_outputs(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Outputs of one retrained LoRA, computed once and kept as JSON beside it (resumable runs).

    Args:
        path: The JSON cache file; read when it exists, else written.
        compute: Computes the outputs when the file is not there yet.

    Returns:
        The (Q,) outputs, from the file or from ``compute``.
    """
    if path.is_file():
        return np.array(json.loads(path.read_text())["outputs"])
    values = compute()
    atomic_write_json(path, {"outputs": [float(v) for v in values]})
    return values



# ---------------------------------------------------------------------------------------------
# The run: retrain on every subset (cached, in worker processes), measure outputs, score methods

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


def retrain_subsets(base: Path, dataset: Dataset, masks: np.ndarray, recipe: LoraRecipe, workdir: Path,
                    repeats: int = 1, workers: int = 1, progress: bool = True,
                    ray_address: str | None = None) -> list[list[Path]]:
    """Retrain the LoRA on every subset and repeat (finished ones are kept, see ``run_training_jobs``).

    Args:
        base: Folder of the base model.
        dataset: The full training dataset, in store row order (the masks' columns).
        masks: (M, N) bool subset masks.
        recipe: The attributed LoRA's recipe; repeat r on subset j trains with ``subset_seed``.
        workdir: Run folder; LoRAs go to ``subset-JJJ/seed-R`` under it.
        repeats: LoRAs per subset.
        workers: Parallel trainings.
        progress: Show a progress bar.
        ray_address: Ray cluster to train on ("" for a local one); None: no Ray.

    Returns:
        The LoRA folders, ``[subset][repeat]``.
    """
    keys = dataset.keys
    jobs, folders = [], []
    for j, mask in enumerate(masks):
        row = []
        for r in range(repeats):
            out = workdir / f"subset-{j:03d}" / f"seed-{r}"
            jobs.append(training_job(base, dataset, [k for k, m in zip(keys, mask) if m], out, recipe,
                                     subset_seed(recipe.seed, j, r)))
            row.append(out)
        folders.append(row)
    run_training_jobs(jobs, workers, progress, ray_address)
    return folders


def retrained_outputs(base: Path, folders: list[list[Path]], queries: LDSQueries, settings: LDSSettings,
                      progress: bool = True) -> np.ndarray:
    """Model outputs of every retrained LoRA on one query set (cached beside each LoRA).

    The base pipeline is loaded on the CPU only when some output is not cached yet; the prompts are
    encoded once by the base text encoder (docs/method.md §15).

    Args:
        base: Folder of the base model.
        folders: LoRA folders ``[subset][repeat]`` (``retrain_subsets``).
        queries: The query set.
        settings: Gives the output grid, noise draws and seed (``model_outputs``).
        progress: Show a progress bar.

    Returns:
        (M, Q) per subset, the mean over its repeats of each query's averaged L_simple.
    """
    from tqdm.auto import tqdm

    from ..latents import encode_prompts
    from ..models.loading import load_lora, load_pipeline

    pipe, cond = None, None
    rows = []
    for row in tqdm(folders, desc=f"outputs ({queries.name})", unit="subset", disable=not progress):
        values = []
        for folder in row:
            def compute(folder=folder):
                nonlocal pipe, cond
                if pipe is None:  # loaded only when some output is not cached yet
                    pipe = load_pipeline(base, device="cpu")
                    cond = encode_prompts(pipe, queries.prompts)  # the recipe's LoRA leaves the text encoder as is
                load_lora(pipe, folder, adapter_name="lds")
                try:
                    return model_outputs(pipe, queries.latents, cond, queries.keys, settings)
                finally:
                    pipe.delete_adapters("lds")
            values.append(cached_outputs(Path(folder) / f"outputs-{queries.name}-{_query_digest(queries, settings)}.json",
                                         compute))
        rows.append(np.mean(values, axis=0))
    return np.stack(rows)


def _query_digest(queries: LDSQueries, settings: LDSSettings) -> str:
    text = json.dumps([queries.keys, queries.prompts, settings.output_timesteps, settings.output_noise_draws,
                       settings.output_seed])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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


def lambda_curves(attributor: Attributor, parts: list[tuple], masks: np.ndarray, methods: list[str],
                  settings: LDSSettings) -> dict:
    """For every kernel method: LDS over the rho grid on the tune queries (pooled over the query
    sets) and on the reported ones, and the rho with the best tune LDS.

    Args:
        attributor: The attributor of the store; its kernels are solved again at each rho.
        parts: Per query set, ``(tune features or None, tune outputs (M, Q_t) or None, reported features,
            reported outputs (M, Q_r), set name)``; features as from ``Attributor.query_features``.
        masks: (M, N) bool subset masks.
        methods: Methods to evaluate; those without a kernel are skipped.
        settings: Gives ``rho_grid`` and ``bootstrap``.

    Returns:
        Per kernel method, ``{"points": [{"rho", "lambda", "tune": pooled tune LDS (nan without tune
        queries), "report": {set name: ``lds`` summary}}], "chosen_rho": best tune rho, or None}``.
    """
    from ..registry import method
    from ..score import LambdaRule, gram, index_in_memory, raw_scores, train_array

    kernel_methods = [m for m in methods if method(m).kernel]
    kernels = {fs: gram(attributor.store, fs) for fs in {method(m).feature_set for m in kernel_methods}}
    curves: dict[str, dict] = {m: {"points": []} for m in kernel_methods}
    for rho in settings.rho_grid:
        solved = {fs: index_in_memory(attributor.store, fs, LambdaRule(rho=rho), kernel)
                  for fs, kernel in kernels.items()}
        for name in kernel_methods:
            fs = method(name).feature_set
            info, arrays = solved[fs]
            psi = arrays[train_array(name)[1]]
            tune_values, point = [], {"rho": rho, "lambda": info["lambda"], "report": {}}
            for t_feat, t_out, r_feat, r_out, set_name in parts:
                if t_feat is not None:
                    tune = lds(ranking(name, raw_scores(t_feat[fs], psi)).double().numpy(), masks, t_out, 10)
                    tune_values += [v for v in tune["per_query"] if not np.isnan(v)]
                point["report"][set_name] = lds(ranking(name, raw_scores(r_feat[fs], psi)).double().numpy(),
                                                masks, r_out, settings.bootstrap)
            point["tune"] = float(np.mean(tune_values)) if tune_values else float("nan")
            curves[name]["points"].append(point)
    for name, curve in curves.items():
        tuned = [p for p in curve["points"] if not np.isnan(p["tune"])]
        curve["chosen_rho"] = max(tuned, key=lambda p: p["tune"])["rho"] if tuned else None
    return curves


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


def retraining_plan(attributor: Attributor, recipe: LoraRecipe, settings: LDSSettings) -> dict:
    """What the retrained LoRAs of a run folder depend on: the subset rule, the recipe, the base model
    and the training rows. Not the store's featurizer settings, so that every store of the same
    fine-tune (ablations) is scored from the same retrained models; not M, so that a run can grow
    (subset j is the same draw for any M >= j + 1).

    Args:
        attributor: The attributor of the store (base fingerprint and training rows).
        recipe: The attributed LoRA's recipe.
        settings: Gives the subset rule (``fraction``, ``repeats``, ``subset_seed``).

    Returns:
        The plan as a JSON-ready dict, as it reads back from plan.json.
    """
    identity = attributor.store.identity
    return json.loads(json.dumps({
        "subsets": {"fraction": settings.fraction, "repeats": settings.repeats, "subset_seed": settings.subset_seed},
        "recipe": asdict(recipe), "base_fingerprint": identity["base_fingerprint"],
        "rows": attributor.store.keys_digest()}))  # as it reads back from plan.json


def check_retraining_plan(workdir: Path, plan: dict) -> None:
    """Refuse a run folder made for other retrained LoRAs, else create it and write its plan.json.

    Args:
        workdir: The run folder.
        plan: The run's plan (``retraining_plan``).

    Raises:
        ValueError: When ``workdir`` holds a plan.json that differs from ``plan`` (naming the fields).
    """
    plan_file = workdir / "plan.json"
    if plan_file.is_file():
        held = json.loads(plan_file.read_text())
        if held != plan:
            differs = sorted(k for k in set(held) | set(plan) if held.get(k) != plan.get(k))
            raise ValueError(f"{workdir}: holds an LDS run with other retraining settings ({', '.join(differs)} "
                             "differ); use another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, plan)
