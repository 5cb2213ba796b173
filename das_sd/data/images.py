"""Image decoding and preprocessing to the model resolution.

Every mode a training set may contain (L, LA, P with transparency, RGBA, CMYK, 16-bit grey, I, F)
becomes 8-bit RGB; transparency is composited on white, the convention of SD training scripts.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = 16384 * 16384  # refuse decompression bombs beyond 268 MP


class ImageError(ValueError):
    """An image that cannot be decoded; the message names the file."""


def decode(data: bytes, source: str | Path) -> Image.Image:
    """Fully decode ``data`` (so truncated files fail here, not later) and return an RGB image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{source}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not make a good image unusable
        pass
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and crop the centre square (diffusers' recipe)."""
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def to_model_input(image: Image.Image, resolution: int) -> np.ndarray:
    """HxWx3 float32 in [-1, 1] at the model resolution."""
    arr = np.asarray(resize_center_crop(to_rgb(image), resolution), dtype=np.float32)
    return arr / 127.5 - 1.0


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return decode(data, path)
