"""Image opening, decoding and preprocessing to the model resolution.

``open_image`` is the one way das_sd (and its host plugins) read an image: a small file can claim a
huge canvas (a 1.4 MB PNG of 22000 x 22000 decodes to 1.9 GB), so the size is read from the header
and checked before any pixel is decoded.

Every mode a training set may contain (L, LA, P with transparency, RGBA, CMYK, 16-bit grey, I, F)
becomes 8-bit RGB; transparency is composited on white, the convention of SD training scripts.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError


def _pixel_cap() -> int:
    value = os.environ.get("DAS_SD_MAX_IMAGE_PIXELS", "")
    try:
        return int(float(value)) if value.strip() else 64_000_000
    except ValueError:
        return 64_000_000


# Real training images are a few megapixels; 64 MP (8000 x 8000) leaves room for photographs
# and scans. DAS_SD_MAX_IMAGE_PIXELS raises (or lowers) it.
MAX_IMAGE_PIXELS = _pixel_cap()
# PIL refuses on its own above 2 x its limit: keep that from undercutting a raised cap. Never lowered,
# since a host process (webui, ComfyUI, InvokeAI) shares this global.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file (or "the uploaded image")."""


def open_image(source: str | Path | bytes, name: str | Path | None = None,
               max_pixels: int | None = None, load: bool = True) -> Image.Image:
    """Open an image file (or its bytes) and decode it fully, refusing it from its header first when
    it has more than ``max_pixels`` pixels (default ``MAX_IMAGE_PIXELS``).

    The image keeps its mode and metadata (PNG text chunks), so callers can read a generation's
    prompt; a truncated file fails here, not later. ``name`` is what error messages call the image
    (default: the path, or "the uploaded image" for bytes). ``load=False``: only the header is read
    (no pixel is decoded; see ``image_size``), and the caller closes the image.

    Args:
        source: A file path, or the file's bytes.
        name: What error messages call the image; None for the path or "the uploaded image".
        max_pixels: Most pixels (width * height) accepted; None for ``MAX_IMAGE_PIXELS``.
        load: Decode the pixels now; False reads the header only.

    Returns:
        The opened PIL image, in its own mode.

    Raises:
        ImageError: When the image is over ``max_pixels``, missing, not an image, or truncated or
            otherwise undecodable; the message names it.
    """
    label = str(name) if name is not None else ("the uploaded image" if isinstance(source, bytes) else str(source))
    cap = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    image = None
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning (above its limit): a refusal like ours, not a log line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
        width, height = image.size
        if width * height > cap:
            raise _too_large(label, f"{width}x{height}", cap)
        if load:
            image.load()
    except ImageError:
        if image is not None:
            image.close()
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))  # PIL names the pixel count, not the size
        raise _too_large(label, f"{int(pixels[1]):,}" if pixels else "too many", cap) from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a readable image (not an image format PIL can read)") from None
    except FileNotFoundError:
        raise ImageError(f"{label}: cannot read the image (no such file)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if image is not None:
            image.close()
        raise ImageError(f"{label}: not a readable image ({type(exc).__name__}: {_clean(exc)})") from None
    return image


def image_size(source: str | Path | bytes, name: str | Path | None = None,
               max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding a pixel; refusals as ``open_image``.

    Args:
        source: A file path, or the file's bytes.
        name: What error messages call the image; None for the path or "the uploaded image".
        max_pixels: Most pixels accepted; None for ``MAX_IMAGE_PIXELS``.

    Returns:
        (width, height) in pixels.

    Raises:
        ImageError: As ``open_image``.
    """
    image = open_image(source, name, max_pixels, load=False)
    try:
        return image.size
    finally:
        image.close()


def verify_image(data: bytes, name: str | Path | None = None) -> None:
    """Refuse (``ImageError``) an image that cannot be decoded; nothing is kept. Decoding once at full
    size is the cost of finding a truncated file; no converted copy of it is made.

    Args:
        data: The image file's bytes.
        name: What error messages call the image; None for "the uploaded image".

    Raises:
        ImageError: As ``open_image``.
    """
    open_image(data, name).close()


def _too_large(label: str, size: str, cap: int) -> ImageError:
    return ImageError(f"{label}: image of {size} pixels, over das-sd's limit of {cap / 1e6:g} megapixels "
                      "(DAS_SD_MAX_IMAGE_PIXELS raises it)")


def _clean(exc: BaseException) -> str:
    """An exception's text without object reprs such as <_io.BytesIO object at 0x7f...>."""
    return " ".join(_OBJECT_REPR.sub("the image", str(exc)).split()) or type(exc).__name__


def is_fully_transparent(image: Image.Image) -> bool:
    """True when every pixel has alpha 0 (nothing would be left of it after compositing).

    Args:
        image: A PIL image of any mode; palette transparency counts.

    Returns:
        False for an image without alpha.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" not in image.getbands():
        return False
    return image.getchannel("A").getextrema()[1] == 0


def decode(data: bytes, source: str | Path | None = None) -> Image.Image:
    """``data`` decoded (see ``open_image``), EXIF-rotated, as RGB.

    Args:
        data: The image file's bytes.
        source: What error messages call the image; None for "the uploaded image".

    Returns:
        An 8-bit RGB image (transparency composited on white).

    Raises:
        ImageError: As ``open_image``.
    """
    return _upright_rgb(open_image(data, source))


def load_image(path: str | Path) -> Image.Image:
    """The image file at ``path`` (see ``open_image``), EXIF-rotated, as RGB.

    Args:
        path: The image file.

    Returns:
        An 8-bit RGB image (transparency composited on white).

    Raises:
        ImageError: As ``open_image``.
    """
    return _upright_rgb(open_image(Path(path)))


def _upright_rgb(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in range(2, 9):  # else exif_transpose would only copy the image: a full-size copy saved
            image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not make a good image unusable
        pass
    return to_rgb(image)


# Conversions of large images run in horizontal strips of about this many pixels: every step is
# per pixel, so the result is the same as converting at once, without full-size intermediates
# (a 64 MP RGBA image took five 256 MB copies to composite on white).
STRIP_PIXELS = 1 << 20


def _strips(image: Image.Image):
    """(box, crop) for horizontal strips of ``image`` covering it top to bottom."""
    width, height = image.size
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        yield box, image.crop(box)


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB; transparency is composited on white.

    16-bit grey scales 0..65535 to 0..255; 32-bit integer and float grey ("I", "F") do the same when
    their maximum is over 255, else keep 0..255. Large images are converted a strip at a time.

    Args:
        image: A PIL image.

    Returns:
        ``image`` itself when already RGB, else a converted copy.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        if mode.startswith("I;16"):
            peak = 65535.0
        else:
            top = np.max([np.asarray(strip, dtype=np.float64).max() for _, strip in _strips(image)])
            peak = 65535.0 if top > 255 else 255.0
        out = np.empty((image.height, image.width), dtype=np.uint8)
        for (_, y0, _, y1), strip in _strips(image):
            out[y0:y1] = np.clip(np.asarray(strip, dtype=np.float64) / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(out, "L").convert("RGB")
    if mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    if mode in ("P", "RGBA", "LA", "PA", "RGBa", "La"):  # composited on white, a strip at a time
        out = Image.new("RGB", image.size)
        for box, strip in _strips(image):
            rgba = strip if strip.mode == "RGBA" else strip.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out.paste(Image.alpha_composite(canvas, rgba).convert("RGB"), box[:2])
        return out
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def cover_crop(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an image of ``size`` goes when resized to cover ``target`` and center-cropped to it (the
    recipe of diffusers' and kohya's trainers; SDXL's crop conditioning records the offset).

    Args:
        size: The image's (width, height).
        target: The (width, height) to produce.

    Returns:
        ((resized width, resized height), (crop left, crop top)).
    """
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    nw, nh = max(target[0], round(width * scale)), max(target[1], round(height * scale))
    return (nw, nh), ((nw - target[0]) // 2, (nh - target[1]) // 2)


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and crop the centre square (diffusers' recipe).

    Args:
        image: A PIL image.
        resolution: Side of the square result in pixels.

    Returns:
        A ``resolution`` x ``resolution`` image (bicubic), or ``image`` itself when already that size.
    """
    if image.size != (resolution, resolution):
        (nw, nh), (left, top) = cover_crop(image.size, (resolution, resolution))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def to_model_input(image: Image.Image, resolution: int) -> np.ndarray:
    """HxWx3 float32 in [-1, 1] at the model resolution.

    Args:
        image: A PIL image of any mode (converted with ``to_rgb``).
        resolution: The model's image side in pixels (resized and centre-cropped).

    Returns:
        (resolution, resolution, 3) float32 in [-1, 1].
    """
    arr = np.asarray(resize_center_crop(to_rgb(image), resolution), dtype=np.float32)
    return arr / 127.5 - 1.0
