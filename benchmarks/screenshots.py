"""Shared pieces of the host screenshots (benchmarks/screenshot_invokeai.py, benchmarks/screenshot_comfyui.py).

The demo query both hosts attribute (the demo LoRA's prompt, generated on the embedded tiny SD with
the demo LoRA) and the PNG optimization that keeps a screenshot in docs/ small.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

MAX_BYTES = 400_000


def demo_generation(prompt: str, seed: int) -> tuple[dict, Image.Image]:
    """The demo (built if missing) and one generation of ``prompt`` with the demo store's base and LoRA.

    Args:
        prompt: The prompt to generate.
        seed: The generation seed.

    Returns:
        ``prepare_demo``'s paths ("store", "lora", "base", ...) and the generated image.
    """
    from das_sd.attribute import Attributor
    from das_sd.generation import GenerationSettings, generate
    from das_sd.toy.demo import prepare_demo

    demo = prepare_demo(progress=False)
    pipe = Attributor(demo["store"], device="cpu").pipe
    image = generate(pipe, GenerationSettings(prompt=prompt, seed=seed)).images[0]
    return demo, image


def optimize_png(path: Path, max_bytes: int = MAX_BYTES) -> int:
    """Re-save a PNG optimized; quantized to 256 colours when that is still too big.

    Args:
        path: The PNG, rewritten in place.
        max_bytes: The size to stay under.

    Returns:
        The file's size in bytes afterwards.
    """
    with Image.open(path) as image:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return path.stat().st_size
