"""What low-precision index storage does to the rankings, on the demo store.

    DAS_SD_HOME=... python benchmarks/quantization.py [--workdir /tmp/das-sd-quant]

Copies the demo store, rebuilds its indexes (same lambda rule) with float32, float16 and int8
train-side vectors, and scores the planted ground-truth queries of both splits (generated once) with
each: Recall@10 and mAP per method, the overlap of each query's top-10 with the float32 top-10, and
the largest relative score change. Writes benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RANKED_METHODS, ground_truth_generations, ranking_effect, save_results  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/das-sd-quant")
    args = parser.parse_args()

    from das_sd.attribute import Attributor
    from das_sd.toy.demo import prepare_demo
    from das_sd.score import LambdaRule, build_index
    from das_sd.store import FeatureStore

    demo = prepare_demo()
    copy = Path(args.workdir) / "store"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(demo["store"], copy)
    base = Attributor(copy)
    generations = ground_truth_generations(base.pipe, demo["data"])
    results, reference = {}, {}
    for label, dtype in DTYPES.items():
        store = FeatureStore.open(copy)
        for name in store.identity["feature_sets"]:
            build_index(store, name, LambdaRule.from_description(store.index_info(name)["lambda_rule"]), dtype)
        index_bytes = sum(p.stat().st_size for p in copy.glob("index-*.safetensors"))
        row = {"index_bytes": index_bytes} | ranking_effect(Attributor(copy, pipe=base.pipe), demo["data"],
                                                             generations, RANKED_METHODS, reference)
        row["vs_float32"] = row.pop("vs_reference")
        results[label] = row
        print(label, index_bytes, {m: (row["groundtruth"]["test"][m]["recall@10"], row["groundtruth"]["test"][m]["ap"],
                                       row["vs_float32"][m]["top10_overlap_mean"]) for m in RANKED_METHODS}, flush=True)
    print(save_results("quantization", {"queries": sum(len(g) for g in generations.values()),
                                        "methods": RANKED_METHODS, "results": results}))


if __name__ == "__main__":
    main()
