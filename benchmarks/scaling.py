"""Scaling of featurization over processes: one process vs a local Ray cluster of N workers.

    python benchmarks/scaling.py [--workers 2] [--limit 128]

Featurizes the first --limit images of the demo set (all three feature sets, default settings)
  single-1   one process, one thread
  single-T   one process, all cores' threads (the default)
  ray-N      `das-sd featurize --ray --ray-workers N` (one thread per worker), parts then merge
each into a fresh store, timed end to end (model loading and Ray start-up included). Scaling
efficiency = time(single-1) / (N x time(ray-N)). Checks the Ray store against the single-process one.
Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402


def featurize(data: Path, lora: str, store: Path, threads: int | None, *extra: str) -> float:
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "das_sd.cli", "featurize", "--data", str(data), "--lora", lora,
           "--store", str(store), "--shard-size", "16", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=128)
    args = parser.parse_args()

    from das_sd.toy.demo import prepare_demo
    from das_sd.store import FeatureStore

    paths = prepare_demo(progress=False, with_store=False)
    work = Path(tempfile.mkdtemp(prefix="das-sd-scaling-"))
    data = work / "data"
    data.mkdir()
    lines = (Path(paths["data"]) / "metadata.jsonl").read_text().splitlines()[:args.limit]
    for line in lines:
        name = json.loads(line)["file_name"]
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(paths["data"]) / name, data / name)
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    cores = os.cpu_count() or 1
    times = {"single-1": featurize(data, paths["lora"], work / "s1", 1),
             f"single-{cores}": featurize(data, paths["lora"], work / "sT", cores),
             f"ray-{args.workers}": featurize(data, paths["lora"], work / "ray", None, "--ray", "--ray-workers",
                                              str(args.workers))}
    for name, seconds in times.items():
        print(f"{name:10s} {seconds:7.1f} s  ({len(lines) / seconds:.2f} images/s)")
    efficiency = times["single-1"] / (args.workers * times[f"ray-{args.workers}"])
    a, b = FeatureStore.open(work / "s1"), FeatureStore.open(work / "ray")
    same_rows = a.manifest["shards"] == b.manifest["shards"] or [s["keys"] for s in a.manifest["shards"]] == \
        [s["keys"] for s in b.manifest["shards"]]
    diff = max(float((a.load(n) - b.load(n)).norm() / a.load(n).norm()) for n in a.array_names())
    print(f"scaling efficiency ({args.workers} Ray workers vs one single-thread process): {efficiency:.2f}; "
          f"Ray store: same rows and shards {same_rows}, largest relative difference {diff:.1e}")
    path = save_results("scaling", {"images": len(lines), "workers": args.workers, "cores": cores,
                                    "seconds": times, "efficiency": efficiency, "same_rows": same_rows,
                                    "max_relative_difference": diff, "command": " ".join(sys.argv)})
    shutil.rmtree(work)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
