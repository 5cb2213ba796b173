"""The evaluation benchmark on the demo: ground truth, LDS, counterfactuals and ablations, one run.

    DAS_SD_HOME=/tmp/bench-home python benchmarks/evaluation.py --workdir /tmp/bench6 [--subsets 64]

Uses the demo (embedded tiny SD, demo LoRA and store; built on first use) and writes held-out val
images (the demo generator with another seed) under --workdir. Every stage caches under --workdir
(retrained LoRAs, outputs, variant stores), so an interrupted run resumes and a rerun only
re-scores. Writes benchmarks/results/eval-demo.json (configuration, wall time per stage, results),
benchmarks/BENCHMARKS.md (the tables) and the PNG plots (benchmarks/plots.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_results  # noqa: E402

from das_sd.argtypes import positive_float_list  # noqa: E402

GEN_PROMPTS = [  # three trigger words and the three styles, on subjects outside both query splits
    "zorblat, a red circle on a blue background",
    "quimvex, a white triangle on a green background",
    "drelkin, a yellow square on a purple background",
    "a green circle on a black background, striped style",
    "a blue square on a white background, checkered style",
    "a red triangle on a yellow background, dotted style",
]
# counterfactuals: two trigger words (exemplar groups of 8) and two styles (72 images each)
COUNTERFACTUAL_PROMPTS = [GEN_PROMPTS[0], GEN_PROMPTS[1], GEN_PROMPTS[3], GEN_PROMPTS[4]]
COUNTERFACTUAL_METHODS = ["das", "dtrak", "trak", "tracin", "latent-sim"]


def stage(out: dict, log: dict, name: str, fn, results_name: str) -> None:
    """Run one stage, time it, and save what the run has so far (a later crash loses nothing)."""
    start = time.time()
    out[name] = fn()
    log[name] = round(time.time() - start, 1)
    print(f"[{name}] {log[name]:.0f} s", flush=True)
    save_results(results_name, json.loads(json.dumps(out | {"wall_seconds": log}, default=str)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument("--val-limit", type=int, default=64)
    parser.add_argument("--val-seed", type=int, default=7, help="demo generator seed of the held-out val images")
    parser.add_argument("--gen-seeds", type=int, default=2)
    parser.add_argument("--output-timesteps", type=int, default=20)
    parser.add_argument("--output-noise-draws", type=int, default=2)
    parser.add_argument("--counterfactual-seeds", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rho-grid", type=positive_float_list, default=None,
                        help="rho values tried per kernel method on the LDS tune queries (comma-separated; "
                             "default: LDSSettings.rho_grid)")
    parser.add_argument("--name", default="eval-demo", help="results name (benchmarks/results/NAME.json; "
                        "report benchmarks/BENCHMARKS.md, or BENCHMARKS-NAME.md for another name)")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: counterfactual,ablations")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from das_sd.attribute import Attributor
    from das_sd.toy.demo_data import DemoConfig, make_demo_data
    from das_sd.toy.demo import prepare_demo
    from das_sd.evaluate.ablations import run_ablations
    from das_sd.evaluate.counterfactual import CounterfactualSettings, run_counterfactual
    from das_sd.evaluate.groundtruth import evaluate_ground_truth
    from das_sd.evaluate.lds import run_lds
    from das_sd.evaluate.lds_queries import gen_queries, val_queries
    from das_sd.evaluate.lds_settings import LDSSettings

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started, wall = time.time(), {}
    demo = prepare_demo()
    attributor = Attributor(demo["store"])
    val_dir = work / "val"
    if not (val_dir / "metadata.jsonl").is_file():
        make_demo_data(val_dir, DemoConfig(seed=args.val_seed), overwrite=True)

    out: dict = {"config": {
        "store": demo["store"], "store_settings": attributor.store.identity["feature_sets"]["das"],
        "lds": {"subsets": args.subsets, "val": f"{args.val_limit} held-out demo-style images (demo generator, seed {args.val_seed})",
                "gen": f"{len(GEN_PROMPTS)} prompts x {args.gen_seeds} seeds", "output_timesteps": args.output_timesteps,
                "output_noise_draws": args.output_noise_draws, "tune_fraction": 0.5},
        "counterfactual": {"prompts": COUNTERFACTUAL_PROMPTS, "seeds": args.counterfactual_seeds, "top_k": args.top_k},
        "workers": args.workers, "workdir": str(work),
        "command": "DAS_SD_HOME=... python benchmarks/evaluation.py " + " ".join(sys.argv[1:])}}

    stage(out, wall, "groundtruth", lambda: {
        split: evaluate_ground_truth(attributor, demo["data"], split=split, progress=True)
        for split in ("tune", "test")}, args.name)

    lds_settings = LDSSettings(subsets=args.subsets, output_timesteps=args.output_timesteps,
                               output_noise_draws=args.output_noise_draws,
                               **({} if args.rho_grid is None else {"rho_grid": tuple(args.rho_grid)}))
    queries = [val_queries(attributor, val_dir, args.val_limit), gen_queries(attributor, GEN_PROMPTS, args.gen_seeds)]
    stage(out, wall, "lds", lambda: run_lds(attributor, work / "lds", queries, lds_settings,
                                                     workers=args.workers), args.name)

    if "ablations" not in skip:
        lds_run = {"workdir": work / "lds", "queries": queries, "settings": lds_settings, "workers": args.workers}
        stage(out, wall, "ablations", lambda: run_ablations(
            attributor, work / "ablations", None, demo["data"], lds_run), args.name)

    if "counterfactual" not in skip:
        settings = CounterfactualSettings(top_k=args.top_k)
        stage(out, wall, "counterfactual", lambda: run_counterfactual(
            attributor, work / "counterfactual", COUNTERFACTUAL_PROMPTS, args.counterfactual_seeds, settings,
            COUNTERFACTUAL_METHODS, workers=args.workers), args.name)

    wall["total"] = round(time.time() - started, 1)
    out["wall_seconds"] = wall
    path = save_results(args.name, json.loads(json.dumps(out, default=str)))
    print(path)
    lds_path = RESULTS / f"{args.name}-lds.json"
    lds_path.write_text(json.dumps(out["lds"], indent=2) + "\n")
    try:
        from plots import draw

        draw(lds_path)
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plots")
    from report import write_report

    print(write_report(args.name))


if __name__ == "__main__":
    main()
