"""Demo samples: the demo prompts generated with and without the demo LoRA, side by side."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .demo import DEMO_PROMPTS
from .generate import GenerationSettings, generate, save_png
from .models.fingerprint import provenance
from .models.loading import load_lora, load_pipeline


def write_demo_samples(paths: dict, seeds: tuple[int, ...] = (0, 1, 2, 3), zoom: int = 4) -> str:
    """Write one PNG per (prompt, seed, with/without LoRA) and a comparison grid; returns the grid path."""
    out = Path(paths["workdir"]) / "samples"
    pipe = load_pipeline(paths["base"])
    load_lora(pipe, paths["lora"])
    info = provenance(paths["base"], paths["lora"])
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


def example_attribution(paths: dict, prompt: str = "zorblat, a green square on a orange background",
                        seed: int = 0, top_k: int = 5) -> dict:
    """Generate one image with a planted trigger word and attribute it with DAS."""
    from .attribute import Attributor

    attributor = Attributor(paths["store"])
    result = generate(attributor.pipe, GenerationSettings(prompt=prompt, seed=seed),
                      provenance(paths["base"], paths["lora"]))
    image_path = save_png(result.images[0], Path(paths["workdir"]) / "samples" / "example.png",
                          result.metadata(0) | {"width": result.images[0].width, "height": result.images[0].height})
    attribution = attributor.attribute_latents(result.latents, [prompt], "das", top_k)[0]
    return {"image": str(image_path)} | attribution.to_json()
