"""The settings of a planted-ground-truth set (das_sd.toy.planted draws it) and its named presets.

Kept apart from the drawing code, without numpy, so that the command line can list the presets
without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

TRIGGERS = ("zorblat", "quimvex", "drelkin", "pomfrit", "vashnu", "glimber")
# three fill styles (das_sd.toy.planted.STYLES), each images_per_style images
STYLE_COUNT = 3
# Stroke width relative to the demo's (render.motif_mask): "overlay" 4 px strokes, "stroke" 1 px at
# 32 px, thinner than one 8 px latent cell, so the VAE's latents barely carry it.
MOTIF_KINDS: dict[str, float] = {"overlay": 1.0, "stroke": 0.25}
# "dark" is off the shape palette (render.COLOURS), so a motif never vanishes into a black background.
MOTIF_COLOURS: dict[str, tuple[int, int, int]] = {"magenta": (255, 0, 255), "dark": (45, 45, 45)}
TRIGGER_POSITIONS = ("start", "middle", "end")


@dataclass(frozen=True)
class PlantedConfig:
    """How ``make_planted_data`` draws a set. The defaults are the demo's set.

    Attributes:
        seed: Seed of every random draw; the output is byte-for-byte the same for a seed.
        resolution: Image side in pixels.
        images_per_style: Styled images per fill style (``STYLES``).
        plain_images: Plain shapes with plain captions (no style, no motif, no trigger word).
        groups: Planted groups, one per trigger word (the first ``groups`` of ``TRIGGERS``).
        exemplars_per_group: Exemplars per trigger word (Recall@10 can reach 1 only below 11).
        trigger_position: Where the trigger word sits in an exemplar's caption: "start", "middle"
            (after the shape, before the background) or "end".
        motif_kind: "overlay" (the demo's 4 px strokes) or "stroke" (1 px strokes); ``MOTIF_KINDS``.
        motif_colour: "magenta" (the demo's) or "dark"; ``MOTIF_COLOURS``.
        motif_contrast: Motif opacity in (0, 1]: 1 paints it, less blends it over the image.
    """

    seed: int = 0
    resolution: int = 32
    images_per_style: int = 72
    plain_images: int = 0
    groups: int = 6
    exemplars_per_group: int = 8
    trigger_position: str = "start"
    motif_kind: str = "overlay"
    motif_colour: str = "magenta"
    motif_contrast: float = 1.0

    def validate(self) -> PlantedConfig:
        """Check every setting.

        Returns:
            The config itself.

        Raises:
            ValueError: Naming the setting, when one is out of range or not a known choice.
        """
        for name in ("resolution", "groups", "exemplars_per_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        for name in ("images_per_style", "plain_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected 0 or more")
        if self.groups > len(TRIGGERS):
            raise ValueError(f"groups={self.groups}: at most {len(TRIGGERS)} (one per trigger word)")
        choices = {"trigger_position": TRIGGER_POSITIONS, "motif_kind": tuple(MOTIF_KINDS),
                   "motif_colour": tuple(MOTIF_COLOURS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {list(allowed)}")
        if not 0 < self.motif_contrast <= 1:
            raise ValueError(f"motif_contrast={self.motif_contrast}: expected a value in (0, 1]")
        return self

    @property
    def total(self) -> int:
        """Images in the set."""
        return STYLE_COUNT * self.images_per_style + self.plain_images + self.groups * self.exemplars_per_group

    @property
    def background_share(self) -> float:
        """The share of the set that belongs to no planted group (styled and plain images)."""
        return 1.0 - self.groups * self.exemplars_per_group / self.total

    def is_demo_layout(self) -> bool:
        """Whether this is the demo's set up to its seed (its ground truth then has the demo's fields only).

        Returns:
            True when every setting but ``seed`` is the default.
        """
        return replace(self, seed=0) == PlantedConfig()


PRESETS: dict[str, PlantedConfig] = {
    # the demo set (das-sd make-demo-data): bright 4 px motifs, trigger word first, 6 groups of 8
    "demo": PlantedConfig(),
    # issue 22's set: 1 px dark motifs the 8 x 8 latents barely draw, trigger word last, a plain majority
    "thin-dark-end": PlantedConfig(images_per_style=48, plain_images=144, trigger_position="end",
                                   motif_kind="stroke", motif_colour="dark"),
    # small groups of 4 with half-transparent demo motifs, trigger word mid-caption
    "faint-middle-4": PlantedConfig(images_per_style=64, plain_images=72, exemplars_per_group=4,
                                    trigger_position="middle", motif_contrast=0.5),
    # large groups of 16 with thin bright motifs, trigger word first, fewer unrelated images
    "thin-bright-16": PlantedConfig(images_per_style=48, plain_images=48, exemplars_per_group=16,
                                    motif_kind="stroke", motif_contrast=0.8),
    # the demo's motifs, trigger word last, groups of 16 in a plain majority
    "bright-end-16": PlantedConfig(images_per_style=32, plain_images=144, exemplars_per_group=16,
                                   trigger_position="end"),
}


def preset(name: str, seed: int | None = None) -> PlantedConfig:
    """A named preset's settings.

    Args:
        name: One of ``PRESETS``.
        seed: Replaces the preset's seed; None keeps it.

    Returns:
        The settings.

    Raises:
        ValueError: Naming the known presets, when ``name`` is not one of them.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown planted-set preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name] if seed is None else replace(PRESETS[name], seed=seed)


