"""Attributing one generation against generating it, on the same device (demo defaults, with CFG).

    python benchmarks/query.py [--device cpu] [--repeats 5] [--method das]

Uses the demo (embedded tiny SD, demo LoRA, demo store; `das-sd demo --no-launch` builds them, and so
does this script on first use). Times, best of --repeats after a warm-up:
  generate   das_sd.generate() with the demo defaults (25 steps, guidance 4, so two UNet passes a step)
             and the VAE decode
  attribute  Attributor.attribute_latents on the final latents: the query's features for the
             method's feature set (K timesteps, forward + backward), scoring every training image
             and the top-10
Prints the ratio (target <= 0.5) and the split of the attribution time; writes
benchmarks/results/query.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="das")
    parser.add_argument("--out", default="query", help="results file name under benchmarks/results/")
    args = parser.parse_args()

    from das_sd.attribute import Attributor
    from das_sd.toy.demo import prepare_demo
    from das_sd.generation import GenerationSettings, generate

    paths = prepare_demo(progress=False)
    attributor = Attributor(paths["store"], device=args.device)
    pipe = attributor.pipe
    settings = GenerationSettings(prompt="zorblat, a red circle on a blue background", seed=1)
    result = generate(pipe, settings)
    latents, prompt = result.latents, settings.prompt

    generate_s = best_of(lambda: generate(pipe, settings), args.repeats)
    attribute_s = best_of(lambda: attributor.attribute_latents(latents, prompt, args.method, top_k=10), args.repeats)
    feature_set = [attributor.store.identity["feature_sets"][s] for s in ["das"]][0]
    features_s = best_of(lambda: attributor.query_features(latents, [prompt], feature_sets=["das"]), args.repeats)
    features = attributor.query_features(latents, [prompt], feature_sets=["das"])
    scoring_s = best_of(lambda: attributor.attribute_latents(latents, prompt, args.method, 10, features=features),
                        args.repeats)
    ratio = attribute_s / generate_s
    device = str(pipe.unet.device)
    print(f"device {device}; store of {len(attributor.store)} images, K = {feature_set['num_timesteps']}, "
          f"k = {feature_set['projection_dim']}")
    print(f"generate   {generate_s * 1000:8.1f} ms  ({settings.steps} steps, guidance {settings.guidance}, decode)")
    print(f"attribute  {attribute_s * 1000:8.1f} ms  (query features {features_s * 1000:.1f} ms, "
          f"scoring + top-10 {scoring_s * 1000:.1f} ms)")
    print(f"attribute / generate = {ratio:.3f}  (target <= 0.5)")
    path = save_results(args.out, {"device": device, "method": args.method, "store_rows": len(attributor.store),
                                  "num_timesteps": feature_set["num_timesteps"], "k": feature_set["projection_dim"],
                                  "generate_s": generate_s, "attribute_s": attribute_s, "query_features_s": features_s,
                                  "scoring_topk_s": scoring_s, "ratio": ratio, "target": "<= 0.5",
                                  "command": " ".join(sys.argv)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
