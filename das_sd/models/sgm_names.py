"""The original (LDM / SGM) module names of a diffusers UNet, as kohya's sd-scripts names SDXL LoRA layers
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and A1111, Forge and ComfyUI read them.

The original UNet numbers its blocks flat: ``input_blocks.0.0`` is ``conv_in``; then, level by level,
one ``input_blocks.k`` per ResNet (``.0``, with the level's transformer as ``.1``) and one for the
level's downsampler (``.0.op``) except after the last level; ``middle_block.0/1/2`` are the middle
ResNet, transformer and ResNet; ``output_blocks.k`` has one entry per up-level ResNet (``.0``, the
transformer ``.1``), the level's upsampler (``.1.conv`` or, after a transformer, ``.2.conv``) in its
last entry. A ResNet's parts are ``in_layers.0/2`` (norm1, conv1), ``emb_layers.1`` (time_emb_proj),
``out_layers.0/3`` (norm2, conv2) and ``skip_connection`` (conv_shortcut); a transformer's parts keep
their diffusers names. The table follows from the UNet config: the level count, ``layers_per_block``
and which levels have attention (their block types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

# SDXL base's block layout (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json); every SDXL base
# model (and LoRA for one) shares it, whatever its weights
SDXL_BASE_LAYOUT = {"layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn",
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
OUTSIDE_BLOCKS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                  "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
BLOCK_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True, "UpBlock2D": False, "CrossAttnUpBlock2D": True}
SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def _has_attention(kind: str) -> bool:
    if kind not in BLOCK_TYPES:
        raise ModelError(f"the UNet has a {kind} block, for which das-sd knows no original (SGM) layer names "
                         f"(it knows {', '.join(BLOCK_TYPES)})")
    return BLOCK_TYPES[kind]


def block_prefixes(config: Mapping) -> dict[str, str]:
    """diffusers block path -> original block path, for every ResNet, transformer, down- and upsampler.

    Args:
        config: The UNet config's ``layers_per_block`` (an int or one per level), ``down_block_types``,
            ``up_block_types`` and ``mid_block_type``.

    Returns:
        E.g. ``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``,
        ``down_blocks.0.downsamplers.0.conv`` -> ``input_blocks.3.0.op``.

    Raises:
        ModelError: When a block type or the middle block has no original layout das-sd knows.
    """
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    per_level = config["layers_per_block"]
    per_down = [per_level] * len(down) if isinstance(per_level, int) else list(per_level)
    per_up = list(reversed(per_down))  # diffusers builds up level i with reversed(layers_per_block)[i] + 1 ResNets
    table, index = {}, 1
    for i, kind in enumerate(down):
        attention = _has_attention(kind)
        for j in range(per_down[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if attention:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down) - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid != "UNetMidBlock2DCrossAttn":
        raise ModelError(f"the UNet's middle block is a {mid}, for which das-sd knows no original (SGM) layer names")
    table.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                  "mid_block.resnets.1": "middle_block.2"})
    index = 0
    for i, kind in enumerate(up):
        attention = _has_attention(kind)
        for j in range(per_up[i] + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == per_up[i] and i < len(up) - 1:
                table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    return table


def to_sgm_path(path: str, blocks: Mapping[str, str]) -> str | None:
    """The original name of a diffusers UNet module path.

    Args:
        path: A module path, e.g. ``down_blocks.1.resnets.0.conv1``.
        blocks: ``block_prefixes`` of the UNet's config.

    Returns:
        E.g. ``input_blocks.4.0.in_layers.2``; None for a module without one (an activation, a
        dropout, a block container).
    """
    if path in OUTSIDE_BLOCKS:
        return OUTSIDE_BLOCKS[path]
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in blocks:
            rest = parts[end:]
            if ".resnets." in prefix:
                if not rest or rest[0] not in RESNET_PARTS:
                    return None
                rest = RESNET_PARTS[rest[0]].split(".") + rest[1:]
            return ".".join([blocks[prefix], *rest])
    return None


def sgm_aliases(unet: torch.nn.Module) -> dict[str, str]:
    """Original module path -> diffusers module path, for every module of a UNet that has an original name.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (its config gives the block layout).

    Returns:
        E.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` ->
        ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.

    Raises:
        ModelError: When the UNet's block layout has no original names das-sd knows.
    """
    blocks = block_prefixes(unet.config)
    aliases = {}
    for name, _ in unet.named_modules():
        sgm = to_sgm_path(name, blocks) if name else None
        if sgm is not None:
            aliases[sgm] = name
    return aliases


def uses_sgm_names(names: list[str]) -> bool:
    """Whether kohya UNet layer names (``input_blocks_4_1_...``, without ``lora_unet_``) use the original layout.

    Args:
        names: The layer names.

    Returns:
        True when any name starts with an original block root (``input_blocks``, ``middle_block``, ...).
    """
    return any(name.startswith(tuple(root + "_" for root in SGM_ROOTS)) for name in names)
