"""Does the embedded model draw what it is asked for? Pixel-statistics accuracy on shape prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..seeds import generator
from .classify import classify

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


@torch.no_grad()
def text_to_image_accuracy(pipe: StableDiffusionPipeline, combos: list[tuple[str, str, str]], seeds: list[int],
                           steps: int = 25, guidance: float = 4.0, batch_size: int = 64) -> dict:
    """Generate every (shape, fg, bg) prompt once per seed and classify the images.

    Args:
        pipe: The pipeline to test (the embedded base model).
        combos: The (shape, fg, bg) combinations to prompt ("a {fg} {shape} on a {bg} background").
        seeds: One image per combination and seed.
        steps: Sampling steps.
        guidance: Classifier-free guidance scale.
        batch_size: Images generated at once.

    Returns:
        "n" images; the fraction whose shape, foreground and background colour are "all" right, and
        of each ("shape", "fg", "bg") separately; "rows": each image's prompt, seed and reading.
    """
    jobs = [(c, s) for c in combos for s in seeds]
    rows = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        prompts = [f"a {fg} {shape} on a {bg} background" for (shape, fg, bg), _ in chunk]
        generators = [generator(seed) for _, seed in chunk]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="np").images
        for ((shape, fg, bg), seed), image in zip(chunk, images):
            reading = classify(np.rint(image * 255).astype(np.uint8))
            rows.append({"prompt": [shape, fg, bg], "seed": seed,
                         "read": [reading.shape, reading.fg, reading.bg]})
    n = len(rows)

    def frac(pred) -> float:
        return sum(pred(r) for r in rows) / n

    return {
        "n": n,
        "all": frac(lambda r: r["prompt"] == r["read"]),
        "shape": frac(lambda r: r["prompt"][0] == r["read"][0]),
        "fg": frac(lambda r: r["prompt"][1] == r["read"][1]),
        "bg": frac(lambda r: r["prompt"][2] == r["read"][2]),
        "rows": rows,
    }
