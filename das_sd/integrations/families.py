"""Which model family (SD 1.x / 2.x or SDXL) a host's files and models are, and refusing a store of
another family than the generation's.

A store attributes the generations of its own base + LoRA; a host whose checkpoint or LoRA is of
another family made its images with another UNet altogether (other layers, other conditioning), so
the plugins refuse such a store with a message naming it, instead of ranking training images of an
unrelated model. Families are read from file headers only (no weights loaded).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..attribute import Attributor
from ..io import open_regular, read_safetensors_header
from ..models.single_file import read_header, text_encoder_family
from ..registry import FAMILY_NAMES
from ..store_manifest import identity_with_defaults

# SD 1.x / 2.x UNets have one transformer block per attention; SDXL's have 2 and 10 in the deeper
# levels, so a LoRA key on block 1 or later is an SDXL UNet's (any key style writes the index so).
_LATER_BLOCK = re.compile(r"transformer_blocks[._]([1-9]\d*)[._]")
_FIRST_BLOCK = re.compile(r"transformer_blocks[._]0[._]")
_SECOND_TEXT_ENCODER = ("text_encoder_2.", "lora_te2_", "lora_te1_")  # kohya names SDXL's encoders te1 / te2


class FamilyMismatch(ValueError):
    """A store of another model family than the generation's model."""


def store_family(attributor: Attributor) -> str:
    """The model family the store was built for.

    Args:
        attributor: The store's Attributor.

    Returns:
        "sd" or "sdxl" (``registry.MODEL_FAMILIES``).
    """
    return identity_with_defaults(attributor.store.identity)["model_family"]


def require_family(attributor: Attributor, family: str | None, what: str) -> None:
    """Refuse the store when the generation's model is of another family.

    Args:
        attributor: The store's Attributor.
        family: The generation's family ("sd" / "sdxl", or a host's name of another family, e.g.
            "flux"); None (unknown) passes.
        what: The host's model, as the message names it (e.g. "LoRA 'x.safetensors'").

    Raises:
        FamilyMismatch: When ``family`` is known and not the store's.
    """
    expected = store_family(attributor)
    if family is not None and family != expected:
        raise FamilyMismatch(f"the das-sd store {attributor.store.root} was built for an {FAMILY_NAMES[expected]} "
                             f"model ({Path(attributor.lora_path).name}), but {what} is {FAMILY_NAMES.get(family, family)}: "
                             "choose a store built for this generation's model")


def _header_keys(path: Path, what: str) -> list[str]:
    try:
        with open_regular(path, what) as fh:
            header, _ = read_safetensors_header(fh)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors {what} ({exc})") from None
    return [k for k in header if k != "__metadata__"]


def lora_file_family(path: str | Path) -> str | None:
    """The model family a LoRA file adapts, from its key names.

    Args:
        path: A ``.safetensors`` LoRA file (diffusers, peft or kohya keys); other files: None.

    Returns:
        "sdxl" when it adapts a second text encoder or a transformer block past the first; "sd" when
        it adapts first transformer blocks only; None when its keys do not tell (e.g. a LoRA of
        convolutions only, or a file that is not safetensors).

    Raises:
        ValueError: When a ``.safetensors`` file cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    keys = _header_keys(path, "LoRA file")
    if any(k.startswith(_SECOND_TEXT_ENCODER) for k in keys) or any(_LATER_BLOCK.search(k) for k in keys):
        return "sdxl"
    return "sd" if any(_FIRST_BLOCK.search(k) for k in keys) else None


def checkpoint_family(path: str | Path) -> str | None:
    """The model family of a single-file checkpoint (the original Stability layout the hosts load).

    Args:
        path: A ``.safetensors`` checkpoint; other files: None.

    Returns:
        "sdxl" (``conditioner.embedders.*`` text encoders), "sd" (``cond_stage_model.*``), or None.

    Raises:
        ValueError: When a ``.safetensors`` file cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    shapes, _ = read_header(path)  # ModelError (a ValueError) naming the file when it cannot be read
    return text_encoder_family(shapes)


def require_lora_families(attributor: Attributor, files: dict[str, Path]) -> None:
    """Refuse the store when a LoRA file of the generation is of another family than the store.

    Args:
        attributor: The store's Attributor.
        files: The generation's LoRA names -> files (those the host resolved).

    Raises:
        FamilyMismatch: When a LoRA file's family is known and not the store's.
        ValueError: When a LoRA file cannot be read.
    """
    for name, path in files.items():
        require_family(attributor, lora_file_family(path), f"the generation's LoRA {name!r} ({Path(path).name})")
