"""`das-sd generate`: text-to-image with the base model (and optionally a LoRA), with provenance.

The Python API returns the final latents next to the images, because attribution featurizes the
generated latent directly (no VAE round trip). Saved PNGs carry their generation parameters
(``png_metadata``: an AUTOMATIC1111-style ``parameters`` text and a ``das_sd`` JSON chunk with the
exact settings and the base / LoRA fingerprints).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from .png_metadata import save_png
from .seeds import generator

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import PreTrainedTokenizerBase


@dataclass
class GenerationSettings:
    """What to generate: the parameters a generated PNG records.

    Attributes:
        prompt: The text prompt.
        negative_prompt: The negative prompt; "" for none.
        seed: Seed of the first image; image i uses ``seed + i``.
        steps: Sampler steps.
        guidance: Classifier-free guidance scale.
        num_images: How many images, one seed each.
        lora_scale: Strength of a loaded LoRA (1: as trained).
        width: Image width in pixels; None: the model's native resolution.
        height: Image height in pixels; None: the model's native resolution.
    """
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 4.0
    num_images: int = 1
    lora_scale: float = 1.0
    width: int | None = None  # None: the model's native resolution
    height: int | None = None


@dataclass
class GenerationResult:
    """Images generated with ``generate``, with the latents attribution needs.

    Attributes:
        images: The decoded images, one per seed.
        latents: (n, 4, h/8, w/8) float32 on the CPU: the final latents x_0 the images were decoded from.
        seeds: The seed of each image.
        settings: The settings they were generated with.
        provenance: Base / LoRA names and fingerprints, and the scheduler's class name.
    """
    images: list[Image.Image]
    latents: torch.Tensor  # (n, 4, h/8, w/8): the final latents x_0 the images were decoded from
    seeds: list[int]
    settings: GenerationSettings
    provenance: dict = field(default_factory=dict)  # base / LoRA names and fingerprints

    def metadata(self, index: int) -> dict:
        """What the PNG of one image records.

        Args:
            index: Which image.

        Returns:
            The settings as a dict with that image's seed and ``num_images`` 1, plus the provenance.
        """
        return {**asdict(self.settings), "seed": self.seeds[index], "num_images": 1, **self.provenance}


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, settings: GenerationSettings, provenance: dict | None = None,
             progress: bool = False) -> GenerationResult:
    """Generate ``settings.num_images`` images; image i uses seed ``settings.seed + i`` (A1111 rule).

    The initial noise is drawn on the CPU, so a seed gives the same image on CPU and CUDA.

    Args:
        pipe: The pipeline, with its LoRA loaded if any; its own scheduler samples.
        settings: What to generate.
        provenance: Base / LoRA names and fingerprints to carry in the result; ``scheduler`` is
            added when absent.
        progress: Show a progress bar over the sampler steps.

    Returns:
        The images, their final latents and seeds.
    """
    seeds = [settings.seed + i for i in range(settings.num_images)]
    device = pipe.unet.device
    generators = [generator(s) for s in seeds]
    bar = tqdm(total=settings.steps, desc="generate", unit="step", disable=not progress)

    def on_step(_pipe, _i, _t, kwargs):
        bar.update(1)
        return kwargs

    # Sample the initial noise on the CPU so that a seed gives the same image on CPU and CUDA.
    size = (settings.height or pipe.unet.config.sample_size * pipe.vae_scale_factor,
            settings.width or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    shape = (1, pipe.unet.config.in_channels, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device, pipe.unet.dtype)
    latents = pipe(
        [settings.prompt] * len(seeds),
        negative_prompt=[settings.negative_prompt] * len(seeds) if settings.negative_prompt else None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=size[0], width=size[1],
        latents=noise,
        output_type="latent",
        cross_attention_kwargs={"scale": settings.lora_scale},
        callback_on_step_end=on_step,
    ).images
    bar.close()
    images = decode_latents(pipe, latents)
    info = dict(provenance or {})
    info.setdefault("scheduler", type(pipe.scheduler).__name__)
    return GenerationResult(images=images, latents=latents.float().cpu(), seeds=seeds, settings=settings,
                            provenance=info)


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Images from final latents, through the pipeline's VAE.

    Args:
        pipe: The pipeline whose VAE and image processor decode.
        latents: (n, 4, h/8, w/8) latents x_0 as the sampler returns them (scaled by the VAE's
            scaling factor).

    Returns:
        n PIL images.
    """
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def generate_to_files(settings: GenerationSettings, out: str | Path, base: str | Path | None = None,
                      lora: str | Path | None = None, device: str | None = None, progress: bool = True) -> list[Path]:
    """`das-sd generate`: load the base (None: the embedded tiny SD) and LoRA, generate, and save each
    image as a PNG carrying its parameters and the model fingerprints: ``out`` for one image,
    ``out`` with -NN suffixes for several. A prompt the text encoder reads only in part is warned
    about on stderr.

    Args:
        settings: What to generate.
        out: The PNG path; for several images, ``{stem}-00{suffix}``, ``{stem}-01{suffix}``, ... beside
            it (suffix ``.png`` when ``out`` has none).
        base: The base model folder; None: the embedded tiny SD.
        lora: The LoRA file or folder; None: the base alone.
        device: Where to run; None: CUDA when available, else the CPU.
        progress: Show a progress bar over the sampler steps.

    Returns:
        The paths written, one per image.
    """
    from .models.fingerprint import provenance
    from .models.loading import load_lora, load_pipeline, resolve_base, resolve_lora_file

    base = resolve_base(base)
    pipe = load_pipeline(base, device=device)
    lora = resolve_lora_file(lora) if lora else None
    if lora:
        load_lora(pipe, lora)
    warn_truncated_prompts(pipe.tokenizer, [settings.prompt, settings.negative_prompt or ""])
    result = generate(pipe, settings, provenance(base, lora), progress=progress)
    out = Path(out)
    paths = []
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i:02d}{out.suffix or '.png'}")
        meta = result.metadata(i) | {"width": image.width, "height": image.height}
        paths.append(save_png(image, path, meta))
    return paths


def dropped_prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """How many tokens of ``prompt`` the text encoder never sees: CLIP reads ``model_max_length``
    (77) tokens, start and end included, and diffusers cuts the rest silently.

    Args:
        tokenizer: The pipeline's tokenizer.
        prompt: The prompt.

    Returns:
        The number of tokens cut; 0 when the prompt fits.
    """
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    return max(0, len(ids) - int(tokenizer.model_max_length))


def truncation_note(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str | None:
    """A sentence for the user when the prompt is longer than the text encoder reads, else None.

    Args:
        tokenizer: The pipeline's tokenizer.
        prompt: The prompt.

    Returns:
        The sentence (how many tokens had no effect), or None when the prompt fits.
    """
    dropped = dropped_prompt_tokens(tokenizer, prompt)
    if not dropped:
        return None
    return (f"the prompt is longer than the text encoder reads ({tokenizer.model_max_length} tokens): "
            f"its last {dropped} token{'s' if dropped != 1 else ''} had no effect")


def warn_truncated_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> None:
    """Say on stderr which prompts the text encoder reads only in part (diffusers cuts them silently).

    Args:
        tokenizer: The pipeline's tokenizer.
        prompts: The prompts; each distinct one is checked once.
    """
    for prompt in dict.fromkeys(prompts):
        note = truncation_note(tokenizer, prompt)
        if note:
            print(f"das-sd: warning: {shorten(prompt, 80)!r}: {note}", file=sys.stderr)


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, for echoing user input in messages.

    Args:
        text: The text.
        limit: The most characters returned, ellipsis included.

    Returns:
        ``text`` unchanged when it fits; else with runs of whitespace made single spaces and cut.
    """
    text = " ".join(text.split()) if len(text) > limit else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"
