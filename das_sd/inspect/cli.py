"""`das-sd inspect`: dataset-level inspection reports from the command line."""

from __future__ import annotations

from pathlib import Path

from ..argtypes import positive_int
from ..io import printable
from ..registry import DEFAULT_METHOD, GRADIENT_METHOD_NAMES


def cmd_inspect(args) -> None:
    from tqdm import tqdm

    from ..attribute import Attributor
    from ..generation import warn_truncated_prompts
    from ..io import read_prompt_file
    from . import InspectSettings, generate_queries, image_queries, inspect_generations

    if bool(args.prompts) == bool(args.images):
        raise ValueError("give exactly one of --prompts FILE and --images DIR")
    attributor = Attributor(args.store, device=args.device, base=args.base, lora=args.lora)
    settings = InspectSettings(method=args.method, top_k=args.top_k, batch_size=args.batch_size,
                               bootstrap=args.bootstrap, duplicate_threshold=args.duplicate_threshold)
    out = Path(args.out)
    if args.prompts:
        prompts = read_prompt_file(args.prompts)
        warn_truncated_prompts(attributor.pipe.tokenizer, prompts)
        if args.seeds < 1:
            raise ValueError("--seeds must be at least 1")
        total, queries = len(prompts) * args.seeds, generate_queries(attributor, prompts, args.seeds,
                                                                     out / "generations", settings)
    else:
        files = [f for f in Path(args.images).glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
        total, queries = len(files), image_queries(attributor, args.images)
    with tqdm(total=total, desc="inspect", unit="gen") as bar:
        inspection = inspect_generations(attributor, queries, total, settings, args.group_by,
                                         progress=lambda done, _total, _what: bar.update(done - bar.n))
    files = inspection.save(out)
    top = inspection.image_rows()[:5]
    print(f"{len(inspection.generations)} generations x {len(inspection.keys)} training images ({args.method})")
    for row in top:
        print(f"  {100 * row['mean_share']:6.2f}%  top-{args.top_k} in {row['top_k_count']:3d}  "
              f"{printable(row['caption'])}")
    for g in inspection.group_credits[:10]:
        print(f"  group {printable(g.name)}: {100 * g.mean_share:.1f}% [{100 * g.ci_low:.1f}, {100 * g.ci_high:.1f}] "
              f"({g.size} images, {100 * g.size_share:.1f}% of the set)")
    print("\n".join(f"{name}: {printable(path)}" for name, path in files.items()))


def add_inspect_command(sub) -> None:
    p = sub.add_parser("inspect", help="credit per training image and group over many generations; duplicates and outliers")
    p.add_argument("--store", required=True)
    p.add_argument("--prompts", default=None, help="text file, one prompt per line: generate prompts x seeds")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds 0..N-1 per prompt (with --prompts)")
    p.add_argument("--images", default=None, help="folder of generated PNGs (prompts from their metadata)")
    p.add_argument("--out", required=True, help="report folder: inspection.json, *.csv, report.html")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=GRADIENT_METHOD_NAMES)
    p.add_argument("--top-k", type=positive_int, default=10, help="k for the top-k counts")
    p.add_argument("--group-by", default=None, help="folder, column:NAME (metadata column) or file:PATH (JSON/CSV mapping)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="resamples for the group intervals")
    p.add_argument("--duplicate-threshold", type=float, default=0.99, help="latent cosine that flags a near-duplicate")
    p.add_argument("--base", default=None)
    p.add_argument("--lora", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_inspect)
