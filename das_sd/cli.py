"""The `das-sd` command line: parse flags, call the das_sd API, print results. No logic of its own.

The parser and ``main``, and the commands on datasets, LoRAs and the app; the other commands are
registered here from their own modules (store_cli.py: featurize, index, verify, attribute;
evaluate/cli.py, inspect/cli.py, toy/cli.py), in the order `das-sd --help` lists them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .argtypes import non_negative_int, positive_float, positive_int
from .cli_common import add_dataset_flags, dataset_options, note
from .io import printable
from .store_cli import add_store_commands
from .toy.cli import add_toy_commands


def _open_dataset(args: argparse.Namespace):
    from .data.datasets import open_dataset, skipped_note

    dataset = open_dataset(args.data, **dataset_options(args))
    skipped = skipped_note(dataset)
    if skipped:
        note(skipped)
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
    from .lora_record import LoraRecipe
    from .train import train_lora_on_folder

    optional = {"alpha": args.alpha, "text_encoder_rank": args.text_encoder_rank}
    recipe = LoraRecipe(rank=args.rank, steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
                        resolution=args.resolution, seed=args.seed, text_encoder_learning_rate=args.text_encoder_lr,
                        **{"alpha": float(args.rank)} | {k: v for k, v in optional.items() if v is not None})
    record = train_lora_on_folder(args.data, args.out, recipe, base=args.base, subset=args.subset,
                                  dataset_options=dataset_options(args), notify=note)
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
    add_dataset_flags(p)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("train-lora", help="fine-tune a LoRA on a dataset (deterministic for a seed)")
    p.add_argument("--base", default=None, help="diffusers SD 1.x / 2.x or SDXL folder, or single-file .safetensors "
                   "checkpoint (default: the embedded tiny SD)")
    add_dataset_flags(p)
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

    add_store_commands(sub)

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
