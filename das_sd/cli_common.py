"""What several `das-sd` commands share: the dataset flags and the options they give, and notes on
stderr. Apart from das_sd/cli.py so that the command modules it registers can use them too."""

from __future__ import annotations

import argparse
import sys


def add_dataset_flags(p: argparse.ArgumentParser) -> None:
    """Add the flags that name and read a dataset (--data, --format, --caption-column, ...).

    Args:
        p: The command's parser.
    """
    p.add_argument("--data", required=True, help="dataset folder (imagefolder with metadata.jsonl, or kohya N_name folders)")
    p.add_argument("--format", default="auto", choices=["auto", "imagefolder", "kohya"], help="dataset layout")
    p.add_argument("--caption-column", default="text", help="metadata column holding the caption (imagefolder)")
    p.add_argument("--caption-extension", default=None, help="caption file extension (kohya; default .caption, then .txt)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images / captions instead of failing; they are listed")


def dataset_options(args: argparse.Namespace) -> dict:
    """The ``open_dataset`` options of parsed ``add_dataset_flags`` flags (all but --data).

    Args:
        args: The parsed command line.

    Returns:
        "format", "caption_column", "caption_extension" and "skip_bad".
    """
    return {"format": args.format, "caption_column": args.caption_column,
            "caption_extension": args.caption_extension, "skip_bad": args.skip_bad}


def note(message: str) -> None:
    """What the library has to tell the user besides the result: on stderr.

    Args:
        message: The line(s) to print.
    """
    print(message, file=sys.stderr)
