"""PNG plots of the evaluation results in benchmarks/results/ (needs matplotlib: pip install -e ".[bench]").

    python benchmarks/plots.py [--lds benchmarks/results/eval-demo-lds.json]

Writes, next to the JSON (NAME-lds.json): NAME-lds.png (LDS per method with its bootstrap 95 % interval, one panel
per query set) and NAME-lambda.png (LDS over rho per kernel method: held-out queries that choose
rho, and the reported queries).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_lds(results: dict, out: Path) -> None:
    sets = list(results["query_sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        block = results["query_sets"][name]
        methods = [m for m in block["lds"] if not m.startswith("oracle")]
        values = [block["lds"][m]["lds"] for m in methods]
        low = [v - block["lds"][m]["ci"][0] for m, v in zip(methods, values)]
        high = [block["lds"][m]["ci"][1] - v for m, v in zip(methods, values)]
        ax.barh(methods[::-1], values[::-1], xerr=[low[::-1], high[::-1]], color="#4a78b5", capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("LDS (Spearman), bootstrap 95 % CI")
        ax.set_title(f"{name}: {block['queries']} reported queries, M = {results['plan']['settings']['subsets']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_lambda(results: dict, out: Path) -> None:
    curves = results["lambda"]
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.2), squeeze=False, sharey=True)
    for ax, (name, c) in zip(axes[0], curves.items()):
        rho = [p["rho"] for p in c["curve"]]
        ax.plot(rho, [p["tune"] for p in c["curve"]], "o-", label="held out (chooses rho)")
        for set_name in c["curve"][0]["report"]:
            ax.plot(rho, [p["report"][set_name] for p in c["curve"]], "s--", label=f"reported: {set_name}")
        if c["chosen_rho"] is not None:
            ax.axvline(c["chosen_rho"], color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("rho (lambda = rho trace / min(N, k))")
        ax.set_title(name)
    axes[0][0].set_ylabel("LDS")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw(path: Path) -> list[Path]:
    """Both plots of an LDS results JSON, next to it: NAME-lds.json -> NAME-lds.png, NAME-lambda.png."""
    results = json.loads(path.read_text())
    stem = path.stem.removesuffix("-lds")
    outs = []
    for suffix, plot in (("lds", plot_lds), ("lambda", plot_lambda)):
        outs.append(path.with_name(f"{stem}-{suffix}.png"))
        plot(results, outs[-1])
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lds", default=str(Path(__file__).parent / "results" / "eval-demo-lds.json"))
    args = parser.parse_args()
    for out in draw(Path(args.lds)):
        print(out)


if __name__ == "__main__":
    main()
