"""`das-sd featurize`, `index`, `verify` and `attribute`: the feature store's commands, from
building it (features, then the index) to checking it and querying it with an image."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .argtypes import memory_size, non_negative_int, positive_float, positive_int
from .cli_common import add_dataset_flags, dataset_options, note
from .io import printable
from .registry import (AUTOCAST_DTYPES, DEFAULT_AUTOCAST, DEFAULT_INDEX_DTYPE, DEFAULT_METHOD, DEFAULT_RHO, FEATURE_SETS,
                       INDEX_DTYPES, METHOD_NAMES, OUTPUT_FUNCTIONS, PROJECTOR_KINDS, RESIDUAL_FORMS)

if TYPE_CHECKING:
    from .attribute_results import Attribution


def cmd_featurize(args: argparse.Namespace) -> None:
    """``das-sd featurize``: compute the training set's attribution features into a store (resumable).

    Args:
        args: the parsed command line.
    """
    from .featurize.plan import FeaturizeJob
    from .featurize.service import featurize
    from .featurize.settings import FeaturizerSettings

    settings = FeaturizerSettings(output=args.output, num_timesteps=args.timesteps, noise_seed=args.noise_seed,
                                  normalize=not args.no_normalize, projector=args.projector,
                                  projection_dim=args.dim, projection_seed=args.projection_seed,
                                  projection_nonzeros=args.projection_nonzeros, residual=args.residual, residual_timesteps=args.residual_timesteps)
    job = FeaturizeJob(store=args.store, data=args.data, base=args.base, lora=args.lora, settings=settings,
                       sets=args.feature_sets, dataset_options=dataset_options(args), batch_size=args.batch_size,
                       shard_size=args.shard_size, device=args.device, autocast=args.autocast,
                       allow_partial=args.allow_partial, max_memory=args.max_memory, resolution=args.resolution,
                       buckets=args.buckets)
    _print_store(featurize(job, shard=args.shard, merge=args.merge, ray=args.ray, ray_workers=args.ray_workers,
                           notify=note))


def _print_store(store) -> None:
    print(json.dumps({"store": str(store.root), "samples": len(store), "shards": len(store.manifest["shards"]),
                      "complete": store.manifest["complete"], "last_run": store.manifest["info"].get("last_run"),
                      "lora_parameters": store.manifest["info"].get("lora_parameters")}, indent=2))


def cmd_index(args: argparse.Namespace) -> None:
    """``das-sd index``: solve the kernel and store the scorer's train-side vectors.

    Args:
        args: the parsed command line.
    """
    from .featurize.service import index_store
    from .score import LambdaRule

    rule = LambdaRule(rho=args.rho, value=args.lambda_)
    print(json.dumps(index_store(args.store, rule, args.dtype, notify=note), indent=2))


def cmd_verify(args: argparse.Namespace) -> None:
    """``das-sd verify``: check a store's manifest and every file against its recorded checksum.

    Args:
        args: the parsed command line.

    Raises:
        StoreError: when the store has problems (each is printed first).
    """
    from .store import StoreError
    from .store_verify import verify_store

    report = verify_store(args.store, progress=not args.quiet)
    for line in report.problems:
        print(printable(line))
    for line in report.notes:
        print(f"note: {printable(line)}")
    print(printable(report.summary()))
    if not report.ok:
        raise StoreError(f"{report.root}: {len(report.problems)} problem(s) found (listed above)")


def cmd_attribute(args: argparse.Namespace) -> None:
    """``das-sd attribute``: print the training images that most influenced a generated image.

    Args:
        args: the parsed command line.
    """
    from .attribute import attribute_file

    result = attribute_file(args.store, args.image, prompt=args.prompt, method=args.method, top_k=args.top_k,
                            device=args.device, base=args.base, lora=args.lora)
    for message in result.notes:
        note(f"das-sd attribute: note: {message}")
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_attribution(result, args.image)


def _print_attribution(result: Attribution, image: str) -> None:
    from .shares import share_text
    from .generation import shorten

    # captions and paths come from the dataset: escaped, so that none can drive the terminal
    print(f"{result.method} attribution for {printable(image)} (prompt: {shorten(result.query['prompt'])!r})")
    print("rank   share  (of the positive influence of all training images)  raw score, sign of t  caption  [file]")
    for r in result.results:
        print(f"{r.rank:4d}  {share_text(r.share, r.score, r.sign):>6}  {r.score:12.5g}  {'+' if r.sign >= 0 else '-'}  "
              f"{printable(r.caption)}  [{printable(r.path)}]")


def add_store_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``das-sd featurize``, ``index``, ``verify`` and ``attribute`` to the command line.

    Args:
        sub: the ``das-sd`` parser's subcommands.
    """
    from .featurize.plan import feature_set_names
    from .featurize.settings import FeaturizerSettings

    p = sub.add_parser("featurize", help="compute the training set's attribution features into a store (resumable)")
    p.add_argument("--base", default=None, help="diffusers SD 1.x / 2.x or SDXL folder, or single-file .safetensors "
                   "checkpoint (default: the embedded tiny SD)")
    p.add_argument("--lora", default=None, help="the LoRA trained on --data (file or folder); required, "
                   "except with --merge (the parts carry the model)")
    add_dataset_flags(p)
    p.add_argument("--store", required=True, help="feature store folder (created, resumed or extended)")
    p.add_argument("--feature-sets", default=",".join(FEATURE_SETS), type=feature_set_names,
                   help=f"comma-separated, some of: {', '.join(FEATURE_SETS)}")
    defaults = FeaturizerSettings  # one place for the defaults: the settings dataclass
    p.add_argument("--output", default=defaults.output, choices=OUTPUT_FUNCTIONS, help="f of the das set")
    p.add_argument("--timesteps", type=positive_int, default=defaults.num_timesteps, help="K, timesteps per sample (uniform grid)")
    p.add_argument("--dim", type=positive_int, default=defaults.projection_dim, help="k, projected feature dimension")
    p.add_argument("--projector", default=defaults.projector, choices=PROJECTOR_KINDS,
                   help="random projection P (sparse: O(s p) per row, the dense kinds O(k p))")
    p.add_argument("--projection-nonzeros", type=positive_int, default=defaults.projection_nonzeros,
                   help="s, nonzeros per coordinate of the sparse projector (k must be a multiple)")
    p.add_argument("--projection-seed", type=int, default=defaults.projection_seed, help="seed of the projection P")
    p.add_argument("--noise-seed", type=int, default=defaults.noise_seed,
                   help="seed of the feature and residual noise eps_{z,t} (with the sample key and t)")
    p.add_argument("--no-normalize", action="store_true", help="no per-timestep unit normalisation (das set)")
    p.add_argument("--residual", default=defaults.residual, choices=RESIDUAL_FORMS,
                   help="form of the residual weight e_i (das set; docs/method.md §9)")
    p.add_argument("--residual-timesteps", type=non_negative_int, default=defaults.residual_timesteps,
                   help="T_E for the residual weights; 0 (default): the feature timesteps, from the featurizing "
                        "forward (no extra UNet passes)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="samples per step (--max-memory cuts a step's rows into passes that fit)")
    mode = p.add_mutually_exclusive_group()  # one process (none of them), one part, the merge, or Ray
    mode.add_argument("--shard", default=None, metavar="I/N",
                      help="do part I of N of the work (for torchrun, Slurm arrays, ...); then run --merge once")
    mode.add_argument("--merge", action="store_true",
                      help="merge the finished --shard parts into --store (the model flags are not needed)")
    mode.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                      help="spread the parts over a Ray cluster (no ADDRESS: a local one) and merge them")
    p.add_argument("--ray-workers", type=positive_int, default=None, help="parts for --ray (default: the cluster's CPUs/GPUs)")
    p.add_argument("--shard-size", type=positive_int, default=256, help="rows per safetensors shard")
    p.add_argument("--resolution", type=positive_int, default=None, metavar="SIDE",
                   help="image side in pixels (default: the LoRA's training resolution when its file records "
                        "it, e.g. kohya's ss_resolution, else the model's)")
    p.add_argument("--buckets", default="auto", choices=("auto", "on", "off"),
                   help="aspect-ratio buckets: auto (as the kohya LoRA file says it was trained), on (those, else "
                        "kohya's defaults), off (every image center-cropped to the square)")
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="memory one forward/backward pass may take, e.g. 24GB (default: 80%% of what the device "
                        "has free); rows are cut into passes that fit, the features do not change")
    p.add_argument("--allow-partial", action="store_true",
                   help="featurize a LoRA with parameters das-sd cannot differentiate (DoRA magnitudes, LoRA "
                        "biases, ...) over the rest; what is left out is recorded and shown with every attribution")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--autocast", default=DEFAULT_AUTOCAST, choices=tuple(AUTOCAST_DTYPES),
                   help="autocast for the forward / backward passes (gradients accumulate in fp32); fp16 on CUDA only")
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("index", help="solve the kernel and store the scorer's train-side vectors")
    p.add_argument("--store", required=True, help="feature store folder (featurized)")
    p.add_argument("--lambda", dest="lambda_", type=positive_float, default=None, metavar="X",
                   help="explicit ridge lambda (instead of --rho's rule)")
    p.add_argument("--rho", type=positive_float, default=DEFAULT_RHO,
                   help="lambda = rho * trace(Phi^T Phi) / min(N, k) (the mean non-zero eigenvalue) when --lambda is not given")
    p.add_argument("--dtype", default=DEFAULT_INDEX_DTYPE, choices=INDEX_DTYPES,
                   help="storage of the train-side vectors (float16: half the bytes a query reads, same "
                        "rankings; int8: a quarter, per-row scaled, approximate scores)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("verify", help="check a store: its manifest, and every file against the checksum recorded for it")
    p.add_argument("--store", required=True, help="feature store folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("attribute", help="the training images that most influenced a generated image")
    p.add_argument("--store", required=True, help="feature store folder (featurized and indexed)")
    p.add_argument("--image", required=True, help="generated PNG (its prompt is read from the metadata)")
    p.add_argument("--prompt", default=None, help="prompt, when the image has none in its metadata")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHOD_NAMES,
                   help="attribution method (docs/method.md §11)")
    p.add_argument("--top-k", type=positive_int, default=10, help="training images listed")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema in the README)")
    p.add_argument("--base", default=None, help="base model folder or checkpoint file, if it moved since featurizing")
    p.add_argument("--lora", default=None, help="LoRA file, if it moved since featurizing")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_attribute)
