"""What ``build_base`` trains the embedded tiny SD (and tiny SDXL) on, drawn from seeded generators:
the generic VAE mix (plain shapes, patterned fills, patterned backgrounds and overlaid marks), and
captioned plain shapes for the UNet and text encoder, with every n-th (shape, colour, background)
combination held out to test that prompts compose.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from . import tiny_sd
from .render import MOTIFS, PATTERNS, all_combinations, random_spec, render


def held_out_combinations(every: int = 10) -> list[tuple[str, str, str]]:
    """The (shape, fg, bg) combinations never trained on, to test that prompts compose.

    Args:
        every: Every n-th combination of ``all_combinations()`` (from the 4th) is held out.

    Returns:
        The held-out combinations, in ``all_combinations()`` order.
    """
    return all_combinations()[3::every]


def training_combinations(every: int = 10) -> list[tuple[str, str, str]]:
    """The (shape, fg, bg) combinations the UNet and text encoder train on.

    Args:
        every: As for ``held_out_combinations``.

    Returns:
        Every combination not held out, in ``all_combinations()`` order.
    """
    held = set(held_out_combinations(every))
    return [c for c in all_combinations() if c not in held]


def caption_of(shape: str, fg: str, bg: str) -> str:
    """The training caption of a plain shape image.

    Args:
        shape: Shape name (``render.SHAPES``).
        fg: Shape colour name (``render.COLOURS``).
        bg: Background colour name.

    Returns:
        "a {fg} {shape} on a {bg} background".
    """
    return f"a {fg} {shape} on a {bg} background"


def vae_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    """A batch of the generic VAE mix: plain shapes, patterned fills, patterned backgrounds and motifs.

    Args:
        rng: Source of every random choice.
        n: Batch size.

    Returns:
        (n, 3, 32, 32) float32 images in [-1, 1].
    """
    images = []
    for _ in range(n):
        kind = rng.random()
        pattern = dict(pattern=PATTERNS[1 + rng.integers(len(PATTERNS) - 1)],
                       pattern_period=float(rng.uniform(4.0, 9.0)),
                       pattern_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])))
        if kind < 0.35:
            spec = random_spec(rng)
        elif kind < 0.7:
            spec = random_spec(rng, **pattern)
        elif kind < 0.85:  # a patterned background: a square larger than the image
            spec = random_spec(rng, shape="square", **pattern)
            spec = type(spec)(**{**asdict(spec), "size": 1.2, "center": (0.5, 0.5)})
        else:
            spec = random_spec(rng, motif=MOTIFS[rng.integers(len(MOTIFS))],
                               **(pattern if rng.random() < 0.5 else {}))
        images.append(render(spec, tiny_sd.RESOLUTION, rng))
    return to_tensor(np.stack(images))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images as the VAE's input.

    Args:
        images: (n, h, w, 3) uint8 images.

    Returns:
        (n, 3, h, w) float32 in [-1, 1].
    """
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def shapes_dataset(rng: np.random.Generator, n: int,
                   combos: list[tuple[str, str, str]]) -> tuple[np.ndarray, list[str]]:
    """Captioned plain shape images, each a random pick of ``combos`` at a random place and size.

    Args:
        rng: Source of every random choice.
        n: Number of images.
        combos: The (shape, fg, bg) combinations to draw from.

    Returns:
        (n, 32, 32, 3) uint8 images and their captions.
    """
    picks = rng.integers(len(combos), size=n)
    images, captions = [], []
    for i in picks:
        shape, fg, bg = combos[i]
        images.append(render(random_spec(rng, shape=shape, fg=fg, bg=bg), tiny_sd.RESOLUTION, rng))
        captions.append(caption_of(shape, fg, bg))
    return np.stack(images), captions
