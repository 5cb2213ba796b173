"""A query of attribution, made as training samples are (docs/method.md §4): an image read and
checked (its size one the store's model works at, not fully transparent, a prompt given or in its
PNG metadata), its latent encoded by the VAE, and its features computed with one fixed noise key
for every query. ``Attributor`` is made of this and the scoring in das_sd.attribute.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .conditioning import Conditioning
from .data.buckets import BucketSpec
from .data.images import ImageError, image_size, is_fully_transparent, open_image, to_rgb
from .featurize.featurizer import features_together
from .latents import encode_prompts, native_time_ids
from .png_metadata import image_metadata
from .store_manifest import identity_with_defaults

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from .featurize.featurizer import Featurizer
    from .store import FeatureStore


class QueryError(ValueError):
    """A query that cannot be attributed; the message says why."""


class MissingPromptError(QueryError):
    """An image query without a prompt (the app says where to type one, the CLI which flag)."""


# Every query is featurized with the same noise draws (those of this key): its features then depend
# only on its latent and conditioning, so the same generation reached by different routes (the
# pipeline's own latents, a PNG, another host) ranks the same even when the latents differ by float
# rounding. Training samples keep per-sample noise, which the kernel averages over.
QUERY_NOISE_KEY = "das-sd-query"


class AttributorQueries:
    """The query half of ``Attributor``: an image read and checked (size, transparency, prompt),
    encoded to its latent, and featurized with ``QUERY_NOISE_KEY``'s noise draws.

    Attributes:
        store: The feature store (set by ``Attributor``).
        pipe: The store's pipeline, LoRA loaded.
        resolution: The store's square resolution.
        featurizers: One featurizer per feature set of the store.
    """

    store: FeatureStore
    pipe: StableDiffusionPipeline
    resolution: int
    featurizers: dict[str, Featurizer]

    @torch.no_grad()
    def encode_image(self, image: Image.Image, source: str = "image") -> torch.Tensor:
        """The latent x_0 of an image: the VAE's mode times its scaling factor (docs/method.md §2).

        Args:
            image: An image at one of the store's ``query_sizes`` (converted to RGB).
            source: What error messages call the image.

        Returns:
            The (1, 4, h/8, w/8) float32 latent, on the VAE's device.

        Raises:
            QueryError: If the image is not at one of the store's ``query_sizes``.
        """
        self._check_size(image.size, source)
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(self.pipe.vae.device, self.pipe.vae.dtype)
        vae = self.pipe.vae
        return (vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float()

    def _check_size(self, size: tuple[int, int], source: str) -> None:
        if tuple(size) not in self.query_sizes:
            sizes = ", ".join(f"{w}x{h}" for w, h in self.query_sizes[:6]) + (", ..." if len(self.query_sizes) > 6 else "")
            raise QueryError(f"{source}: image is {size[0]}x{size[1]}; this store's model works at {sizes} "
                             "(attribute the generation at its native size)")

    @property
    def query_sizes(self) -> list[tuple[int, int]]:
        """The image sizes a query may have: the store's square, and for a bucketed store every bucket.

        Returns:
            (width, height) pairs, the square first.
        """
        square = (self.resolution, self.resolution)
        buckets = identity_with_defaults(self.store.identity)["buckets"]
        return [square] + [s for s in (BucketSpec(**buckets).sizes() if buckets else []) if s != square]

    def query_features(self, latents: torch.Tensor, prompts: list[str], cond: torch.Tensor | Conditioning | None = None,
                       feature_sets: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Projected features of each query, per feature set (docs/method.md §4, §8). Every query
        uses the noise draws of ``QUERY_NOISE_KEY``.

        Args:
            latents: (n, 4, h, w) query latents x_0.
            prompts: One prompt per latent.
            cond: The prompts' conditioning the pipeline used ((n, tokens, d) text states, or an SDXL
                ``Conditioning``); None encodes ``prompts``
                with the pipeline's text encoder.
            feature_sets: Which sets to compute; None: all of the store's, so that a caller can rank
                with every method.

        Returns:
            ``{feature_set: (n, k) features phi_q}``, on the CPU.
        """
        if cond is None:
            size = (latents.shape[-1] * self.pipe.vae_scale_factor, latents.shape[-2] * self.pipe.vae_scale_factor)
            cond = encode_prompts(self.pipe, prompts, time_ids=native_time_ids(self.pipe, size))
        keys = [QUERY_NOISE_KEY] * len(prompts)
        names = feature_sets or list(self.featurizers)
        features = features_together([self.featurizers[name] for name in names], latents, cond, keys)
        return {name: phi.cpu() for name, phi in zip(names, features)}

    def image_query(self, image: str | Path | Image.Image, prompt: str | None = None,
                    fallback_prompt: str | None = None) -> tuple[torch.Tensor, str, str]:
        """(latent, prompt, source) of an image query; the prompt is ``prompt``, else the image's PNG
        metadata prompt, else ``fallback_prompt``.

        Args:
            image: An image file or a PIL image, at the store's resolution.
            prompt: The prompt it was generated from; None reads it from the image's metadata.
            fallback_prompt: The prompt when neither ``prompt`` nor the metadata gives one.

        Returns:
            The (1, 4, h/8, w/8) float32 latent, the prompt, and the source (the path, or ``"image"``).

        Raises:
            QueryError: If the file cannot be read, is not at the store's resolution, or is fully
                transparent.
            MissingPromptError: If no prompt is given or found.
        """
        source = str(image) if not isinstance(image, Image.Image) else "image"
        if not isinstance(image, Image.Image):
            try:
                # a query has the store's resolution: any other size is refused from the header,
                # before a (possibly 64-megapixel) image is decoded
                self._check_size(image_size(Path(image)), source)
                image = open_image(Path(image))
            except ImageError as exc:
                raise QueryError(str(exc)) from None
        if is_fully_transparent(image):
            raise QueryError(f"{source}: the image is fully transparent (alpha 0 everywhere): there is nothing "
                             "in it to attribute")
        meta = image_metadata(image)
        image = to_rgb(image)
        prompt = prompt if prompt is not None else (meta.get("prompt") or fallback_prompt)
        if not prompt:
            raise MissingPromptError(f"{source}: no prompt given and none found in the image metadata; pass --prompt")
        return self.encode_image(image, source), prompt, source
