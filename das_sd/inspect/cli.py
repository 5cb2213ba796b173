"""`das-sd inspect`: dataset-level inspection reports from the command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..argtypes import positive_int
from ..io import printable
from ..registry import DEFAULT_METHOD, GRADIENT_METHOD_NAMES

if TYPE_CHECKING:
    from .inspection import Inspection


@contextmanager
def _progress_bar(desc: str, unit: str) -> Iterator[Callable[[int, int, str], None]]:
    """A ``progress(done, total, what)`` callback drawing a tqdm bar, opened on its first call."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int, _what: str) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc=desc, unit=unit)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def cmd_inspect(args: argparse.Namespace) -> None:
    """``das-sd inspect``: credit per training image and group over many generations.

    Args:
        args: the parsed command line.
    """
    from .inspection import InspectSettings
    from .jobs import inspect_store

    settings = InspectSettings(method=args.method, top_k=args.top_k, batch_size=args.batch_size,
                               bootstrap=args.bootstrap, duplicate_threshold=args.duplicate_threshold)
    with _progress_bar("inspect", "gen") as progress:
        inspection, files = inspect_store(args.store, args.out, settings, prompts=args.prompts, images=args.images,
                                          seeds=args.seeds, group_by=args.group_by, base=args.base, lora=args.lora,
                                          device=args.device, progress=progress)
    _print_summary(inspection, files, args.method, args.top_k)


def _print_summary(inspection: Inspection, files: dict[str, Path], method: str, top_k: int) -> None:
    print(f"{len(inspection.generations)} generations x {len(inspection.keys)} training images ({method})")
    for row in inspection.image_rows()[:5]:
        print(f"  {100 * row['mean_share']:6.2f}%  top-{top_k} in {row['top_k_count']:3d}  "
              f"{printable(row['caption'])}")
    for g in inspection.group_credits[:10]:
        print(f"  group {printable(g.name)}: {100 * g.mean_share:.1f}% [{100 * g.ci_low:.1f}, {100 * g.ci_high:.1f}] "
              f"({g.size} images, {100 * g.size_share:.1f}% of the set)")
    print("\n".join(f"{name}: {printable(path)}" for name, path in files.items()))


def add_inspect_command(sub: argparse._SubParsersAction) -> None:
    """Add ``das-sd inspect`` to the command line.

    Args:
        sub: the ``das-sd`` parser's subcommands.
    """
    p = sub.add_parser("inspect", help="credit per training image and group over many generations; duplicates and outliers")
    p.add_argument("--store", required=True, help="feature store folder (featurized and indexed)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line: generate prompts x seeds")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds 0..N-1 per prompt (with --prompts)")
    p.add_argument("--images", default=None, help="folder of generated PNGs (prompts from their metadata)")
    p.add_argument("--out", required=True, help="report folder: inspection.json, *.csv, report.html")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=GRADIENT_METHOD_NAMES,
                   help="attribution method (docs/method.md §11; the gradient methods)")
    p.add_argument("--top-k", type=positive_int, default=10, help="k for the top-k counts")
    p.add_argument("--group-by", default=None, help="folder, column:NAME (metadata column) or file:PATH (JSON/CSV mapping)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="generations featurized together")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="resamples for the group intervals")
    p.add_argument("--duplicate-threshold", type=float, default=0.99, help="latent cosine that flags a near-duplicate")
    p.add_argument("--base", default=None, help="base model folder or checkpoint file, if it moved since featurizing")
    p.add_argument("--lora", default=None, help="LoRA file, if it moved since featurizing")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_inspect)
