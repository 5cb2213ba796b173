"""What the residual weights cost and how precisely T_E forward passes estimate them, on the demo.

    DAS_SD_HOME=... python benchmarks/residuals.py [--timesteps 10,25,50,100,200] [--truth 1000]

The residual weight e_i (docs/method.md §9) is a forward-only average over T_E timesteps; with
the default T_E = 100 it takes a third to a half of a demo store build. For every T_E given, on all
demo images: seconds per image, the spread of e across images (std / mean), its Pearson and
Spearman correlation with e at T_E = --truth, and what it does to the das rankings of the planted
ground-truth queries (both splits): Recall@10 and the overlap of each query's top-10 with the
rankings under e at T_E = --truth; "none" is e = 1 (D-TRAK's weighting). Scores are rescaled, not
recomputed: t_i is linear in e_i (psi_i = G^-1 phi_i e_i / (1 - h_i), h_i does not depend on e), so
DAS_i = t_i^2 moves with e_i^2. Checks first that the T_E of the store reproduces its stored e.
Writes benchmarks/results/residuals.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ground_truth_generations, save_results  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank = lambda x: torch.argsort(torch.argsort(x)).double()  # noqa: E731 (no ties in float residuals)
    return torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1].item()


def residual_weights(pipe, featurizer, store, batch_size: int = 16) -> tuple[torch.Tensor, float]:
    """(e over the store's rows in store order, seconds), from the stored latents and captions."""
    from das_sd.latents import encode_prompts

    rows = store.rows()
    latents = store.load("latents")
    start = time.perf_counter()
    parts = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        cond = encode_prompts(pipe, [r.caption for r in chunk])
        parts.append(featurizer.residuals(latents[i:i + batch_size], cond, [r.key for r in chunk]))
    return torch.cat(parts).double(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", default="10,25,50,100,200", help="T_E values to compare")
    parser.add_argument("--truth", type=int, default=1000, help="T_E of the yardstick estimate")
    args = parser.parse_args()

    from das_sd.attribute import Attributor
    from das_sd.data.datasets import open_dataset
    from das_sd.toy.demo import prepare_demo
    from das_sd.data.ground_truth import load_ground_truth
    from das_sd.evaluate.metrics import recall_at_k
    from das_sd.featurize.featurizer import Featurizer
    from das_sd.score import ranking

    demo = prepare_demo()
    attributor = Attributor(demo["store"])
    store = attributor.store
    settings = attributor.featurizers["das"].settings
    stored_e = store.load("residuals.das").double()

    estimates, seconds = {}, {}
    for te in sorted({int(t) for t in args.timesteps.split(",")} | {args.truth, settings.residual_timesteps}):
        featurizer = Featurizer(attributor.pipe, replace(settings, residual_timesteps=te))
        estimates[te], seconds[te] = residual_weights(attributor.pipe, featurizer, store)
        print(f"T_E = {te}: {seconds[te] / len(store):.4f} s per image", flush=True)
    check = ((estimates[settings.residual_timesteps] - stored_e).abs() / stored_e).max().item()
    print(f"stored e reproduced to {check:.1e} (T_E = {settings.residual_timesteps})")

    generations = ground_truth_generations(attributor.pipe, demo["data"])
    latents = torch.cat([lat for split in generations.values() for _, lat in split])
    queries = [q for split in generations.values() for q, _ in split]
    score = ranking("das", attributor.scores(latents, [q.prompt for q in queries], "das")).double()
    key_of = {s.relpath: s.key for s in open_dataset(demo["data"])}
    relevant = {g["trigger"]: {key_of[f] for f in g["files"]} for g in load_ground_truth(demo["data"])["groups"]}
    keys = store.keys()

    def rankings(e: torch.Tensor) -> torch.Tensor:
        return torch.argsort(score * (e / stored_e) ** 2, dim=1, descending=True)

    truth_top = rankings(estimates[args.truth])[:, :10]
    variants = {f"T_E={te}": e for te, e in estimates.items()} | {"none": torch.ones_like(stored_e)}
    truth_e = estimates[args.truth]
    results = {}
    for label, e in variants.items():
        ranked = rankings(e)
        overlap = [len(set(a) & set(b)) / 10 for a, b in zip(ranked[:, :10].tolist(), truth_top.tolist())]
        recall = [recall_at_k([keys[i] for i in r[:10]], relevant[q.trigger], 10)
                  for r, q in zip(ranked.tolist(), queries)]
        te = int(label.split("=")[1]) if label != "none" else None
        results[label] = {
            "seconds_per_image": seconds[te] / len(store) if te else 0.0,
            "spread_std_over_mean": (e.std() / e.mean()).item(),
            "pearson_vs_truth": torch.corrcoef(torch.stack([e, truth_e]))[0, 1].item() if te else None,
            "spearman_vs_truth": spearman(e, truth_e) if te else None,
            "top10_overlap_vs_truth_mean": sum(overlap) / len(overlap),
            "top10_overlap_vs_truth_min": min(overlap),
            "das_recall@10": sum(recall) / len(recall),
        }
        r = results[label]
        corr = f"pearson {r['pearson_vs_truth']:.3f} spearman {r['spearman_vs_truth']:.3f}" if te else "-"
        print(f"{label:10s} {r['seconds_per_image']:.4f} s/img  spread {r['spread_std_over_mean']:.4f}  {corr}  "
              f"top-10 overlap {r['top10_overlap_vs_truth_mean']:.3f} (min {r['top10_overlap_vs_truth_min']:.1f})  "
              f"Recall@10 {r['das_recall@10']:.3f}", flush=True)
    path = save_results("residuals", {"command": " ".join(sys.argv), "images": len(store), "queries": len(queries),
                                      "truth_timesteps": args.truth, "stored_e_check": check,
                                      "store_residual_timesteps": settings.residual_timesteps, "variants": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
