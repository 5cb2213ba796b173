"""Demo samples: the demo prompts generated with and without the demo LoRA, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .demo import DEMO_PROMPTS
from ..generation import GenerationSettings, generate
from ..png_metadata import save_png
from ..registry import DEFAULT_METHOD

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from ..attribute import Attributor


def show_demo(paths: dict) -> dict:
    """The demo grid and an example attribution, sharing one pipeline (the Attributor's).

    Args:
        paths: ``prepare_demo``'s paths, with the store built ("store", "base", "lora", "workdir").

    Returns:
        "samples": the grid PNG's path; "example_attribution": ``example_attribution``'s result.
    """
    from ..attribute import Attributor
    from ..models.fingerprint import provenance

    attributor = Attributor(paths["store"])
    info = provenance(paths["base"], paths["lora"])
    return {"samples": write_demo_samples(paths, attributor.pipe, info),
            "example_attribution": example_attribution(paths, attributor, info)}


def write_demo_samples(paths: dict, pipe: StableDiffusionPipeline, info: dict,
                       seeds: tuple[int, ...] = (0, 1, 2, 3), zoom: int = 4) -> str:
    """Write one PNG per (prompt, seed, with/without LoRA) and a comparison grid; returns the grid path.

    Everything goes to ``samples`` under the demo's work folder.

    Args:
        paths: ``prepare_demo``'s paths ("workdir" is used).
        pipe: The pipeline with the demo LoRA loaded (its scale set to 0 for "without").
        info: Its provenance, for the PNG metadata.
        seeds: One image per seed, generated as seeds ``seeds[0] + i`` (only the first value and the
            count are used).
        zoom: Nearest-neighbour upscaling of each image in the grid.

    Returns:
        The grid's path: one row per demo prompt, without the LoRA on the left, with it on the right.
    """
    out = Path(paths["workdir"]) / "samples"
    rows = []
    for p, prompt in enumerate(DEMO_PROMPTS):
        row = []
        for scale in (0.0, 1.0):
            settings = GenerationSettings(prompt=prompt, seed=seeds[0], num_images=len(seeds), lora_scale=scale)
            result = generate(pipe, settings, info)
            for i, image in enumerate(result.images):
                meta = result.metadata(i) | {"width": image.width, "height": image.height}
                save_png(image, out / f"prompt{p}-lora{scale:g}-seed{result.seeds[i]}.png", meta)
            row.append(result.images)
        rows.append(row)
    side = rows[0][0][0].width * zoom
    gap = side // 4
    grid = Image.new("RGB", (2 * len(seeds) * side + gap, len(rows) * side), "white")
    for r, (without, with_lora) in enumerate(rows):
        for c, image in enumerate(without + with_lora):
            x = c * side + (gap if c >= len(seeds) else 0)
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, r * side))
    path = out / "grid-without-vs-with-lora.png"
    grid.save(path)
    return str(path)


def example_attribution(paths: dict, attributor: Attributor, info: dict,
                        prompt: str = "zorblat, a green square on a orange background",
                        seed: int = 0, top_k: int = 5) -> dict:
    """Generate one image with a planted trigger word and attribute it with the default method.

    Args:
        paths: ``prepare_demo``'s paths; the image is saved as ``samples/example.png`` under "workdir".
        attributor: The demo store's Attributor (its pipeline generates).
        info: The pipeline's provenance, for the PNG metadata.
        prompt: The prompt; the default carries the trigger word "zorblat".
        seed: Generation seed.
        top_k: Training images returned.

    Returns:
        ``Attribution.to_json()`` with "image": the saved PNG's path.
    """
    result = generate(attributor.pipe, GenerationSettings(prompt=prompt, seed=seed), info)
    image_path = save_png(result.images[0], Path(paths["workdir"]) / "samples" / "example.png",
                          result.metadata(0) | {"width": result.images[0].width, "height": result.images[0].height})
    attribution = attributor.attribute_latents(result.latents, [prompt], DEFAULT_METHOD, top_k)[0]
    return {"image": str(image_path)} | attribution.to_json()
