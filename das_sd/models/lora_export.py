"""`das-sd export-lora`: a diffusers-format LoRA (as das-sd trains them) in kohya naming (A1111,
ComfyUI) or as a peft adapter file, with the same behaviour.

The scale of every layer (``lora_alpha / r`` of the adapter config diffusers records in the file's
header, per layer with ``alpha_pattern`` / ``rank_pattern``; see ``lora_weights``) travels with it:
- kohya: an ``alpha`` per layer equal to scale * rank, so that ``alpha / rank`` is the scale again;
- peft: the scale is folded into ``lora_B`` (a scale-1 file: any ``adapter_config.json`` with
  ``lora_alpha = r`` per layer, or none for das-sd, gives the same update).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ModelError
from .lora_files import adapter_metadata, read_lora, resolve_lora_file
from .lora_weights import diffusers_layers

if TYPE_CHECKING:
    from collections.abc import Mapping

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def to_kohya(state: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Convert a diffusers LoRA state dict (UNet and text encoder) to kohya / A1111 naming.

    Args:
        state: A diffusers LoRA state dict (``unet.*`` / ``text_encoder.*`` keys).
        metadata: The adapter metadata diffusers records in the file (``lora_files.adapter_metadata``);
            None: every layer has scale 1.

    Returns:
        The state dict with ``lora_unet_*`` / ``lora_te_*`` keys and an ``alpha`` per layer that gives
        the layer its scale (alpha / rank).

    Raises:
        ModelError: When a key is not a diffusers LoRA key, or a layer's scale is 0 (kohya reads
            alpha 0 as scale 1).
    """
    out: dict[str, torch.Tensor] = {}
    for (model, module), layer in diffusers_layers(state, metadata).items():
        name = KOHYA_PREFIXES[model] + module.replace(".", "_")
        if layer.alpha == 0:
            raise ModelError(f"LoRA layer {module!r} has scale 0, which kohya files cannot hold (alpha 0 reads as 1)")
        out[f"{name}.lora_down.weight"] = layer.down.contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.contiguous()
        # float32 as sd-scripts writes it; float64 weights keep a float64 alpha (no rounding of the scale)
        dtype = torch.float64 if layer.down.dtype == torch.float64 else torch.float32
        out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
    return out


def to_peft(state: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Convert a diffusers UNet LoRA state dict to peft ``adapter_model.safetensors`` naming, each
    layer's scale folded into its ``lora_B`` (scale 1 in the file).

    Args:
        state: A diffusers LoRA state dict with UNet keys only.
        metadata: The adapter metadata diffusers records in the file; None: every layer has scale 1.

    Returns:
        The state dict with ``base_model.model.*.lora_A`` / ``lora_B`` keys.

    Raises:
        ModelError: When the LoRA also has text-encoder layers, or a key is not a diffusers LoRA key.
    """
    layers = diffusers_layers(state, metadata)
    text_layers = [module for model, module in layers if model != "unet"]
    if text_layers:
        raise ModelError("a peft adapter file holds one model, and this LoRA also has text-encoder layers "
                         f"(e.g. {text_layers[0]!r}); convert it to kohya instead")
    out = {}
    for (_, module), layer in layers.items():
        out[f"base_model.model.{module}.lora_A.weight"] = layer.down.contiguous()
        up = layer.up if layer.scale == 1 else layer.up * layer.scale
        out[f"base_model.model.{module}.lora_B.weight"] = up.contiguous()
    return out


def export_lora(lora: str | Path, to: str, out: str | Path) -> Path:
    """`das-sd export-lora`: write a diffusers-format LoRA (as das-sd trains them) in kohya naming
    (A1111, ComfyUI) or as a peft adapter file, atomically, each layer's scale kept; returns ``out``.

    Args:
        lora: The diffusers-format LoRA file or folder.
        to: The target naming: "kohya" or "peft".
        out: The file to write; its folder is created.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: When ``to`` is neither "kohya" nor "peft".
        ModelError: When the LoRA is not a readable diffusers-format LoRA, or cannot be converted.
    """
    from safetensors.torch import save

    from ..io import atomic_write_bytes

    converters = {"kohya": to_kohya, "peft": to_peft}
    if to not in converters:
        raise ValueError(f"--to {to!r}: expected one of {sorted(converters)}")
    file = resolve_lora_file(lora)
    state, fmt = read_lora(file)
    if fmt != "diffusers":
        raise ModelError(f"{lora}: export converts diffusers-format LoRAs (this one is {fmt})")
    try:
        converted = converters[to](state, adapter_metadata(file))
    except ModelError as exc:
        raise ModelError(f"{file}: {exc}") from None
    header = {"format": "pt", "das_sd_export": to}
    if to == "peft":
        header["das_sd_lora_scale"] = "folded into lora_B: every layer has scale 1 (lora_alpha = r)"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(converted, metadata=header))
    return out
