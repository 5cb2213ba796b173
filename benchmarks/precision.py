"""What computing features under bfloat16 autocast does to speed and rankings, on the demo.

    DAS_SD_HOME=... python benchmarks/precision.py [--workdir /tmp/das-sd-precision]

Builds the demo feature store twice from the same data and LoRA, in float32 and under bfloat16
autocast (as `das-sd featurize --autocast bf16`), and indexes both with the demo store's lambda
rules; a bfloat16 store featurizes its queries in bfloat16 too. Reports each build's wall time and,
on the planted ground-truth queries of both splits (generated once), Recall@10 and mAP per method,
the overlap of each query's top-10 with the float32 top-10 and the largest relative score change.
Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RANKED_METHODS, ground_truth_generations, ranking_effect, save_results  # noqa: E402

COMPUTE = {"float32": None, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/das-sd-precision")
    args = parser.parse_args()

    from das_sd.attribute import Attributor
    from das_sd.data.datasets import open_dataset
    from das_sd.toy.demo import prepare_demo
    from das_sd.featurize.build import default_feature_sets, featurize_dataset
    from das_sd.score import LambdaRule, build_index

    demo = prepare_demo()
    base = Attributor(demo["store"])
    dataset = open_dataset(demo["data"])
    generations = ground_truth_generations(base.pipe, demo["data"])
    results, reference = {}, {}
    for label, dtype in COMPUTE.items():
        folder = Path(args.workdir) / label
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        store = featurize_dataset(base.pipe, dataset, folder, Path(demo["base"]), Path(demo["lora"]),
                                  default_feature_sets(), resolution=base.resolution, autocast_dtype=dtype)
        seconds = time.perf_counter() - start
        for name in store.identity["feature_sets"]:
            build_index(store, name, LambdaRule.from_description(base.store.index_info(name)["lambda_rule"]))
        attributor = Attributor(folder, pipe=base.pipe)
        row = {"featurize_seconds": round(seconds, 2), "images": len(store.rows())}
        row |= ranking_effect(attributor, demo["data"], generations, RANKED_METHODS, reference)
        row["vs_float32"] = row.pop("vs_reference")
        results[label] = row
        print(label, f"{seconds:.1f} s", {m: (row["groundtruth"]["test"][m]["recall@10"],
                                              row["groundtruth"]["test"][m]["ap"],
                                              row["vs_float32"][m]["top10_overlap_mean"]) for m in RANKED_METHODS},
              flush=True)
    print(save_results("precision", {"queries": sum(len(g) for g in generations.values()), "methods": RANKED_METHODS,
                                     "results": results}))


if __name__ == "__main__":
    main()
