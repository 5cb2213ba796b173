"""diffusers -> original (Stability's SGM) names of SDXL base, typed out by hand for SDXL's block layout (not
derived the way das-sd derives them), to write the kohya LoRA files and single-file checkpoints the SDXL
tests load.

- UNet (``model.diffusion_model.``; kohya ``lora_unet_``): ``SGM_BLOCKS`` below; ResNet parts
  in_layers / emb_layers / out_layers / skip_connection; transformers keep their diffusers names.
- Text encoders: CLIP ViT-L as transformers' keys under ``conditioner.embedders.0.transformer.``;
  OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (``transformer.resblocks.{i}`` with q, k, v
  fused into ``attn.in_proj_*``, ``text_projection`` stored as (in, out), all 32 layers used by SDXL).
- VAE: SD's (``ldm_layout.vae_to_ldm``).
"""
from __future__ import annotations

import torch

from ldm_layout import vae_to_ldm

# SDXL base's original UNet blocks: level 0 (no attention) is input_blocks 1-2 with its downsampler in 3;
# level 1 is 4-5 (ResNet .0, transformer .1), downsampler 6; level 2 is 7-8; the middle block is ResNet,
# transformer, ResNet; output_blocks 0-2 and 3-5 are the attention levels (the upsampler after the
# transformer: .2.conv), 6-8 the level without attention.
SGM_BLOCKS = {
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0", "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0", "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.0": "input_blocks.7.0", "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.resnets.1": "input_blocks.8.0", "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0", "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.resnets.2": "output_blocks.2.0", "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.3.0", "up_blocks.1.attentions.0": "output_blocks.3.1",
    "up_blocks.1.resnets.1": "output_blocks.4.0", "up_blocks.1.attentions.1": "output_blocks.4.1",
    "up_blocks.1.resnets.2": "output_blocks.5.0", "up_blocks.1.attentions.2": "output_blocks.5.1",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.0": "output_blocks.6.0", "up_blocks.2.resnets.1": "output_blocks.7.0",
    "up_blocks.2.resnets.2": "output_blocks.8.0",
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_name(path: str) -> str:
    """The original path of a diffusers SDXL UNet module or weight (``...resnets.0.conv1.weight`` ->
    ``input_blocks.1.0.in_layers.2.weight``)."""
    block = max((b for b in SGM_BLOCKS if path == b or path.startswith(b + ".")), key=len)
    rest = path[len(block) + 1:].split(".") if path != block else []
    if ".resnets." in block:
        rest = RESNET[rest[0]].split(".") + rest[1:]
    return ".".join([SGM_BLOCKS[block], *rest])


_OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_bigg(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP naming under ``prefix``."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"],
           prefix + "text_projection": state["text_projection.weight"].T,  # OpenCLIP multiplies x @ P
           prefix + "logit_scale": torch.tensor(4.6052)}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{p}self_attn.{x}_proj.{kind}"] for x in ("q", "k", "v")])
        for old, new in _OPEN_CLIP.items():
            for kind in ("weight", "bias"):
                out[f"{prefix}transformer.resblocks.{i}.{new}.{kind}"] = state[f"{p}{old}.{kind}"]
    return out


def sdxl_pipeline_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """The whole SDXL pipeline as one original-layout state dict, what an SDXL single file holds."""
    state = {"model.diffusion_model." + sgm_name(k): v for k, v in pipe.unet.state_dict().items()}
    state.update(vae_to_ldm(pipe.vae.state_dict()))
    state.update({"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in pipe.text_encoder.state_dict().items()})
    state.update(open_clip_bigg(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous() for k, v in state.items()}
