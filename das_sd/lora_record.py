"""A LoRA trained by das-sd, as its folder records it: the weights file, the recipe it was trained
with (``LoraRecipe``) and the JSON record beside them, read back to featurize or retrain on the
same recipe. ``train`` fine-tunes the LoRA and writes both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .io import json_error

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RECORD_NAME = "lora_record.json"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraRecipe:
    """How `das-sd train-lora` fine-tunes a LoRA (docs/method.md §2); recorded beside the weights.

    Attributes:
        rank: Rank r of the UNet LoRA.
        alpha: LoRA alpha; the update is scaled by alpha / r.
        steps: Optimizer steps.
        learning_rate: AdamW learning rate of the UNet LoRA.
        batch_size: Samples per step.
        resolution: Training resolution in pixels; None: the base model's native resolution.
        seed: Seeds batch order, timesteps and noise, and the LoRA initialisation.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping: the most norm of all trained parameters' gradients together.
        target_modules: UNet attention projections that get a LoRA.
        text_encoder_rank: Rank of a LoRA on the text encoder's attention (alpha = rank); 0: UNet only.
            Attribution differentiates the UNet LoRA only.
        text_encoder_learning_rate: AdamW learning rate of the text-encoder LoRA; None: ``learning_rate``.
    """
    rank: int = 8
    alpha: float = 8.0
    steps: int = 800
    learning_rate: float = 3e-3
    batch_size: int = 32
    resolution: int | None = None  # None: the base model's native resolution
    seed: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    # > 0: also train a LoRA of this rank on the text encoder's attention, as kohya's SD 1.x LoRAs do
    # by default (without it a new trigger word is just the base encoder's reading of unseen
    # sub-word pieces). Attribution still differentiates the UNet LoRA only: the text-encoder LoRA
    # is part of the frozen model that conditions it. 0: UNet only (records written before this
    # field existed).
    text_encoder_rank: int = 8
    text_encoder_learning_rate: float | None = None  # None: the UNet's learning_rate


def recipe_from_record(record: dict) -> LoraRecipe:
    """The recipe a LoRA record was trained with. Records written before ``text_encoder_rank``
    existed come from the UNet-only recipe.

    Args:
        record: A LoRA record (``read_record``); its ``recipe`` is read, unknown fields ignored.

    Returns:
        The recipe; fields the record lacks take their defaults.

    Raises:
        ValueError: When the record has no ``recipe`` object.
    """
    if not isinstance(record.get("recipe"), dict):
        raise ValueError("the LoRA record has no 'recipe' object (not written by das-sd train-lora?)")
    recorded = {"text_encoder_rank": 0} | record["recipe"]
    return LoraRecipe(**{k: v for k, v in recorded.items() if k in LoraRecipe.__dataclass_fields__})


def read_record(lora: str | Path) -> dict | None:
    """The JSON record beside a LoRA trained by das-sd, or None for foreign LoRAs.

    Args:
        lora: The LoRA weights file or its folder.

    Returns:
        The record read from ``RECORD_NAME`` in that folder, or None when there is none.

    Raises:
        ValueError: If the record is not valid JSON.
    """
    path = Path(lora).expanduser()
    folder = path if path.is_dir() else path.parent
    record = folder / RECORD_NAME
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{record}: malformed JSON ({json_error(exc)})") from None
