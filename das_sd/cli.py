"""The `das-sd` command line: parse flags, call the das_sd API, print results. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .argtypes import memory_size, non_negative_int, positive_float, positive_int
from .io import printable
from .toy.cli import add_toy_commands
from .registry import (AUTOCAST_DTYPES, DEFAULT_AUTOCAST, DEFAULT_INDEX_DTYPE, DEFAULT_METHOD, DEFAULT_RHO, FEATURE_SETS,
                       INDEX_DTYPES, METHOD_NAMES, OUTPUT_FUNCTIONS, PROJECTOR_KINDS, RESIDUAL_FORMS)

if TYPE_CHECKING:
    from .attribute_results import Attribution


def _add_dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (imagefolder with metadata.jsonl, or kohya N_name folders)")
    p.add_argument("--format", default="auto", choices=["auto", "imagefolder", "kohya"], help="dataset layout")
    p.add_argument("--caption-column", default="text", help="metadata column holding the caption (imagefolder)")
    p.add_argument("--caption-extension", default=None, help="caption file extension (kohya; default .caption, then .txt)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images / captions instead of failing; they are listed")


def _dataset_options(args: argparse.Namespace) -> dict:
    return {"format": args.format, "caption_column": args.caption_column,
            "caption_extension": args.caption_extension, "skip_bad": args.skip_bad}


def _note(message: str) -> None:
    """What the library has to tell the user besides the result: on stderr."""
    print(message, file=sys.stderr)


def _open_dataset(args: argparse.Namespace):
    from .data.datasets import open_dataset, skipped_note

    dataset = open_dataset(args.data, **_dataset_options(args))
    note = skipped_note(dataset)
    if note:
        _note(note)
    return dataset


def cmd_check_data(args: argparse.Namespace) -> None:
    """``das-sd check-data``: read a dataset and print its samples, fingerprint and bad files.

    Args:
        args: the parsed command line.
    """
    dataset = _open_dataset(args)
    print(json.dumps({"root": str(dataset.root), "format": dataset.format, "samples": len(dataset),
                      "skipped": [str(s) for s in dataset.skipped], "fingerprint": dataset.fingerprint()}, indent=2))


def cmd_train_lora(args: argparse.Namespace) -> None:
    """``das-sd train-lora``: fine-tune a LoRA on a dataset folder.

    Args:
        args: the parsed command line.
    """
    from .train import LoraRecipe, train_lora_on_folder

    optional = {"alpha": args.alpha, "text_encoder_rank": args.text_encoder_rank}
    recipe = LoraRecipe(rank=args.rank, steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
                        resolution=args.resolution, seed=args.seed, text_encoder_learning_rate=args.text_encoder_lr,
                        **{"alpha": float(args.rank)} | {k: v for k, v in optional.items() if v is not None})
    record = train_lora_on_folder(args.data, args.out, recipe, base=args.base, subset=args.subset,
                                  dataset_options=_dataset_options(args), notify=_note)
    print(json.dumps({"out": str(Path(args.out).resolve()), "samples": len(record["sample_keys"]),
                      "train_seconds": record["train_seconds"], "final_loss_ema": record["loss_ema"][-1][1],
                      "lora_fingerprint": record["lora_fingerprint"]}, indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    """``das-sd generate``: generate images and save them with their provenance in the PNG metadata.

    Args:
        args: the parsed command line.
    """
    from .generation import GenerationSettings, generate_to_files

    settings = GenerationSettings(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                                  steps=args.steps, guidance=args.guidance, num_images=args.num_images,
                                  lora_scale=args.lora_scale)
    paths = generate_to_files(settings, args.out, base=args.base, lora=args.lora, device=args.device)
    print("\n".join(map(str, paths)))


def cmd_export_lora(args: argparse.Namespace) -> None:
    """``das-sd export-lora``: convert a LoRA file to kohya or peft format.

    Args:
        args: the parsed command line.
    """
    from .models.loading import export_lora

    print(export_lora(args.lora, args.to, args.out, base=args.base))


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
                       sets=args.feature_sets, dataset_options=_dataset_options(args), batch_size=args.batch_size,
                       shard_size=args.shard_size, device=args.device, autocast=args.autocast,
                       allow_partial=args.allow_partial, max_memory=args.max_memory, resolution=args.resolution,
                       buckets=args.buckets)
    _print_store(featurize(job, shard=args.shard, merge=args.merge, ray=args.ray, ray_workers=args.ray_workers,
                           notify=_note))


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
    print(json.dumps(index_store(args.store, rule, args.dtype, notify=_note), indent=2))


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
    for note in result.notes:
        _note(f"das-sd attribute: note: {note}")
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


def cmd_demo(args: argparse.Namespace) -> None:
    """``das-sd demo``: prepare the embedded demo and open the app on it (or only prepare it).

    Args:
        args: the parsed command line.
    """
    if args.no_launch:
        from .toy.demo import prepare_demo

        print(json.dumps(prepare_demo(args.workdir, family=args.family), indent=2))
        return
    from .app import launch_demo

    launch_demo(args.workdir, args.device, args.host, args.port,
                announce=lambda paths: print(json.dumps(paths, indent=2), flush=True), family=args.family)


def cmd_app(args: argparse.Namespace) -> None:
    """``das-sd app``: serve the Gradio app.

    Args:
        args: the parsed command line.
    """
    from .app import config_from_args, launch_app

    launch_app(config_from_args(args), args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    """The ``das-sd`` argument parser: every command, its flags, their choices and defaults.

    Returns:
        The parser; each command's ``func`` default is the function that runs it.
    """
    from .featurize.plan import feature_set_names
    from .featurize.settings import FeaturizerSettings

    parser = argparse.ArgumentParser(prog="das-sd", description="Diffusion Attribution Score for Stable Diffusion LoRA fine-tunes")
    parser.add_argument("--version", action="version", version=f"das-sd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="prepare the embedded demo (base model, demo data, demo LoRA, feature store) and open the app")
    p.add_argument("--workdir", default=None, help="demo folder (default $DAS_SD_HOME/demo, i.e. ~/.cache/das-sd/demo)")
    p.add_argument("--no-launch", action="store_true", help="only prepare; print the paths as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="app address (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="app port (default: 7860 or the next free one)")
    p.add_argument("--family", choices=("sd", "sdxl"), default="sd",
                   help="the embedded base model: sd (tiny SD, default) or sdxl (tiny SDXL)")
    p.set_defaults(func=cmd_demo)

    from .app import add_app_flags

    p = sub.add_parser("app", help="the Gradio app: generate and see the training images that shaped each image")
    add_app_flags(p)
    p.set_defaults(func=cmd_app)

    add_toy_commands(sub)

    p = sub.add_parser("check-data", help="read a dataset and report its samples, fingerprint and bad files")
    _add_dataset_flags(p)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("train-lora", help="fine-tune a LoRA on a dataset (deterministic for a seed)")
    p.add_argument("--base", default=None, help="diffusers SD 1.x / 2.x or SDXL folder, or single-file .safetensors "
                   "checkpoint (default: the embedded tiny SD)")
    _add_dataset_flags(p)
    p.add_argument("--out", required=True, help="output folder (pytorch_lora_weights.safetensors + lora_record.json)")
    p.add_argument("--subset", default=None, help="file with the sample keys to train on (JSON list or one per line)")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank of the UNet's attention layers")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--steps", type=positive_int, default=800, help="optimizer steps")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate (AdamW)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per optimizer step")
    p.add_argument("--resolution", type=positive_int, default=None, help="training resolution (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seeds batch order, timesteps, noise and the LoRA initialisation: "
                   "the same seed and data give the same LoRA")
    p.add_argument("--text-encoder-rank", type=non_negative_int, default=None,
                   help="rank of the text-encoder LoRA trained alongside the UNet's (default 8; 0: UNet only)")
    p.add_argument("--text-encoder-lr", type=positive_float, default=None, help="text-encoder LoRA learning rate (default: --lr)")
    p.set_defaults(func=cmd_train_lora)

    p = sub.add_parser("generate", help="generate images; parameters and hashes go into the PNG metadata")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt of classifier-free guidance (default: none)")
    p.add_argument("--seed", type=int, default=0, help="image j uses seed + j; the initial noise is drawn on the CPU")
    p.add_argument("--steps", type=positive_int, default=25, help="sampler steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--num-images", type=positive_int, default=1, help="images to generate (seeds seed .. seed + N - 1)")
    p.add_argument("--base", default=None, help="diffusers SD 1.x / 2.x or SDXL folder, or single-file .safetensors "
                   "checkpoint (default: the embedded tiny SD)")
    p.add_argument("--lora", default=None, help="LoRA file or folder (diffusers, peft or kohya safetensors)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (1: as trained, 0: the base model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output PNG (with -NN suffixes for several images)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("featurize", help="compute the training set's attribution features into a store (resumable)")
    p.add_argument("--base", default=None, help="diffusers SD 1.x / 2.x or SDXL folder, or single-file .safetensors "
                   "checkpoint (default: the embedded tiny SD)")
    p.add_argument("--lora", default=None, help="the LoRA trained on --data (file or folder); required, "
                   "except with --merge (the parts carry the model)")
    _add_dataset_flags(p)
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

    from .evaluate.cli import add_eval_commands
    from .inspect.cli import add_inspect_command

    add_eval_commands(sub)
    add_inspect_command(sub)

    p = sub.add_parser("export-lora", help="convert a das-sd / diffusers LoRA to kohya (A1111, ComfyUI) or peft format")
    p.add_argument("--lora", required=True, help="LoRA file or folder to convert (diffusers, peft or kohya safetensors)")
    p.add_argument("--to", choices=["kohya", "peft"], default="kohya",
                   help="output format: kohya (A1111, ComfyUI; each layer keeps its alpha) or peft (scale folded into lora_B)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--base", default=None,
                   help="the LoRA's base pipeline folder: an SDXL base gives kohya files sd-scripts' SDXL names "
                        "(default: the base the LoRA's lora_record.json names, else told from its parts)")
    p.set_defaults(func=cmd_export_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``das-sd`` command.

    Args:
        argv: the arguments after the program name (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a bad input or a failed check (one line on stderr), 130
        when interrupted. Bad flags exit with status 2 from argparse.
    """
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    # das-sd's own errors (StoreError, DatasetError, ModelError, ImageError, QueryError, ...) are
    # ValueErrors; files that cannot be read or written raise OSErrors; a numerically broken store
    # ArithmeticErrors. Each is one line for the user, never a traceback; anything else is a bug.
    except (OSError, ValueError, ArithmeticError) as exc:
        print(f"das-sd {args.command}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"das-sd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
