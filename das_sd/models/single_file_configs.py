"""The component configs das-sd ships for single-file SD 1.x / 2.x and SDXL checkpoints (das_sd/assets/single-file).

A single-file checkpoint holds weights only; diffusers needs each component's config to build the
models before it fills them in. These are the published architectures, written from their
hyperparameters with the diffusers / transformers config classes (no weights, no downloaded files):

- ``sd1``: Stable Diffusion 1.x (1.4, 1.5 and their fine-tunes): CLIP ViT-L/14 text encoder (768 wide,
  12 layers, quick_gelu), UNet with conv ``proj_in`` / ``proj_out``, 8 heads, epsilon prediction, 512 px;
- ``sd2-768-v``: Stable Diffusion 2.0 / 2.1 (768): OpenCLIP ViT-H/14 text encoder up to its penultimate
  layer (1024 wide, 23 of 24 layers, gelu), UNet with linear projections and 64-channel heads,
  v-prediction, 768 px;
- ``sd2-512-base``: Stable Diffusion 2.0 / 2.1 base: the same architecture, epsilon prediction, 512 px;
- ``sdxl``: SDXL base 1.0 and its fine-tunes: CLIP ViT-L/14 (as SD 1.x's) and OpenCLIP ViT-bigG/14 with
  its projection (1280 wide, 32 layers, gelu) text encoders, a three-level UNet (320 / 640 / 1280
  channels, the first level without attention, 1 / 2 / 10 transformer layers, 64-channel heads,
  2048-wide cross-attention, the "text_time" embedding of the pooled text and six sizes), SD's VAE
  layout with scaling factor 0.13025, Euler with SD's schedule ("leading" spacing), epsilon, 1024 px.

``write_configs`` regenerates the folders; tests/test_single_file.py checks the shipped files equal its
output and that the full-size models have the published parameter counts.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

FAMILIES = ("sd1", "sd2-768-v", "sd2-512-base", "sdxl")

# The noise schedule every SD 1.x / 2.x model was trained with.
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)

_UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)

_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)

# The special tokens' ids in the CLIP BPE vocabulary: <|startoftext|>, <|endoftext|>; SD 2.x pads with
# "!" (id 0), as OpenCLIP does, SD 1.x with <|endoftext|>.
_TEXT = {
    "sd1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    "sd2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
    "sdxl-bigG": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                      bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
}

_SDXL_UNET = dict(in_channels=4, out_channels=4, sample_size=128, layers_per_block=2,
                  block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
                  flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)


def architecture(family: str) -> dict:
    """The hyperparameters of one family's components.

    Args:
        family: One of ``FAMILIES``.

    Returns:
        ``{"unet": ..., "vae": ..., "text_encoder": ..., "scheduler": (class name, kwargs)}``: keyword
        arguments of UNet2DConditionModel, AutoencoderKL and CLIPTextConfig, and the scheduler; SDXL
        also has ``"text_encoder_2"`` (a CLIPTextConfig of a CLIPTextModelWithProjection).

    Raises:
        ValueError: When ``family`` is not one of ``FAMILIES``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown single-file family {family!r}; expected one of {FAMILIES}")
    if family == "sdxl":
        return {"unet": dict(_SDXL_UNET), "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                "text_encoder": dict(_TEXT["sd1"]), "text_encoder_2": dict(_TEXT["sdxl-bigG"]),
                "scheduler": ("EulerDiscreteScheduler", dict(_SCHEDULE, prediction_type="epsilon",
                                                             timestep_spacing="leading"))}
    if family == "sd1":
        unet = dict(_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return {"unet": unet, "vae": dict(_VAE, sample_size=512), "text_encoder": dict(_TEXT["sd1"]),
                "scheduler": ("PNDMScheduler", dict(_SCHEDULE, prediction_type="epsilon"))}
    v = family == "sd2-768-v"
    unet = dict(_UNET, sample_size=96 if v else 64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)
    scheduler = ("DDIMScheduler", dict(_SCHEDULE, prediction_type="v_prediction")) if v else \
        ("PNDMScheduler", dict(_SCHEDULE, prediction_type="epsilon"))
    return {"unet": unet, "vae": dict(_VAE, sample_size=768 if v else 512), "text_encoder": dict(_TEXT["sd2"]),
            "scheduler": scheduler}


def write_configs(folder: str | Path, family: str) -> Path:
    """Write one family's pipeline config folder (model_index.json and each component's config, no
    weights, no tokenizer: das-sd hands diffusers the tokenizer itself).

    Args:
        folder: Where to write; created.
        family: One of ``FAMILIES``.

    Returns:
        ``folder`` as a Path.

    Raises:
        ValueError: When ``family`` is not one of ``FAMILIES``.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    arch = architecture(family)
    folder = Path(folder)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with torch.device("meta"):  # the full config, defaults included, without allocating a weight
            cls(**arch[name]).save_config(folder / name)
    encoders = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    for name in (n for n in encoders if n in arch):
        text = CLIPTextConfig(**arch[name])
        text.architectures = [encoders[name]]
        text.save_pretrained(folder / name)
    scheduler_name, scheduler_kwargs = arch["scheduler"]
    scheduler = getattr(diffusers, scheduler_name)(**_scheduler_kwargs(scheduler_name, scheduler_kwargs))
    scheduler.save_config(folder / "scheduler")
    index = {"_diffusers_version": diffusers.__version__, "feature_extractor": [None, None],
             "image_encoder": [None, None], "scheduler": ["diffusers", scheduler_name],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "sdxl":
        index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"]})
    else:
        index.update({"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                      "safety_checker": [None, None]})
    _write_json(folder / "model_index.json", index)
    return folder


def _scheduler_kwargs(name: str, kwargs: dict) -> dict:
    # the schedule is shared; each class takes its own options (skip_prk_steps: PNDM; clip_sample: DDIM)
    import inspect

    import diffusers

    accepted = inspect.signature(getattr(diffusers, name).__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=list) + "\n")


def shipped_config(family: str) -> Path:
    """The config folder das-sd ships for a family.

    Args:
        family: One of ``FAMILIES``.

    Returns:
        ``das_sd/assets/single-file/<family>`` inside the installed package.

    Raises:
        ValueError: When ``family`` is not one of ``FAMILIES``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown single-file family {family!r}; expected one of {FAMILIES}")
    return Path(str(resources.files("das_sd") / "assets" / "single-file" / family))
