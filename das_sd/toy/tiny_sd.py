"""The embedded tiny Stable Diffusion: architecture (configs) of every component.

Same component classes and folder layout as Stable Diffusion 1.x (UNet2DConditionModel, CLIPTextModel +
CLIPTokenizer, AutoencoderKL, DDIM scheduler), shrunk so that it trains from scratch on a CPU:
32x32 RGB images <-> 8x8x4 latents.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

RESOLUTION = 32
MAX_TOKENS = 32
TEXT_HIDDEN = 64

# Stable Diffusion 1.x's noise schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def new_vae() -> AutoencoderKL:
    """A freshly initialised VAE: 32x32 RGB <-> 8x8x4 latents (three blocks, 32/64/64 channels).

    Returns:
        The untrained ``AutoencoderKL``.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )


def new_unet() -> UNet2DConditionModel:
    """A freshly initialised UNet on 8x8x4 latents with cross-attention to the text encoder's states.

    Returns:
        The untrained ``UNet2DConditionModel`` (two cross-attention blocks, 32/64 channels).
    """
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def new_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A freshly initialised 2-layer CLIP text encoder sized to the tokenizer's vocabulary.

    Args:
        tokenizer: The embedded tokenizer (vocabulary size and special token ids).

    Returns:
        The untrained ``CLIPTextModel``: hidden size 64, at most ``MAX_TOKENS`` tokens.
    """
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def new_scheduler() -> DDIMScheduler:
    """A DDIM scheduler with Stable Diffusion 1.x's noise schedule (``SCHEDULER_CONFIG``).

    Returns:
        The scheduler.
    """
    return DDIMScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of the components, with a new DDIM scheduler and no safety checker.

    Args:
        vae: The VAE.
        text_encoder: The text encoder.
        tokenizer: Its tokenizer.
        unet: The UNet.

    Returns:
        The pipeline.
    """
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=new_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_portable_text_encoder(folder: str | Path) -> None:
    """Rewrite a saved CLIPTextModel's (or CLIPTextModelWithProjection's) keys in the classic
    ``text_model.*`` (and ``text_projection.*``) layout.

    Recent transformers save CLIPTextModel without the ``text_model.`` prefix; older releases
    (5.5, which InvokeAI pins, and every 4.x) do not recognise those keys and silently initialise a
    random text encoder. Every release loads the classic layout, which real SD 1.x checkpoints use.

    Args:
        folder: The saved text encoder folder; its ``model.safetensors`` is replaced in place.
    """
    file = Path(folder) / "model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        metadata = fh.metadata()
        # CLIPTextModelWithProjection's projection sits beside text_model, unprefixed, in every release
        tensors = {("" if k.startswith(("text_model.", "text_projection.")) else "text_model.") + k: fh.get_tensor(k)
                   for k in fh.keys()}
    tmp = file.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(file)
