"""Stable Diffusion pipelines with the real layer layout of SD 1.5 and SD 2.x at reduced widths, built
from diffusers / transformers classes with random weights (no downloads), and LoRA state dicts in the
forms people train: attention-only, kohya with the 1x1 conv projections, LoCon (3x3 ResNet convs too).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from das_sd.models.loading import embedded_base_path

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
KOHYA_DEFAULT = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]  # conv 1x1 projections in SD 1.x
LOCON = KOHYA_DEFAULT + ["conv1", "conv2", "conv_shortcut", "conv"]  # + ResNet 3x3 (and up/down sampler) convs


def sd_unet(family: str = "sd15", width: int = 32, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """A UNet with the block layout of SD 1.5 ("sd15": conv proj_in/out, 8 heads) or SD 2.x ("sd2":
    linear proj_in/out, heads of 64 channels scaled down), four levels, two layers per block."""
    channels = (width, 2 * width, 4 * width, 4 * width)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=cross_attention_dim, norm_num_groups=8)
    if family == "sd15":
        return UNet2DConditionModel(**common, attention_head_dim=8, use_linear_projection=False)
    if family == "sd2":
        return UNet2DConditionModel(**common, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True)
    raise ValueError(family)


def sd_pipeline(family: str = "sd15", prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    """A whole pipeline around ``sd_unet``: CLIP text encoder (quick_gelu for SD 1.x, gelu for SD 2.x),
    an SD-layout VAE at reduced width, the embedded model's tokenizer (its vocabulary sizes the text
    encoder) and SD's DDPM training schedule."""
    torch.manual_seed(seed)
    unet = sd_unet(family)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=566, bos_token_id=564, eos_token_id=565, pad_token_id=565, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu" if family == "sd15" else "gelu"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    tokenizer = CLIPTokenizer.from_pretrained(embedded_base_path() / "tokenizer", local_files_only=True)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, num_train_timesteps=1000, steps_offset=1,
                              clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_unet(width: int = 32, text_dims: tuple[int, int] = (32, 32), pooled_dim: int = 32,
              time_embed_dim: int = 8) -> UNet2DConditionModel:
    """A UNet with SDXL base's block layout at reduced widths: three levels (the first without
    attention), two ResNets per block, linear proj_in/out, transformer depths 1 / 2 / 3 (SDXL: 1 / 2 /
    10), heads of width / 4 channels, cross-attention to both text encoders' states concatenated,
    and the added "text_time" embedding of the pooled text embedding and six size values."""
    channels = (width, 2 * width, 4 * width)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=sum(text_dims), addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim, norm_num_groups=8)


def sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0, text_widths: tuple[int, int] = (32, 32)
                  ) -> StableDiffusionXLPipeline:
    """A whole SDXL-layout pipeline around ``sdxl_unet``: CLIP ViT-L-style text encoder (quick_gelu)
    and a bigG-style CLIPTextModelWithProjection (gelu, projected pooled embedding), of ``text_widths``
    (SDXL: 768, 1280; single files need them to differ, as diffusers tells the encoders apart by width),
    an SD-layout VAE (SDXL's VAE has SD's layout) with SDXL's scaling factor, the embedded tokenizer
    for both, and SDXL's Euler scheduler with SD's training schedule."""
    torch.manual_seed(seed)
    unet = sdxl_unet(text_dims=text_widths)
    common = dict(vocab_size=566, bos_token_id=564, eos_token_id=565, pad_token_id=565,
                  num_attention_heads=4, max_position_embeddings=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, hidden_size=text_widths[0], intermediate_size=2 * text_widths[0],
                                                num_hidden_layers=2, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        **common, hidden_size=text_widths[1], intermediate_size=2 * text_widths[1], num_hidden_layers=3,
        hidden_act="gelu", projection_dim=32))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.13025, force_upcast=True)
    tokenizer = CLIPTokenizer.from_pretrained(embedded_base_path() / "tokenizer", local_files_only=True)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type=prediction_type, num_train_timesteps=1000, steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


def add_random_lora(unet: UNet2DConditionModel, targets: list[str], rank: int = 4, alpha: float | None = None,
                    seed: int = 0, dtype: torch.dtype | None = None) -> None:
    """A peft LoRA on ``targets`` (module name suffixes) with random A and B (B is zero at init)."""
    names = sorted({name for name, _ in unet.named_modules() if any(name.endswith(t) for t in targets)})
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=names, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if ".lora_" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.2).to(p.dtype)
    if dtype is not None:
        unet.to(dtype)


def save_pipeline(pipe: StableDiffusionPipeline, folder: Path) -> Path:
    """Write the pipeline as a diffusers folder (safetensors), as users keep them."""
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
