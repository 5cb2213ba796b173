"""diffusers -> original (CompVis LDM / A1111) key layout of SD 1.x / 2.x checkpoints, to write the
single-file checkpoints the tests load: the inverse of what diffusers' single-file loading reads.

- UNet (``model.diffusion_model.``): ``input_blocks.{n}`` / ``middle_block.{0,1,2}`` /
  ``output_blocks.{n}``, where level l, layer j of the down path is input block 3l + j + 1 (its
  downsampler input block 3l + 3), and up level l, layer j is output block 3l + j (its upsampler the
  last item of output block 3l + 2); ResNet layers in_layers / emb_layers / out_layers / skip_connection.
- VAE (``first_stage_model.``): ``encoder.down.{l}.block.{j}``, ``decoder.up.{L-1-l}.block.{j}``
  (the decoder's levels are numbered from the bottom), ``mid.block_1 / attn_1 / block_2``, attention
  as 1x1 convs q / k / v / proj_out, ResNet shortcuts ``nin_shortcut``.
- Text encoder: SD 1.x keeps transformers' CLIPTextModel keys under ``cond_stage_model.transformer.``
  (with ``text_model.``); SD 2.x keeps OpenCLIP's under ``cond_stage_model.model.``
  (``transformer.resblocks.{i}`` with q, k, v fused into ``attn.in_proj_*``, one more block than the
  23-of-24-layer diffusers encoder, unused, and ``text_projection`` stored as (in, out)).
"""
from __future__ import annotations

import torch

_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _rename(name: str, pairs) -> str:
    for new, old in pairs:
        name = name.replace(new, old)
    return name


def unet_to_ldm(state: dict[str, torch.Tensor], layers: int = 2) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict (SD 1.x / 2.x layout) in LDM naming."""
    out = {}
    per_down, per_up = layers + 1, layers + 1
    for key, value in state.items():
        parts = key.split(".")
        top = next((p for p in _UNET_TOP if key.startswith(p)), None)
        if top:
            name = _UNET_TOP[top] + key[len(top):]
        elif parts[0] == "down_blocks":
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":  # down_blocks.l.downsamplers.0.conv.* -> input_blocks.3l+3.0.op.*
                name = f"input_blocks.{per_down * (level + 1)}.0.op." + ".".join(parts[5:])
            else:
                block = f"input_blocks.{per_down * level + j + 1}"
                name = f"{block}.0.{_rename(rest, _RESNET)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            name = f"middle_block.{2 * j}.{_rename(rest, _RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "upsamplers":  # after the resnet (.0) and, when the level has one, the attention (.1)
                has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
                name = f"output_blocks.{per_up * level + layers}.{2 if has_attention else 1}.conv." + ".".join(parts[5:])
            else:
                block = f"output_blocks.{per_up * level + j}"
                name = f"{block}.0.{_rename(rest, _RESNET)}" if kind == "resnets" else f"{block}.1.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + name] = value
    return out


_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM naming (attention projections as 1x1 convs)."""
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if key.startswith(("quant_conv.", "post_quant_conv.")) or parts[1] in ("conv_in", "conv_out"):
            name = key
        elif parts[1] == "conv_norm_out":
            name = f"{side}.norm_out.{parts[2]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            level, kind, j, rest = int(parts[2]), parts[3], int(parts[4]), ".".join(parts[5:])
            where = f"encoder.down.{level}" if side == "encoder" else f"decoder.up.{levels - 1 - level}"
            if kind in ("downsamplers", "upsamplers"):
                name = f"{where}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
            else:
                name = f"{where}.block.{j}.{_rename(rest, _VAE_RESNET)}"
        elif parts[1] == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                name = f"{side}.mid.block_{j + 1}.{rest}"
            else:
                name = f"{side}.mid.attn_1.{_rename(rest, _VAE_ATTENTION)}"
                if value.ndim == 2:  # linear -> 1x1 conv, as the original stores them
                    value = value[:, :, None, None]
        else:
            raise KeyError(key)
        out["first_stage_model." + name] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x: a transformers CLIPTextModel state dict under ``cond_stage_model.transformer.text_model.``
    (transformers >= 5.6 saves it without ``text_model.``; checkpoints have it), with the
    ``position_ids`` buffer real SD 1.x checkpoints carry."""
    out = {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
           for k, v in state.items()}
    positions = out["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


_OPEN_CLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def open_clip_to_ldm(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """SD 2.x: a CLIPTextModel state dict (the penultimate-layer encoder diffusers builds) in OpenCLIP
    naming under ``cond_stage_model.model.``, plus the parts SD 2.x never uses: one more resblock,
    ``text_projection`` and ``logit_scale`` (random, so that a loader reading them would show)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    prefix = "cond_stage_model.model."
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"]}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{p}self_attn.{x}_proj.{kind}"] for x in ("q", "k", "v")])
        for key, value in state.items():
            if key.startswith(p) and not any(f"self_attn.{x}_proj." in key for x in ("q", "k", "v")):
                out[f"{prefix}transformer.resblocks.{i}." + _rename(key[len(p):], _OPEN_CLIP_LAYER)] = value
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in out if f"resblocks.{layers - 1}." in k]:  # the unused last block
        out[key.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")] = torch.randn(out[key].shape, generator=g)
    hidden = out[prefix + "ln_final.weight"].shape[0]
    out[prefix + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def pipeline_to_ldm(pipe, family: str) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict (what a single-file checkpoint holds),
    with the LDM DDPM schedule buffers real checkpoints carry beside the models."""
    text = pipe.text_encoder.state_dict()
    state = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block),
             **vae_to_ldm(pipe.vae.state_dict()),
             **(clip_to_ldm(text) if family == "sd15" else open_clip_to_ldm(text))}
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    state.update({"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
                  "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1].float()])})
    return {k: v.detach().contiguous() for k, v in state.items()}
