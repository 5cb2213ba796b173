"""`das-sd generate`: text-to-image with the base model (and optionally a LoRA), with provenance.

The Python API returns the final latents next to the images, because attribution featurizes the
generated latent directly (no VAE round trip). Saved PNGs carry their generation parameters twice:
as an AUTOMATIC1111-style ``parameters`` text (which every SD tool reads) and as a ``das_sd`` JSON
chunk with the exact settings and the base / LoRA fingerprints.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from .data.images import open_image
from .io import atomic_write_bytes
from .seeds import generator

PNG_PARAMETERS_KEY = "parameters"
PNG_DAS_KEY = "das_sd"
PNG_ATTRIBUTION_KEY = "das_sd_attribution"


@dataclass
class GenerationSettings:
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
    images: list[Image.Image]
    latents: torch.Tensor  # (n, 4, h/8, w/8): the final latents x_0 the images were decoded from
    seeds: list[int]
    settings: GenerationSettings
    provenance: dict = field(default_factory=dict)  # base / LoRA names and fingerprints

    def metadata(self, index: int) -> dict:
        return {**asdict(self.settings), "seed": self.seeds[index], "num_images": 1, **self.provenance}


@torch.no_grad()
def generate(pipe, settings: GenerationSettings, provenance: dict | None = None,
             progress: bool = False) -> GenerationResult:
    """Generate ``settings.num_images`` images; image i uses seed ``settings.seed + i`` (A1111 rule)."""
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
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def generate_to_files(settings: GenerationSettings, out: str | Path, base: str | Path | None = None,
                      lora: str | Path | None = None, device: str | None = None, progress: bool = True) -> list[Path]:
    """`das-sd generate`: load the base (None: the embedded tiny SD) and LoRA, generate, and save each
    image as a PNG carrying its parameters and the model fingerprints: ``out`` for one image,
    ``out`` with -NN suffixes for several. A prompt the text encoder reads only in part is warned
    about on stderr."""
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


def infotext(meta: dict) -> str:
    """AUTOMATIC1111's ``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs."""
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    pairs = {
        "Steps": meta.get("steps"), "Sampler": meta.get("scheduler"), "CFG scale": meta.get("guidance"),
        "Seed": meta.get("seed"), "Size": f"{meta.get('width')}x{meta.get('height')}" if meta.get("width") else None,
        "Model": meta.get("base_name"), "Model hash": meta.get("base_hash"),
        "Lora hashes": f"\"{meta['lora_name']}: {meta['lora_hash']}\"" if meta.get("lora_hash") else None,
        "Lora scale": meta.get("lora_scale") if meta.get("lora_hash") else None,
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def png_bytes(image: Image.Image, meta: dict, attribution: dict | None = None) -> bytes:
    """PNG with the generation parameters and, when given, its attribution record."""
    info = PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, infotext(meta))
    info.add_text(PNG_DAS_KEY, json.dumps(meta, sort_keys=True))
    if attribution is not None:
        info.add_text(PNG_ATTRIBUTION_KEY, json.dumps(attribution, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, meta: dict, attribution: dict | None = None) -> Path:
    """Write ``image`` atomically as a PNG carrying its generation parameters ``meta`` (and, when
    given, its ``attribution``) as text chunks; returns the path. Raises OSError if it cannot write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(image, meta, attribution))
    return path


def read_png_metadata(path: str | Path) -> dict:
    """Generation parameters from a PNG file (see ``image_metadata``)."""
    with open_image(Path(path)) as image:  # PIL reads text chunks after the pixels: size-checked first
        return image_metadata(image)


def read_png_attribution(path: str | Path) -> dict | None:
    """The attribution record (method, store id, top-k keys and scores) saved with an image, if any."""
    with open_image(Path(path)) as image:
        text = getattr(image, "text", None) or {}
        return json.loads(text[PNG_ATTRIBUTION_KEY]) if PNG_ATTRIBUTION_KEY in text else None


def dropped_prompt_tokens(tokenizer, prompt: str) -> int:
    """How many tokens of ``prompt`` the text encoder never sees: CLIP reads ``model_max_length``
    (77) tokens, start and end included, and diffusers cuts the rest silently."""
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    return max(0, len(ids) - int(tokenizer.model_max_length))


def truncation_note(tokenizer, prompt: str) -> str | None:
    """A sentence for the user when the prompt is longer than the text encoder reads, else None."""
    dropped = dropped_prompt_tokens(tokenizer, prompt)
    if not dropped:
        return None
    return (f"the prompt is longer than the text encoder reads ({tokenizer.model_max_length} tokens): "
            f"its last {dropped} token{'s' if dropped != 1 else ''} had no effect")


def warn_truncated_prompts(tokenizer, prompts: list[str]) -> None:
    """Say on stderr which prompts the text encoder reads only in part (diffusers cuts them silently)."""
    for prompt in dict.fromkeys(prompts):
        note = truncation_note(tokenizer, prompt)
        if note:
            print(f"das-sd: warning: {shorten(prompt, 80)!r}: {note}", file=sys.stderr)


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, for echoing user input in messages."""
    text = " ".join(text.split()) if len(text) > limit else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def image_metadata(image: Image.Image) -> dict:
    """Our ``das_sd`` chunk if present, else the prompt and settings of an A1111 ``parameters`` text."""
    text = {k: v for k, v in {**image.info, **(getattr(image, "text", None) or {})}.items() if isinstance(v, str)}
    if PNG_DAS_KEY in text:
        try:
            return json.loads(text[PNG_DAS_KEY])
        except json.JSONDecodeError:
            pass
    if PNG_PARAMETERS_KEY in text:
        return parse_infotext(text[PNG_PARAMETERS_KEY])
    return {}


def parse_infotext(text: str) -> dict:
    """Prompt, negative prompt and seed/steps from an A1111 ``parameters`` text."""
    lines = text.strip().split("\n")
    meta: dict = {}
    if lines and ": " in lines[-1] and ("Steps: " in lines[-1] or "Seed: " in lines[-1]):
        for part in lines.pop().split(", "):
            key, _, value = part.partition(": ")
            meta[key.strip()] = value.strip()
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt:")]
    if negative:
        meta["negative_prompt"] = "\n".join(lines[negative[0]:]).removeprefix("Negative prompt:").strip()
        lines = lines[:negative[0]]
    meta["prompt"] = "\n".join(lines).strip()
    for src, dst, cast in (("Seed", "seed", int), ("Steps", "steps", int), ("CFG scale", "guidance", float)):
        if src in meta:
            try:
                meta[dst] = cast(meta.pop(src))
            except ValueError:
                pass
    return meta
