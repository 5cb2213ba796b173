"""`das-sd export-lora`: a diffusers-format LoRA (as das-sd trains them) in kohya naming (A1111,
ComfyUI; SDXL UNet layers by their original SGM paths, see ``sgm_names``) or as a peft adapter file,
with the same behaviour.

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
from .sgm_names import SDXL_BASE_LAYOUT, block_prefixes, to_sgm_path

if TYPE_CHECKING:
    from collections.abc import Mapping

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_KOHYA_PREFIXES = {**KOHYA_PREFIXES, "text_encoder": "lora_te1_"}  # sd-scripts' SDXL naming


def to_kohya(state: Mapping[str, torch.Tensor], metadata: Mapping | None = None,
             sgm_layout: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Convert a diffusers LoRA state dict (UNet and text encoders) to kohya / A1111 naming.

    Args:
        state: A diffusers LoRA state dict (``unet.*`` / ``text_encoder.*`` keys).
        metadata: The adapter metadata diffusers records in the file (``lora_files.adapter_metadata``);
            None: every layer has scale 1.
        sgm_layout: For an SDXL LoRA, the UNet config (``sgm_names.block_prefixes``) whose original
            (SGM) module paths name the UNet layers, with ``lora_te1_`` / ``lora_te2_`` for the text
            encoders, as sd-scripts writes SDXL files; None: UNet layers named by their diffusers
            paths and ``lora_te_`` for the text encoder (sd-scripts' SD 1.x / 2.x naming).

    Returns:
        The state dict with ``lora_unet_*`` / ``lora_te*_*`` keys and an ``alpha`` per layer that gives
        the layer its scale (alpha / rank).

    Raises:
        ModelError: When a key is not a diffusers LoRA key, a layer's scale is 0 (kohya reads alpha 0
            as scale 1), or a UNet layer has no original name in ``sgm_layout``.
    """
    blocks = block_prefixes(sgm_layout) if sgm_layout is not None else None
    prefixes = SDXL_KOHYA_PREFIXES if blocks is not None else KOHYA_PREFIXES
    out: dict[str, torch.Tensor] = {}
    for (model, module), layer in diffusers_layers(state, metadata).items():
        path = module
        if model == "unet" and blocks is not None:
            path = to_sgm_path(module, blocks)
            if path is None:
                raise ModelError(f"UNet layer {module!r} has no name in the original (SGM) UNet layout of SDXL")
        name = prefixes[model] + path.replace(".", "_")
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


def sdxl_layout(file: Path, state: Mapping[str, torch.Tensor], base: str | Path | None) -> Mapping | None:
    """The SDXL UNet config whose original layer names a kohya export of ``file`` uses, or None for SD 1.x / 2.x.

    The base pipeline folder is ``base`` or, for a LoRA das-sd trained, the ``base`` its
    ``lora_record.json`` names (when that folder is here); without one, a LoRA with a
    ``text_encoder_2`` part is an SDXL LoRA with SDXL base's layout, and any other an SD 1.x / 2.x one.

    Args:
        file: The LoRA file.
        state: Its state dict (diffusers keys).
        base: The base pipeline folder, or None.

    Returns:
        The UNet config of an SDXL base, or None.

    Raises:
        ModelError: When ``base`` is given and is not a pipeline folder with a readable UNet config.
    """
    import json

    record = file.parent / "lora_record.json"
    if base is None and record.is_file():
        try:
            recorded = json.loads(record.read_text()).get("base")
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, str) and (Path(recorded) / "model_index.json").is_file():
            base = recorded
    if base is None:
        return SDXL_BASE_LAYOUT if any(key.startswith("text_encoder_2.") for key in state) else None
    folder = Path(base).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: not a diffusers pipeline folder with a readable unet/config.json ({exc})") from None
    return unet if index.get("_class_name") == "StableDiffusionXLPipeline" else None


def export_lora(lora: str | Path, to: str, out: str | Path, base: str | Path | None = None) -> Path:
    """`das-sd export-lora`: write a diffusers-format LoRA (as das-sd trains them) in kohya naming
    (A1111, ComfyUI; SDXL LoRAs with the original SGM UNet names, as sd-scripts writes them) or as a
    peft adapter file, atomically, each layer's scale kept; returns ``out``.

    Args:
        lora: The diffusers-format LoRA file or folder.
        to: The target naming: "kohya" or "peft".
        out: The file to write; its folder is created.
        base: The base pipeline folder, which tells an SDXL LoRA (see ``sdxl_layout``); None: the
            one the LoRA's record names, else told from the LoRA's parts.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: When ``to`` is neither "kohya" nor "peft".
        ModelError: When the LoRA is not a readable diffusers-format LoRA, or cannot be converted.
    """
    from safetensors.torch import save

    from ..io import atomic_write_bytes

    if to not in ("kohya", "peft"):
        raise ValueError(f"--to {to!r}: expected one of ['kohya', 'peft']")
    file = resolve_lora_file(lora)
    state, fmt = read_lora(file)
    if fmt != "diffusers":
        raise ModelError(f"{lora}: export converts diffusers-format LoRAs (this one is {fmt})")
    try:
        if to == "kohya":
            converted = to_kohya(state, adapter_metadata(file), sdxl_layout(file, state, base))
        else:
            converted = to_peft(state, adapter_metadata(file))
    except ModelError as exc:
        raise ModelError(f"{file}: {exc}") from None
    header = {"format": "pt", "das_sd_export": to}
    if to == "peft":
        header["das_sd_lora_scale"] = "folded into lora_B: every layer has scale 1 (lora_alpha = r)"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(converted, metadata=header))
    return out
