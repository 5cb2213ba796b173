"""Attribution beside every image a plain diffusers Stable Diffusion pipeline generates.

    from diffusers import StableDiffusionPipeline
    from das_sd.integrations.diffusers import AttributingPipeline

    pipe = StableDiffusionPipeline.from_pretrained("my-sd15", local_files_only=True)
    pipe.load_lora_weights("my-lora/pytorch_lora_weights.safetensors")
    das = AttributingPipeline(pipe, "my-store", top_k=5)   # refuses a pipe the store was not built for
    out = das("zorblat, a red circle", num_inference_steps=25)
    out.images[0]; out.attributions[0].results            # the top-5 training images of image 0
    das.save(out, "outputs/")                              # PNGs carrying the top-k in their metadata

The pipeline runs unchanged; a step-end callback keeps the final latents and the prompt embeddings
it actually used, which are featurized directly (no VAE round trip, no second text encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..attribute import Attribution, Attributor
from ..generation import save_png
from ..registry import DEFAULT_METHOD
from ..store import FeatureStore


@dataclass
class AttributedOutput:
    images: list  # what the pipeline returned (PIL, ndarray or tensor per output_type)
    attributions: list[Attribution]  # one per image, in the same order
    latents: torch.Tensor  # (n, 4, h, w) final latents
    prompts: list[str]
    nsfw_content_detected: list | None = None


class AttributingPipeline:
    """Wraps a ``StableDiffusionPipeline`` (LoRA loaded) and a das-sd store built for that base + LoRA."""

    def __init__(self, pipe, store: str | Path | FeatureStore, method: str = DEFAULT_METHOD, top_k: int = 10):
        # Attributor compares the pipeline's own weights with the store's probes (base and LoRA)
        self.attributor = Attributor(store, pipe=pipe)
        self.pipe = pipe
        self.method = method
        self.top_k = top_k
        self.attributor.require_method(method)

    @property
    def store_id(self) -> str:
        return self.attributor.store.store_id

    def __call__(self, prompt: str | list[str] | None = None, **kwargs) -> AttributedOutput:
        captured: dict[str, torch.Tensor] = {}
        user_callback = kwargs.pop("callback_on_step_end", None)
        inputs = set(kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])

        def keep_final(pipe, step, timestep, tensors):
            if user_callback is not None:
                tensors = user_callback(pipe, step, timestep, tensors)
            captured["latents"] = tensors["latents"].detach()
            captured["prompt_embeds"] = tensors["prompt_embeds"].detach()
            return tensors

        output = self.pipe(prompt, callback_on_step_end=keep_final,
                           callback_on_step_end_tensor_inputs=sorted(inputs | {"latents", "prompt_embeds"}),
                           **kwargs)
        if "latents" not in captured:
            raise RuntimeError("the pipeline ran no denoising step; nothing to attribute")
        latents = captured["latents"].float()
        cond = captured["prompt_embeds"]
        if cond.shape[0] == 2 * latents.shape[0]:  # classifier-free guidance: [negative, positive]
            cond = cond.chunk(2)[1]
        prompts = self._prompts(prompt, latents.shape[0])
        attributions = self.attributor.attribute_latents(latents, prompts, self.method, self.top_k,
                                                         [{"store_id": self.store_id}] * len(prompts), cond=cond)
        return AttributedOutput(images=list(output.images), attributions=attributions, latents=latents.cpu(),
                                prompts=prompts, nsfw_content_detected=getattr(output, "nsfw_content_detected", None))

    @staticmethod
    def _prompts(prompt, n: int) -> list[str]:
        if prompt is None:  # prompt_embeds were given: no text to record
            return [""] * n
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = n // len(prompts)
        return [p for p in prompts for _ in range(per_prompt)]

    def save(self, output: AttributedOutput, folder: str | Path, prefix: str = "image") -> list[Path]:
        """Save each image as a PNG whose text metadata holds its prompt and its top-k attribution
        (method, store id, keys, scores): the provenance travels with the file."""
        paths = []
        for i, (image, attribution) in enumerate(zip(output.images, output.attributions)):
            path = Path(folder) / f"{prefix}-{i:04d}.png"
            meta = {"prompt": output.prompts[i]}
            paths.append(save_png(to_pil(image), path, meta, attribution.provenance(self.store_id)))
        return paths


def to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):  # CHW tensors
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
