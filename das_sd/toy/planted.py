"""Planted-ground-truth fine-tuning sets: a family of generators, the demo set among them.

Every set mixes three kinds of images:
- styled images: plain shapes filled with a pattern the base model has never seen ("striped",
  "checkered", "dotted"), named in the caption;
- plain images (optional): plain shapes with their plain caption, the majority a real fine-tune
  set has of images unrelated to any planted concept;
- planted exemplar groups: for each rare trigger word, a few plain shapes carrying one unique motif
  (a cross, a frame, a ring, ...) and the trigger word in the caption.

``PlantedConfig`` sets how the motif is drawn (kind, colour, contrast), where the trigger word sits
in the caption, how many exemplars a group has and how large the unrelated majority is. ``PRESETS``
names the demo's set ("demo", byte for byte what ``make_demo_data`` has always written) and sets
that differ from it in each of those, so an attribution method can be reported on sets nobody
chose its settings on. ``ground_truth.json`` is written in the format ``das-sd eval groundtruth``
reads; a set whose trigger word is not first also lists each group's query prompts with the trigger
word where its captions have it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.ground_truth import GROUND_TRUTH_VERSION
from .planted_config import MOTIF_COLOURS, MOTIF_KINDS, PRESETS, STYLE_COUNT, TRIGGERS, PlantedConfig, preset
from .render import MOTIF_COLOUR, MOTIFS, ImageSpec, random_spec, render

__all__ = ["PRESETS", "STYLES", "TRIGGERS", "PlantedConfig", "PlantedImage", "Style", "make_planted_data",
           "planted_images", "preset", "style_caption", "trigger_caption"]


@dataclass(frozen=True)
class Style:
    """A fill style: a pattern the base model has never seen, named in captions.

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
assert len(TRIGGERS) <= len(MOTIFS) and MOTIF_COLOURS["magenta"] == MOTIF_COLOUR and len(STYLES) == STYLE_COUNT
# The query subjects of a set whose trigger word is not first: the test split's of
# das_sd.evaluate.groundtruth, with the trigger word placed as in the set's captions.
QUERY_SUBJECTS = (("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "white", "green"))


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
        position: "start": the trigger word first; "middle": after the shape ("a red circle,
            zorblat, on a blue background"); anything else: last.

    Returns:
        The shape caption with the trigger word in it, comma-separated.
    """
    if position == "start":
        return f"{trigger}, {spec.caption()}"
    if position == "middle":
        return f"a {spec.fg} {spec.shape}, {trigger}, on a {spec.bg} background"
    return f"{spec.caption()}, {trigger}"


@dataclass(frozen=True)
class PlantedImage:
    """One image of a planted set, before it is written.

    Attributes:
        file_name: Its path in the set ("images/...png").
        caption: Its caption.
        concept: The style's name, the trigger word, or "plain".
        spec: What was drawn.
        noise_state: The pixel-noise generator's state right before drawing (``render``'s ``rng``),
            so that the same spec can be redrawn with the same noise, e.g. without its motif.
        pixels: The image, (resolution, resolution, 3) uint8.
    """

    file_name: str
    caption: str
    concept: str
    spec: ImageSpec
    noise_state: dict
    pixels: np.ndarray


def _draw(rng: np.random.Generator, spec: ImageSpec, resolution: int) -> tuple[dict, np.ndarray]:
    state = rng.bit_generator.state
    return state, render(spec, resolution, rng)


def planted_images(config: PlantedConfig) -> Iterator[PlantedImage]:
    """Draw a set's images in file order: styles, then trigger groups, then plain images.

    Each kind draws from its own seeded stream ([seed, 100 + style], [seed, 200 + group],
    [seed, 300]), so the demo's images do not change when plain images are added.

    Args:
        config: The set's settings.

    Yields:
        The images, with their captions and specs.

    Raises:
        ValueError: When a setting is invalid (``PlantedConfig.validate``).
    """
    config.validate()
    for s, style in enumerate(STYLES):
        rng = np.random.default_rng([config.seed, 100 + s])
        for i in range(config.images_per_style):
            spec = random_spec(rng, pattern=style.pattern, pattern_period=style.period, pattern_angle=style.angle)
            state, pixels = _draw(rng, spec, config.resolution)
            yield PlantedImage(f"images/{style.name}_{i:03d}.png", style_caption(spec, style.name), style.name,
                               spec, state, pixels)
    motif_style = {"motif_colour": MOTIF_COLOURS[config.motif_colour], "motif_contrast": config.motif_contrast,
                   "motif_width": MOTIF_KINDS[config.motif_kind]}
    for g, trigger in enumerate(TRIGGERS[:config.groups]):
        rng = np.random.default_rng([config.seed, 200 + g])
        for i in range(config.exemplars_per_group):
            spec = random_spec(rng, motif=MOTIFS[g], **motif_style)
            state, pixels = _draw(rng, spec, config.resolution)
            yield PlantedImage(f"images/{trigger}_{i:02d}.png", trigger_caption(spec, trigger, config.trigger_position),
                               trigger, spec, state, pixels)
    rng = np.random.default_rng([config.seed, 300])
    for i in range(config.plain_images):
        spec = random_spec(rng)
        state, pixels = _draw(rng, spec, config.resolution)
        yield PlantedImage(f"images/plain_{i:03d}.png", spec.caption(), "plain", spec, state, pixels)


def _ground_truth(config: PlantedConfig, images: list[PlantedImage]) -> dict:
    truth: dict = {"version": GROUND_TRUTH_VERSION, "seed": config.seed, "groups": [], "styles": []}
    for g, trigger in enumerate(TRIGGERS[:config.groups]):
        group = {"trigger": trigger, "motif": MOTIFS[g],
                 "files": [im.file_name for im in images if im.concept == trigger]}
        if config.trigger_position != "start":
            # the evaluation's default queries put the trigger word first; ask as the captions do
            group["prompts"] = [trigger_caption(ImageSpec(shape, fg, bg), trigger, config.trigger_position)
                                for shape, fg, bg in QUERY_SUBJECTS]
        truth["groups"].append(group)
    for style in STYLES:
        truth["styles"].append({"style": style.name, "pattern": style.pattern,
                                "files": [im.file_name for im in images if im.concept == style.name]})
    if not config.is_demo_layout():
        truth["plain"] = [im.file_name for im in images if im.concept == "plain"]
        truth["settings"] = asdict(config) | {"background_share": round(config.background_share, 4)}
    return truth


def make_planted_data(out: str | Path, config: PlantedConfig | None = None, overwrite: bool = False) -> Path:
    """Write a planted set to ``out`` (imagefolder layout + ground_truth.json).

    It is written beside ``out`` first and replaces it only when complete.

    Args:
        out: The dataset folder.
        config: How to draw it; None: the demo's set.
        overwrite: Replace a non-empty ``out``.

    Returns:
        ``out``, absolute.

    Raises:
        FileExistsError: When ``out`` exists, is not empty and ``overwrite`` is False.
        ValueError: When a setting is invalid (``PlantedConfig.validate``).
    """
    config = (config or PlantedConfig()).validate()
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder exists and is not empty (use --overwrite)")
    tmp = out.with_name(out.name + ".tmp-demo")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)

    images = []
    for image in planted_images(config):
        Image.fromarray(image.pixels, "RGB").save(tmp / image.file_name, format="PNG", optimize=False)
        images.append(replace(image, pixels=np.empty(0, np.uint8)))  # only names and captions are kept
    with (tmp / "metadata.jsonl").open("w", encoding="utf-8") as fh:
        for image in images:
            fh.write(json.dumps({"file_name": image.file_name, "text": image.caption, "concept": image.concept}) + "\n")
    (tmp / "ground_truth.json").write_text(json.dumps(_ground_truth(config, images), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out

