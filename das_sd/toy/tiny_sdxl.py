"""The embedded tiny SDXL: architecture (configs) of every component.

Same component classes and folder layout as SDXL base (UNet2DConditionModel with the added "text_time"
embedding, CLIPTextModel + CLIPTextModelWithProjection, AutoencoderKL, Euler scheduler), shrunk as the
tiny SD is (``tiny_sd``): 32x32 RGB images <-> 8x8x4 latents. SDXL's VAE has SD's layout, so the tiny
SDXL reuses the tiny SD's trained VAE (and its scaling factor) and its tokenizer for both encoders.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .tiny_sd import MAX_TOKENS, RESOLUTION, TEXT_HIDDEN

POOLED_DIM = TEXT_HIDDEN
TIME_EMBED_DIM = 16  # per size value; SDXL: 256
# SDXL's size conditioning of the tiny model's training images: 32x32 originals, uncropped, at 32x32.
TIME_IDS = (RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)

# SDXL's scheduler: Euler with SD's training noise schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def new_unet() -> UNet2DConditionModel:
    """A freshly initialised UNet with SDXL's block layout at tiny widths, on 8x8x4 latents.

    SDXL's layout: the first level without attention, transformer depth growing with depth (1 at
    the second level, 2 in the mid block; SDXL: 1 / 2 / 10), linear proj_in / proj_out, cross-attention
    to both text encoders' states concatenated, and the "text_time" embedding of the pooled text
    embedding and the six size values.

    Returns:
        The untrained ``UNet2DConditionModel`` (32/64 channels).
    """
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
        norm_num_groups=32,
    )


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=POOLED_DIM,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def new_text_encoders(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """Freshly initialised 2-layer text encoders as SDXL pairs them: a CLIP-L-style ``CLIPTextModel``
    (quick_gelu) and a bigG-style ``CLIPTextModelWithProjection`` (gelu, projected pooled embedding).

    Args:
        tokenizer: The embedded tokenizer (vocabulary size and special token ids).

    Returns:
        The untrained encoders: hidden size 64 each, pooled embedding of 64.
    """
    return (CLIPTextModel(_text_config(tokenizer, "quick_gelu")),
            CLIPTextModelWithProjection(_text_config(tokenizer, "gelu")))


def new_scheduler() -> EulerDiscreteScheduler:
    """An Euler scheduler with SD's training noise schedule, as SDXL base ships (``SCHEDULER_CONFIG``).

    Returns:
        The scheduler.
    """
    return EulerDiscreteScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae: AutoencoderKL, text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
                      tokenizer: CLIPTokenizer, unet: UNet2DConditionModel) -> StableDiffusionXLPipeline:
    """A ``StableDiffusionXLPipeline`` of the components, with a new Euler scheduler.

    Args:
        vae: The VAE (the tiny SD's).
        text_encoders: The two text encoders.
        tokenizer: The tokenizer of both.
        unet: The UNet.

    Returns:
        The pipeline. Its unconditional branch encodes the empty prompt (``force_zeros_for_empty_prompt``
        off), as the tiny SDXL was trained with dropped captions; no invisible watermark (32x32 images).
    """
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=new_scheduler(), force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
