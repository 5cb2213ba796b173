"""Generation parameters in PNG files: written by das-sd, read back from das-sd's and other tools' PNGs.

A PNG das-sd saves carries its generation parameters twice: as an AUTOMATIC1111-style
``parameters`` text (which every SD tool reads) and as a ``das_sd`` JSON chunk with the exact
settings and the base / LoRA fingerprints; an attributed image also carries its attribution record
(``das_sd_attribution``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .data.images import ImageError, open_image
from .io import atomic_write_bytes

PNG_PARAMETERS_KEY = "parameters"
PNG_DAS_KEY = "das_sd"
PNG_ATTRIBUTION_KEY = "das_sd_attribution"


def infotext(meta: dict) -> str:
    """AUTOMATIC1111's ``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs.

    Args:
        meta: Generation metadata (``GenerationResult.metadata``, optionally with ``width`` and
            ``height``); ``prompt`` is required, absent keys are left out of the pairs.

    Returns:
        The text: the prompt, a ``Negative prompt:`` line if any, then e.g. ``Steps: 25, Sampler: ...``.
    """
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    pairs = {
        "Steps": meta.get("steps"), "Sampler": meta.get("scheduler"), "CFG scale": meta.get("guidance"),
        "Seed": meta.get("seed"), "Size": f"{meta.get('width')}x{meta.get('height')}" if meta.get("width") else None,
        "Model": meta.get("base_name"), "Model hash": meta.get("base_hash"),
        "Lora hashes": f"\"{meta['lora_name']}: {meta['lora_hash']}\"" if meta.get("lora_hash") else None,
        "Lora scale": meta.get("lora_scale") if meta.get("lora_hash") else None,
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict:
    """Prompt, negative prompt and seed/steps from an A1111 ``parameters`` text.

    Args:
        text: The text (as ``infotext`` writes it).

    Returns:
        ``prompt``, ``negative_prompt`` when present, ``seed`` and ``steps`` (int) and ``guidance``
        (float) when they parse (dropped when not), and any other ``Key: value`` pair as text under
        its A1111 key.
    """
    lines = text.strip().split("\n")
    meta: dict = {}
    if lines and ": " in lines[-1] and ("Steps: " in lines[-1] or "Seed: " in lines[-1]):
        for part in lines.pop().split(", "):
            key, _, value = part.partition(": ")
            meta[key.strip()] = value.strip()
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt:")]
    if negative:
        meta["negative_prompt"] = "\n".join(lines[negative[0]:]).removeprefix("Negative prompt:").strip()
        lines = lines[:negative[0]]
    meta["prompt"] = "\n".join(lines).strip()
    for src, dst, cast in (("Seed", "seed", int), ("Steps", "steps", int), ("CFG scale", "guidance", float)):
        if src in meta:
            try:
                meta[dst] = cast(meta.pop(src))
            except ValueError:
                pass
    return meta


def png_bytes(image: Image.Image, meta: dict, attribution: dict | None = None) -> bytes:
    """PNG with the generation parameters and, when given, its attribution record.

    Args:
        image: The image.
        meta: Its generation metadata, written as the A1111 ``parameters`` text and as ``das_sd`` JSON.
        attribution: An attribution record (``Attribution.provenance``) for the ``das_sd_attribution``
            chunk; None writes none.

    Returns:
        The PNG file's bytes.
    """
    info = PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, infotext(meta))
    info.add_text(PNG_DAS_KEY, json.dumps(meta, sort_keys=True))
    if attribution is not None:
        info.add_text(PNG_ATTRIBUTION_KEY, json.dumps(attribution, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, meta: dict, attribution: dict | None = None) -> Path:
    """Write ``image`` atomically as a PNG carrying its generation parameters ``meta`` (and, when
    given, its ``attribution``) as text chunks (see ``png_bytes``); missing folders are created.

    Args:
        image: The image.
        path: Where to write it.
        meta: Its generation metadata.
        attribution: Its attribution record, or None.

    Returns:
        ``path`` as a Path.

    Raises:
        OSError: If the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(image, meta, attribution))
    return path


def read_png_metadata(path: str | Path) -> dict:
    """Generation parameters from a PNG file (see ``image_metadata``).

    Args:
        path: The image file.

    Returns:
        The parameters; {} when the file records none.

    Raises:
        ImageError: If the file cannot be read as an image or is too large.
    """
    with open_image(Path(path)) as image:  # PIL reads text chunks after the pixels: size-checked first
        return image_metadata(image)


def read_png_attribution(path: str | Path) -> dict | None:
    """The attribution record (method, store id, top-k keys and scores) saved with an image, if any.

    Args:
        path: The image file.

    Returns:
        The record (``Attribution.provenance``), or None when the image has none.

    Raises:
        ImageError: If the file cannot be read as an image or is too large.
        ImageError: If the record is not valid JSON.
    """
    with open_image(Path(path)) as image:
        text = getattr(image, "text", None) or {}
    if PNG_ATTRIBUTION_KEY not in text:
        return None
    try:
        return json.loads(text[PNG_ATTRIBUTION_KEY])
    except json.JSONDecodeError as exc:
        raise ImageError(f"{path}: its {PNG_ATTRIBUTION_KEY!r} record is not valid JSON ({exc})") from None


def image_metadata(image: Image.Image) -> dict:
    """Our ``das_sd`` chunk if present, else the prompt and settings of an A1111 ``parameters`` text.

    Args:
        image: An image opened from a file, its text chunks / info read.

    Returns:
        The parameters (a malformed ``das_sd`` chunk falls back to the ``parameters`` text); {}
        when the image records none.
    """
    text = {k: v for k, v in {**image.info, **(getattr(image, "text", None) or {})}.items() if isinstance(v, str)}
    if PNG_DAS_KEY in text:
        try:
            return json.loads(text[PNG_DAS_KEY])
        except json.JSONDecodeError:
            pass
    if PNG_PARAMETERS_KEY in text:
        return parse_infotext(text[PNG_PARAMETERS_KEY])
    return {}
