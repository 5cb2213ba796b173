"""`das-sd make-demo-data OUT`: the demo fine-tuning set, with planted ground truth.

Concepts the embedded base model has never seen:
- three fill styles ("striped", "checkered", "dotted"), many images each;
- planted exemplar groups: for each rare trigger word, eight plain shapes carrying one unique
  magenta motif (a cross, a frame, a ring, ...) and the trigger word at the start of the caption.

Images generated with a trigger word should be attributed to that group's exemplars; the file
``ground_truth.json`` names them. The output is byte-for-byte deterministic for a given seed. The
set is the "demo" preset of the planted-set family (das_sd.toy.planted), which draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .planted import STYLES, TRIGGERS, PlantedConfig, Style, make_planted_data, style_caption, trigger_caption

__all__ = ["STYLES", "TRIGGERS", "DemoConfig", "Style", "make_demo_data", "style_caption", "trigger_caption"]


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

    def planted(self) -> PlantedConfig:
        """The same set as planted-set settings.

        Returns:
            The ``PlantedConfig`` that draws it.
        """
        return PlantedConfig(seed=self.seed, resolution=self.resolution, images_per_style=self.images_per_style,
                             exemplars_per_group=self.exemplars_per_group,
                             trigger_position="start" if self.trigger_position == "start" else "end")


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
    return make_planted_data(out, (config or DemoConfig()).planted(), overwrite=overwrite)
