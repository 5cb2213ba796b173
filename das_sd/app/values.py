"""The plain values the app's engine takes and returns: what it serves (``AppConfig``), an
attributed image kept for re-ranking (``Query``) and the error of a request it cannot serve
(``AppError``). No model and no UI here, so the engine's parts and the UI share them without
importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..models.fingerprint import das_sd_home

if TYPE_CHECKING:
    import torch


class AppError(ValueError):
    """A request the app cannot serve; the message is shown to the user as is."""


@dataclass
class AppConfig:
    """What the app serves: which store, model and dataset, and where its outputs go.

    Attributes:
        store: Feature store folder; built from ``data`` when missing.
        base: Base model folder; None: the base the store's manifest names.
        lora: LoRA file or folder; None: the LoRA the store's manifest names.
        data: Dataset to build or extend the store from; None: the one the manifest names.
        device: Torch device ("cpu", "cuda", "cuda:1", ...); None: cuda when available.
        outdir: Where generated PNGs (one folder per day) and inspection reports are saved
            (default: ``outputs`` under ``$DAS_SD_HOME``, else ``~/.cache/das-sd``).
        demo: The embedded demo: base, LoRA and data come from ``prepare_demo`` and the store is a
            cache, rebuilt when the demo LoRA was retrained.
    """

    store: Path  # feature store folder (built from ``data`` when missing)
    base: Path | None = None  # None: the base the store's manifest names
    lora: Path | None = None  # None: the LoRA the store's manifest names
    data: Path | None = None  # dataset to build or extend the store from; None: the manifest's
    device: str | None = None
    outdir: Path = field(default_factory=lambda: das_sd_home() / "outputs")
    demo: bool = False  # the embedded demo: base, LoRA and data come from ``prepare_demo``


@dataclass
class Query:
    """One attributed image: what is needed to re-rank it without running the model again.

    Attributes:
        latents: (1, 4, h, w) float latents of the image.
        prompt: The prompt it is attributed with.
        features: Projected query features per feature set name, each (1, k).
        image_path: The saved PNG (generations) or the uploaded file.
        info: Query metadata shown with the attribution ("seed", "source", "prompt_from", "prompt_note").
    """
    latents: torch.Tensor  # (1, 4, h, w)
    prompt: str
    features: dict[str, torch.Tensor]
    image_path: str  # the saved PNG (generations) or the upload
    info: dict = field(default_factory=dict)
