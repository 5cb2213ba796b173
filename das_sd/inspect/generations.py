"""The generations an inspection scores, as ``(generation, latents)`` pairs: made here from prompts x
seeds with the store's pipeline (saved as PNGs), or read from a folder of generated images with
their prompts in the metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..attribute import Attributor
from ..attribute_queries import QueryError
from ..generation import GenerationSettings, generate
from ..models.fingerprint import provenance
from ..png_metadata import save_png
from .inspection import Generation, InspectSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def generate_queries(attributor: Attributor, prompts: list[str], seeds: int, out: Path,
                     settings: InspectSettings) -> Iterator[tuple[Generation, torch.Tensor]]:
    """Generate prompts x seeds 0..seeds-1 with the store's pipeline and save them as PNGs under ``out``.

    Args:
        attributor: The attributor whose pipeline generates.
        prompts: The prompts.
        seeds: Generations per prompt.
        out: Folder for the PNGs (``p<prompt>-s<seed>.png``, with generation metadata); created when missing.
        settings: Gives the generations' ``steps`` and ``guidance``.

    Yields:
        ``(generation, latents)`` one at a time; latents are the final latents, (1, 4, h/8, w/8).
    """
    out.mkdir(parents=True, exist_ok=True)
    info = provenance(attributor.base_path, attributor.lora_path)
    for p, prompt in enumerate(prompts):
        for seed in range(seeds):
            result = generate(attributor.pipe, GenerationSettings(prompt=prompt, seed=seed, steps=settings.steps,
                                                                  guidance=settings.guidance), info)
            gid = f"p{p:03d}-s{seed}"
            path = out / f"{gid}.png"
            image = result.images[0]
            save_png(image, path, result.metadata(0) | {"width": image.width, "height": image.height})
            yield Generation(gid, prompt, seed, str(path)), result.latents


def image_queries(attributor: Attributor, folder: str | Path) -> Iterator[tuple[Generation, torch.Tensor]]:
    """Every image of ``folder`` (sorted), with the prompt from its PNG metadata.

    Args:
        attributor: The attributor that reads and encodes the images.
        folder: Folder of generated images (.png, .jpg, .jpeg, .webp; not searched recursively).

    Yields:
        ``(generation, latents)`` per image; the generation's id is the file stem, its seed None.

    Raises:
        QueryError: When the folder holds no such image (or is not a folder), or (from
            ``Attributor.image_query``) when an image cannot be a query.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise QueryError(f"{folder}: no generated images (.png, .jpg, .webp) to inspect")
    for path in files:
        latents, prompt, _ = attributor.image_query(path)
        yield Generation(path.stem, prompt, None, str(path)), latents
