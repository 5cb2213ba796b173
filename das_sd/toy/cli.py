"""`das-sd build-base` and `das-sd make-demo-data`: the toy world's commands (the embedded tiny base
models and the planted demo sets), apart from the commands that work on users' models and data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..argtypes import positive_int
from .planted_config import PRESETS


def cmd_build_base(args: argparse.Namespace) -> None:
    """``das-sd build-base``: train the embedded tiny SD (or tiny SDXL) from scratch and print its quality check.

    Args:
        args: the parsed command line.
    """
    from .build_base import base_recipe, build_base

    overrides = {k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps)) if v is not None}
    recipe = base_recipe(args.family, seed=args.seed, **overrides)
    log = build_base(Path(args.out), recipe, family=args.family)
    acc = log["held_out_accuracy"]
    print(json.dumps({"out": str(Path(args.out).resolve()), "total_train_seconds": round(log["total_train_seconds"], 1),
                      "held_out_accuracy": {k: acc[k] for k in ("n", "all", "shape", "fg", "bg")}}, indent=2))


def cmd_make_demo_data(args: argparse.Namespace) -> None:
    """``das-sd make-demo-data``: write the demo fine-tuning set (or another planted set) with its ground truth.

    Args:
        args: the parsed command line.
    """
    from .planted import make_planted_data, preset

    out = make_planted_data(args.out, preset(args.preset, args.seed), overwrite=args.overwrite)
    print(out)


def add_toy_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``das-sd build-base`` and ``das-sd make-demo-data`` to the command line.

    Args:
        sub: the ``das-sd`` parser's subcommands.
    """
    p = sub.add_parser("build-base", help="train the embedded tiny SD (about 36 minutes on 2 idle CPU cores) or, with "
                       "--family sdxl, the tiny SDXL on the tiny SD's VAE (about 26 minutes) from scratch")
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument("--family", choices=("sd", "sdxl"), default="sd", help="sd: the tiny SD (default); sdxl: the tiny SDXL")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (data, initialisation, noise)")
    p.add_argument("--vae-steps", type=positive_int, default=None, help="VAE training steps (default: the recipe's)")
    p.add_argument("--unet-steps", type=positive_int, default=None, help="UNet + text encoder steps (default: the recipe's)")
    p.set_defaults(func=cmd_build_base)

    p = sub.add_parser("make-demo-data", help="write the demo fine-tuning set with planted ground truth")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw (default: the preset's, 0)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), metavar="NAME",
                   help="which planted set: demo (the demo's), or one drawn differently (motif kind and "
                        f"contrast, trigger position, group size, unrelated share): {', '.join(sorted(PRESETS))}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.set_defaults(func=cmd_make_demo_data)
