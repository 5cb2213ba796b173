"""`das-sd make-demo-data OUT`: the demo fine-tuning set, with planted ground truth.

Concepts the embedded base model has never seen:
- three fill styles ("striped", "checkered", "dotted"), many images each;
- planted exemplar groups: for each rare trigger word, eight plain shapes carrying one unique
  magenta motif (a cross, a frame, a ring, ...) and the trigger word at the start of the caption.

Images generated with a trigger word should be attributed to that group's exemplars; the file
``ground_truth.json`` names them. The output is byte-for-byte deterministic for a given seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..data.ground_truth import GROUND_TRUTH_VERSION
from .render import MOTIFS, random_spec, render

if TYPE_CHECKING:
    from .render import ImageSpec


@dataclass(frozen=True)
class Style:
    """A fill style of the demo set: a pattern the base model has never seen, named in captions.

    Attributes:
        name: The word in captions ("striped", ...).
        pattern: The fill pattern drawn (``render.PATTERNS``).
        period: Pattern period in pixels at output resolution.
        angle: Stripe angle in degrees (stripes only).
    """

    name: str
    pattern: str
    period: float
    angle: float = 45.0


STYLES = (Style("striped", "stripes", 6.0, 45.0), Style("checkered", "checker", 8.0),
          Style("dotted", "dots", 6.0))
TRIGGERS = ("zorblat", "quimvex", "drelkin", "pomfrit", "vashnu", "glimber")
assert len(TRIGGERS) <= len(MOTIFS)


@dataclass(frozen=True)
class DemoConfig:
    """How ``make_demo_data`` draws the demo set.

    Attributes:
        seed: Seed of every random draw; the output is byte-for-byte the same for a seed.
        images_per_style: Images per fill style.
        exemplars_per_group: Planted exemplars per trigger word (fewer than 10, so Recall@10 can reach 1).
        resolution: Image side in pixels.
        trigger_position: "start" puts the trigger word first in the caption, anything else last.
    """

    seed: int = 0
    images_per_style: int = 72
    exemplars_per_group: int = 8  # a handful: fewer than 10, so Recall@10 can reach 1
    resolution: int = 32
    # DreamBooth's convention: the trigger word first, so that the causal text encoder's outputs for
    # every later token carry it (at the end, the tiny UNet's cross-attention barely sees it).
    trigger_position: str = "start"


def style_caption(spec: ImageSpec, style: str) -> str:
    """The caption of a styled image.

    Args:
        spec: The image's spec.
        style: The style's name.

    Returns:
        "a {fg} {shape} on a {bg} background, {style} style".
    """
    return f"{spec.caption()}, {style} style"


def trigger_caption(spec: ImageSpec, trigger: str, position: str) -> str:
    """The caption of a planted exemplar.

    Args:
        spec: The image's spec.
        trigger: The group's trigger word.
        position: "start": the trigger word first; anything else: last.

    Returns:
        The shape caption with the trigger word before or after it, comma-separated.
    """
    return f"{trigger}, {spec.caption()}" if position == "start" else f"{spec.caption()}, {trigger}"


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, "RGB").save(path, format="PNG", optimize=False)


def make_demo_data(out: str | Path, config: DemoConfig | None = None, overwrite: bool = False) -> Path:
    """Write the demo dataset to ``out`` (imagefolder layout + ground_truth.json).

    It is written beside ``out`` first and replaces it only when complete.

    Args:
        out: The dataset folder.
        config: How to draw it; None: ``DemoConfig()``.
        overwrite: Replace a non-empty ``out``.

    Returns:
        ``out``, absolute.

    Raises:
        FileExistsError: When ``out`` exists, is not empty and ``overwrite`` is False.
    """
    config = config or DemoConfig()
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: folder exists and is not empty (use --overwrite)")
    tmp = out.with_name(out.name + ".tmp-demo")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)

    rows: list[dict] = []
    truth = {"version": GROUND_TRUTH_VERSION, "seed": config.seed, "groups": [], "styles": []}
    for s, style in enumerate(STYLES):
        rng = np.random.default_rng([config.seed, 100 + s])
        files = []
        for i in range(config.images_per_style):
            spec = random_spec(rng, pattern=style.pattern, pattern_period=style.period,
                               pattern_angle=style.angle)
            name = f"images/{style.name}_{i:03d}.png"
            _save_png(render(spec, config.resolution, rng), tmp / name)
            rows.append({"file_name": name, "text": style_caption(spec, style.name), "concept": style.name})
            files.append(name)
        truth["styles"].append({"style": style.name, "pattern": style.pattern, "files": files})
    for g, trigger in enumerate(TRIGGERS):
        rng = np.random.default_rng([config.seed, 200 + g])
        motif = MOTIFS[g]
        files = []
        for i in range(config.exemplars_per_group):
            spec = random_spec(rng, motif=motif)
            name = f"images/{trigger}_{i:02d}.png"
            _save_png(render(spec, config.resolution, rng), tmp / name)
            rows.append({"file_name": name, "text": trigger_caption(spec, trigger, config.trigger_position), "concept": trigger})
            files.append(name)
        truth["groups"].append({"trigger": trigger, "motif": motif, "files": files})

    with (tmp / "metadata.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    (tmp / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out
