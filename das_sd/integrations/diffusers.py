"""Attribution beside every image a plain diffusers Stable Diffusion (1.x / 2.x or XL) pipeline generates.

    from diffusers import StableDiffusionPipeline
    from das_sd.integrations.diffusers import AttributingPipeline

    pipe = StableDiffusionPipeline.from_pretrained("my-sd15", local_files_only=True)
    pipe.load_lora_weights("my-lora/pytorch_lora_weights.safetensors")
    das = AttributingPipeline(pipe, "my-store", top_k=5)   # refuses a pipe the store was not built for
    out = das("zorblat, a red circle", num_inference_steps=25)
    out.images[0]; out.attributions[0].results            # the top-5 training images of image 0
    das.save(out, "outputs/")                              # PNGs carrying the top-k in their metadata

The pipeline runs unchanged; a step-end callback keeps the final latents and the conditioning it
actually used, which are featurized directly (no VAE round trip, no second text encoding): the prompt
embeddings, and for a ``StableDiffusionXLPipeline`` also the pooled embedding and the size
conditioning (``add_time_ids`` from its original_size / crops_coords_top_left / target_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..attribute import Attributor
from ..attribute_results import Attribution
from ..conditioning import Conditioning, model_family
from ..png_metadata import save_png
from ..registry import DEFAULT_METHOD
from ..store import FeatureStore

if TYPE_CHECKING:
    from typing import Any

    from diffusers import StableDiffusionPipeline


@dataclass
class AttributedOutput:
    """A pipeline's output with the attribution of each image.

    Attributes:
        images: What the pipeline returned (PIL, ndarray or tensor per ``output_type``).
        attributions: One ``Attribution`` per image, in the same order.
        latents: (n, 4, h, w) float32 final latents, on the CPU.
        prompts: The prompt of each image ("" when the pipeline was given ``prompt_embeds``).
        nsfw_content_detected: The pipeline's safety-checker flags, None without a safety checker.
    """

    images: list  # what the pipeline returned (PIL, ndarray or tensor per output_type)
    attributions: list[Attribution]  # one per image, in the same order
    latents: torch.Tensor  # (n, 4, h, w) final latents
    prompts: list[str]
    nsfw_content_detected: list | None = None


class AttributingPipeline:
    """Wraps a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (LoRA loaded) and a das-sd store built for that base + LoRA.

    Calling it runs the pipeline unchanged and returns an ``AttributedOutput``.

    Args:
        pipe: The pipeline with the store's LoRA loaded; its weights are checked against the store's.
        store: The feature store (folder or opened) built for this base + LoRA.
        method: Attribution method name (das_sd.registry's ``METHOD_NAMES``; default: das).
        top_k: Training images returned per generated image.

    Raises:
        StoreError: When the store does not open or is empty, the base or LoRA files it names are
            missing, ``pipe`` is of another model family than the store's, or its weights are not the
            ones the store was built with.
        ValueError: When ``method`` is unknown or needs a feature set the store lacks.
    """

    def __init__(self, pipe: StableDiffusionPipeline, store: str | Path | FeatureStore, method: str = DEFAULT_METHOD,
                 top_k: int = 10):
        # Attributor compares the pipeline's own weights with the store's probes (base and LoRA)
        self.attributor = Attributor(store, pipe=pipe)
        self.pipe = pipe
        self.method = method
        self.top_k = top_k
        self.attributor.require_method(method)
        self.sdxl = model_family(pipe) == "sdxl"

    @property
    def store_id(self) -> str:
        """The store's id, recorded with every attribution."""
        return self.attributor.store.store_id

    def __call__(self, prompt: str | list[str] | None = None, **kwargs: Any) -> AttributedOutput:
        """Run the pipeline and attribute each generated image.

        Args:
            prompt: The prompt(s), as for the pipeline; None when ``prompt_embeds`` are passed.
            **kwargs: The pipeline's other arguments; a ``callback_on_step_end`` of the caller still runs.

        Returns:
            The images with their attributions, final latents and prompts.

        Raises:
            RuntimeError: When the pipeline ran no denoising step.
        """
        captured: dict[str, torch.Tensor] = {}
        user_callback = kwargs.pop("callback_on_step_end", None)
        inputs = set(kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
        # SDXL's UNet also takes the pooled embedding and the size conditioning (diffusers' names)
        needed = {"latents", "prompt_embeds"} | ({"add_text_embeds", "add_time_ids"} if self.sdxl else set())

        def keep_final(pipe, step, timestep, tensors):
            if user_callback is not None:
                tensors = user_callback(pipe, step, timestep, tensors)
            captured.update({name: tensors[name].detach() for name in needed})
            return tensors

        output = self.pipe(prompt, callback_on_step_end=keep_final,
                           callback_on_step_end_tensor_inputs=sorted(inputs | needed), **kwargs)
        if "latents" not in captured:
            raise RuntimeError("the pipeline ran no denoising step; nothing to attribute")
        latents = captured["latents"].float()
        parts = [captured[name] for name in ("prompt_embeds", "add_text_embeds", "add_time_ids") if name in captured]
        if parts[0].shape[0] == 2 * latents.shape[0]:  # classifier-free guidance: [negative, positive] rows
            parts = [p.chunk(2)[1] for p in parts]
        cond = Conditioning(*(p.float() for p in parts)) if self.sdxl else parts[0]
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
        (method, store id, keys, scores): the provenance travels with the file.

        Args:
            output: What calling this pipeline returned.
            folder: Where the PNGs go.
            prefix: File name prefix: ``{prefix}-0000.png``, ``{prefix}-0001.png``, ...

        Returns:
            The paths written, one per image.
        """
        paths = []
        for i, (image, attribution) in enumerate(zip(output.images, output.attributions)):
            path = Path(folder) / f"{prefix}-{i:04d}.png"
            meta = {"prompt": output.prompts[i]}
            paths.append(save_png(to_pil(image), path, meta, attribution.provenance(self.store_id)))
        return paths


def to_pil(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """One pipeline output image as a PIL image.

    Args:
        image: A PIL image (returned as is), or an HWC / CHW array or tensor: uint8, or floats in
            [0, 1] (clipped); 1 or 3 channels.

    Returns:
        The RGB (or greyscale, for 1 channel) PIL image.
    """
    if isinstance(image, Image.Image):
        return image
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):  # CHW tensors
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
