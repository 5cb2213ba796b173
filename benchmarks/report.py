"""benchmarks/BENCHMARKS.md from the results JSON (benchmarks/results/eval-demo.json).

    python benchmarks/report.py [NAME]     # another run: results/NAME.json -> BENCHMARKS-NAME.md

Tables: planted ground truth per method and split, LDS per method and query set (with the lambda
chosen on held-out queries and a paired bootstrap of the default method against every other method), counterfactual
removal, ablations. The verdict lines are computed from the numbers, not written by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT  # noqa: E402

from das_sd.registry import DEFAULT_METHOD, DEFAULT_RHO  # noqa: E402

OUT = ROOT / "benchmarks" / "BENCHMARKS.md"


def paired_difference(a: list[float], b: list[float], draws: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over queries (both defined) and its bootstrap 95 % interval (queries resampled)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(draws, d.size))].mean(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def groundtruth_section(gt: dict) -> list[str]:
    lines = ["## Planted ground truth", "",
             f"{gt['test']['queries']} generations per split ({len(gt['test']['groups'])} trigger words x 3 subjects, "
             f"8 exemplars each, chance AP {gt['test']['chance_ap']:.3f}). Settings were chosen on the tune split; "
             "the test split is what is reported elsewhere.", "",
             "| method | R@5 tune | R@10 tune | mAP tune | R@5 test | R@10 test | mAP test |", "|---|---|---|---|---|---|---|"]
    for name in gt["test"]["methods"]:
        t, s = gt["tune"]["methods"][name], gt["test"]["methods"][name]
        lines.append(f"| {name} | {t['recall@5']:.3f} | {t['recall@10']:.3f} | {t['ap']:.3f} | "
                     f"{s['recall@5']:.3f} | {s['recall@10']:.3f} | {s['ap']:.3f} |")
    best = max(gt["test"]["methods"], key=lambda m: gt["test"]["methods"][m]["ap"])
    lines += ["", f"Best test mAP: **{best}** ({gt['test']['methods'][best]['ap']:.3f}).", ""]
    return lines


def lds_section(lds: dict) -> list[str]:
    m = lds["plan"]["settings"]["subsets"]
    lines = ["## Linear Datamodeling Score", "",
             f"M = {m} random half subsets, one LoRA retrained per subset with the demo LoRA's recipe and seed rule; "
             "output = L_simple averaged over "
             f"{lds['plan']['settings']['output_timesteps']} timesteps x {lds['plan']['settings']['output_noise_draws']} "
             "noise draws. lambda (rho) chosen per kernel method on a held-out half of each query set, "
             "reported on the other half. Bootstrap 95 % intervals over queries. The oracle is a linear "
             "datamodel fitted to the very outputs it is scored on (a check that the outputs are consistent; with "
             "M below the number of training images it fits them exactly, so it is not a ceiling).", ""]
    for set_name, block in lds["query_sets"].items():
        reference = DEFAULT_METHOD if DEFAULT_METHOD in block["lds"] else "das"
        lines += [f"### {set_name} queries ({block['queries']} reported, {block['tune_queries']} held out for lambda)", "",
                  f"| method | LDS | 95 % CI | rho | {reference} minus method (paired, 95 % CI) |", "|---|---|---|---|---|"]
        ref = block["lds"].get(reference)
        for name, r in block["lds"].items():
            rho = lds["lambda"].get(name, {}).get("chosen_rho")
            diff = ""
            if ref is not None and name != reference and not name.startswith("oracle"):
                d, lo, hi = paired_difference(ref["per_query"], r["per_query"])
                diff = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            lines.append(f"| {name} | {r['lds']:.3f} | [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | "
                         f"{'' if rho is None else f'{rho:g}'} | {diff} |")
        methods = [n for n in block["lds"] if not n.startswith("oracle")]
        best = max(methods, key=lambda n: block["lds"][n]["lds"])
        lines += ["", verdict(block, best, reference), ""]
    lines += defaults_section(lds)
    return lines


def store_rho(lds: dict, method: str, set_name: str) -> float | None:
    """The rho of the store's own index for ``method``: the point of the rho curve whose reported LDS is
    the store-lambda LDS (the curve is computed on the same queries and outputs)."""
    value = lds["query_sets"][set_name]["lds_store_lambda"][method]["lds"]
    points = lds["lambda"].get(method, {}).get("curve", [])
    return next((p["rho"] for p in points if p["report"].get(set_name) == value), None)


def defaults_section(lds: dict) -> list[str]:
    """Every method as das-sd scores by default: the store's own index (its default rho), no rho chosen
    per method; paired differences of the default method against the others."""
    lines = ["### At the store's own lambda (das-sd's defaults when the store was indexed at the default rho)", "",
             "The same queries and outputs, every kernel method scored with the index the store was built with "
             f"(its rho in the table; the default is {DEFAULT_RHO:g}), nothing chosen per method. Paired 95 % CIs of "
             f"the default method ({DEFAULT_METHOD}) minus each other method.", "",
             "| method | rho | " + " | ".join(f"{n} LDS [95 % CI] | {DEFAULT_METHOD} minus method"
                                          for n in lds["query_sets"]) + " |",
             "|---|---|" + "---|---|" * len(lds["query_sets"])]
    sets = list(lds["query_sets"].items())
    for name in sets[0][1]["lds_store_lambda"]:
        rho = store_rho(lds, name, sets[0][0]) if name in lds["lambda"] else None
        cells = []
        for _, block in sets:
            r, ref = block["lds_store_lambda"][name], block["lds_store_lambda"].get(DEFAULT_METHOD)
            diff = ""
            if ref is not None and name != DEFAULT_METHOD:
                d, lo, hi = paired_difference(ref["per_query"], r["per_query"])
                diff = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            cells += [f"{r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]", diff]
        lines.append(f"| {name} | {'' if rho is None else f'{rho:g}'} | " + " | ".join(cells) + " |")
    return lines + [""]


def verdict(block: dict, best: str, reference: str) -> str:
    """The highest LDS, and whether ``reference`` (the default method) beats D-TRAK and TRAK with a paired
    95 % interval that excludes 0."""
    r = block["lds"]
    text = f"Highest LDS: **{best}** ({r[best]['lds']:.3f})."
    for other in ("dtrak", "trak"):
        if reference not in r or other not in r:
            continue
        d, lo, hi = paired_difference(r[reference]["per_query"], r[other]["per_query"])
        if lo > 0:
            text += f" {reference} beats {other} by {d:+.3f} (paired 95 % CI [{lo:+.3f}, {hi:+.3f}] excludes 0)."
        elif hi < 0:
            text += f" {other} beats {reference} by {-d:+.3f} (paired 95 % CI of {reference} - {other} [{lo:+.3f}, {hi:+.3f}])."
        else:
            text += (f" {reference} - {other} = {d:+.3f}, paired 95 % CI [{lo:+.3f}, {hi:+.3f}] includes 0: "
                     "this run does not separate them.")
    return text


def counterfactual_section(cf: dict) -> list[str]:
    lines = ["## Counterfactual removal", "",
             f"{cf['generations']} generations; for each, the top-{cf['top_k']} of a method removed, the LoRA retrained "
             "with the same recipe and seed, the generation redone with the same seed. Median distance to the "
             "original (larger = the removed images mattered more).", "",
             "| removed | median pixel RMS | median latent L2 |", "|---|---|---|"]
    for name, r in sorted(cf["median"].items(), key=lambda kv: -kv[1]["latent"]):
        lines.append(f"| {name} | {r['pixel']:.4f} | {r['latent']:.3f} |")
    control = cf["median"]["random (control)"]["latent"]
    beaten = [n for n, r in cf["median"].items() if n in cf["plan"]["methods"] and r["latent"] > control]
    lines += ["", f"{len(beaten)} of {len(cf['plan']['methods'])} methods move the generation further than removing "
              f"{cf['top_k']} random images (latent L2 {control:.3f}); the gap to the control is small where "
              "retraining on any changed dataset already moves the generation a lot."]
    return lines + [""]


def ablation_section(ab: dict) -> list[str]:
    from das_sd.evaluate.ablations import ablation_table

    base = ab["base_settings"]
    lines = ["## Ablations", "",
             f"One option changed at a time from the demo store's das settings (f = {base['output']}, normalisation "
             f"{'on' if base['normalize'] else 'off'}, residual {base['residual']}, K = {base['num_timesteps']}, "
             f"k = {base['projection_dim']}, {base['projector']} projection); the same instruments and the same "
             "retrained LoRAs for every row.", "", ablation_table(ab), ""]
    return lines


def write_report(name: str = "eval-demo") -> Path:
    path = RESULTS / f"{name}.json"
    out = OUT if name == "eval-demo" else OUT.with_name(f"BENCHMARKS-{name}.md")
    results = json.loads(path.read_text())
    cfg, wall = results["config"], results.get("wall_seconds", {})
    lines = ["# das-sd evaluation benchmark (demo)", "",
             f"Generated by `python benchmarks/report.py{'' if name == 'eval-demo' else ' ' + name}` from "
             f"`{path.relative_to(ROOT)}` ({results['date']}, "
             f"torch {results['torch']}, {results['threads']} threads). Produced by `{cfg['command']}`; wall time "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()) + ".", ""]
    lines += groundtruth_section(results["groundtruth"])
    if "lds" in results:
        lines += lds_section(results["lds"])
        lines += [f"![LDS per method](results/{name}-lds.png)", "", f"![LDS over rho](results/{name}-lambda.png)", ""]
    if "counterfactual" in results:
        lines += counterfactual_section(results["counterfactual"])
    if "ablations" in results:
        lines += ablation_section(results["ablations"])
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    print(write_report(*sys.argv[1:2]))
