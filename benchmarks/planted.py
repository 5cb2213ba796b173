"""Planted ground truth beyond the demo: every method on planted sets drawn differently from it.

    OMP_NUM_THREADS=2 nice -n 15 python benchmarks/planted.py --workdir /tmp/planted \
        --presets thin-dark-end,faint-middle-4,thin-bright-16

For each preset (das_sd.toy.planted_config.PRESETS) it runs the command line as a user would, with
every setting at das-sd's default (nothing here is chosen on these sets): ``make-demo-data --preset``,
``train-lora`` (the default LoraRecipe), ``featurize`` (the default feature sets and settings),
``index`` (the default rho) and ``eval groundtruth`` on the tune and test splits, and measures
whether the LoRA draws the motifs at all (``motif_gain``). Each stage is
skipped when its output is already under --workdir, so an interrupted run resumes. Writes
benchmarks/results/planted-<preset>.json and prints a markdown table of every preset run so far.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, save_results  # noqa: E402

from das_sd.registry import DEFAULT_METHOD  # noqa: E402

SPLITS = ("tune", "test")


def das_sd(*args: str) -> str:
    """Run one das-sd command in a child process; its stdout (stderr passes through)."""
    cmd = [sys.executable, "-m", "das_sd.cli", *args]
    print("$ das-sd " + " ".join(args), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout


def motif_gain(data: Path, lora: Path, seeds: int = 4) -> dict:
    """Whether the LoRA draws each group's motif: per trigger word, how much closer to the motif
    colour the motif's pixels are than the rest (as tests/toy/test_demo.py scores the demo), with
    the LoRA minus without it, over the group's test-split prompts and ``seeds`` seeds each. Near 0:
    the motif was not learned, and the generations carry nothing of the exemplars but the trigger word."""
    import numpy as np

    from das_sd.data.ground_truth import load_ground_truth
    from das_sd.evaluate.groundtruth import queries_for
    from das_sd.generation import GenerationSettings, generate
    from das_sd.models.loading import load_lora, load_pipeline
    from das_sd.toy.planted import MOTIF_COLOURS, MOTIF_KINDS
    from das_sd.toy.render import SUPERSAMPLE, _grid, motif_mask

    truth = load_ground_truth(data)
    settings = truth.get("settings", {})
    colour = np.array(MOTIF_COLOURS[settings.get("motif_colour", "magenta")], dtype=np.float64)
    width = MOTIF_KINDS[settings.get("motif_kind", "overlay")]
    pipe = load_pipeline(device="cpu")
    load_lora(pipe, lora / "pytorch_lora_weights.safetensors")
    gains = {}
    for group in truth["groups"]:
        scores = {}
        for scale in (0.0, 1.0):
            values = []
            for q in (q for q in queries_for(truth, "test") if q.trigger == group["trigger"]):
                for image in generate(pipe, GenerationSettings(prompt=q.prompt, seed=q.seed, num_images=seeds,
                                                               lora_scale=scale)).images:
                    img = np.asarray(image, dtype=np.float64)
                    n = img.shape[0]
                    x, y = _grid(n)
                    cover = motif_mask(group["motif"], x, y, n, width).reshape(n, SUPERSAMPLE, n, SUPERSAMPLE)
                    mask = cover.mean(axis=(1, 3)) >= 0.5
                    closeness = 1.0 - np.sqrt(((img - colour) ** 2).sum(-1)) / np.sqrt(3 * 255.0**2)
                    values.append(closeness[mask].mean() - closeness[~mask].mean())
            scores[scale] = float(np.mean(values))
        gains[group["trigger"]] = round(scores[1.0] - scores[0.0], 4)
    return {"per_group": gains, "mean": round(float(np.mean(list(gains.values()))), 4)}


def run_preset(name: str, workdir: Path) -> dict:
    """Data, LoRA, store and both splits' ground-truth reports of one preset (resuming what exists)."""
    from das_sd.toy.planted_config import preset

    config = preset(name)
    root = workdir / name
    data, lora, store = root / "data", root / "lora", root / "store"
    previous = RESULTS / f"planted-{name}.json"  # a resumed run keeps the timings of the stages it skips
    wall: dict[str, float] = json.loads(previous.read_text())["wall_seconds"] if previous.is_file() else {}

    def stage(label: str, done: bool, *args: str) -> str | None:
        if done:
            return None
        start = time.time()
        out = das_sd(*args)
        wall[label] = round(time.time() - start, 1)
        return out

    stage("data", (data / "ground_truth.json").is_file(), "make-demo-data", str(data), "--preset", name, "--overwrite")
    stage("train", (lora / "lora_record.json").is_file(), "train-lora", "--data", str(data), "--out", str(lora))
    stage("featurize", (store / "manifest.json").is_file(), "featurize", "--data", str(data),
          "--lora", str(lora), "--store", str(store), "--device", "cpu")
    stage("index", False, "index", "--store", str(store))
    reports = {}
    for split in SPLITS:
        path = root / f"eval-{split}.json"
        if not path.is_file():
            out = stage(f"eval-{split}", False, "eval", "groundtruth", "--store", str(store), "--split", split,
                        "--json", "--device", "cpu")
            path.write_text(out[out.index("{"):])
        reports[split] = json.loads(path.read_text())
    gain_path = root / "motif-gain.json"
    if not gain_path.is_file():
        start = time.time()
        gain_path.write_text(json.dumps(motif_gain(data, lora)))
        wall["motif-gain"] = round(time.time() - start, 1)
    lora_record = json.loads((lora / "lora_record.json").read_text())
    indexes = json.loads((store / "manifest.json").read_text()).get("indexes", {})
    return {"preset": name, "default_method": DEFAULT_METHOD,
            "lambda_rule": {fs: index.get("lambda_rule") for fs, index in indexes.items()}, "settings": json.loads((data / "ground_truth.json").read_text())["settings"]
            if name != "demo" else {}, "images": config.total, "background_share": round(config.background_share, 4),
            "lora_recipe": lora_record.get("recipe", {}), "wall_seconds": wall, "ground_truth": reports,
            "motif_gain": json.loads(gain_path.read_text())}


def table(results: list[dict]) -> str:
    """The markdown table: per preset and method, Recall@10 and mAP on the tune and test splits."""
    lines = ["| preset | images (background share) | group size | motif gain | method | R@10 tune | mAP tune "
             "| R@10 test | mAP test | chance AP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tune, test = r["ground_truth"]["tune"], r["ground_truth"]["test"]
        group = next(iter(test["groups"].values()))
        for i, (method, m) in enumerate(test["methods"].items()):
            t = tune["methods"][method]
            gain = r.get("motif_gain", {}).get("mean")
            head = (f"{r['preset']} | {r['images']} ({r['background_share']:.2f}) | {group} | "
                    + ("" if gain is None else f"{gain:+.3f}") if i == 0 else " | | | ")
            lines.append(f"| {head} | {method} | {t['recall@10']:.2f} | {t['ap']:.2f} | {m['recall@10']:.2f} "
                         f"| {m['ap']:.2f} | {test['chance_ap']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="data, LoRAs and stores go here (resumed)")
    parser.add_argument("--presets", default="thin-dark-end,faint-middle-4,thin-bright-16",
                        help="comma-separated preset names")
    args = parser.parse_args()
    from das_sd.toy.planted_config import PRESETS

    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; expected some of {sorted(PRESETS)}")
    results = []
    for name in names:
        result = run_preset(name, Path(args.workdir).expanduser().resolve())
        save_results(f"planted-{name}", result)
        results.append(result)
        print(table(results), flush=True)
    # every preset with saved results, so the table covers runs made separately
    saved = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("planted-*.json"))]
    print("\nAll saved planted results:\n" + table(saved))


if __name__ == "__main__":
    main()
