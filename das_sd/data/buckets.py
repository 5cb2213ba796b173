"""Aspect-ratio buckets, as kohya's sd-scripts train with them (``--enable_bucket``).

A bucketed LoRA never saw a square crop of a wide image: it saw the image resized to cover its
*bucket*, the (width, height) of about the training resolution's area whose aspect ratio is nearest
the image's, and center-cropped to it. Featurizing each image in its bucket differentiates the LoRA on
the rows it was trained on (docs/method.md §2).

Buckets: for every width w from ``min_reso`` to ``max_reso`` in ``step`` increments, the height
``min(max_reso, area // w)`` rounded down to ``step`` (and the transposed pair), ``area`` being
``resolution**2``; an image goes to the bucket whose aspect ratio w / h differs least from its own.
``step`` must keep latents divisible through the UNet's downsamplers (64 px for SD).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from PIL import Image

from .images import cover_crop


@dataclass(frozen=True)
class BucketSpec:
    """The buckets of a training run.

    Attributes:
        resolution: The square side whose area every bucket stays within (kohya's ``--resolution``).
        min_reso: Smallest bucket side in pixels.
        max_reso: Largest bucket side in pixels.
        step: Bucket sides are multiples of it.
    """

    resolution: int
    min_reso: int
    max_reso: int
    step: int

    def __post_init__(self) -> None:
        if not 0 < self.step <= self.min_reso <= self.resolution <= self.max_reso:
            raise ValueError(f"bucket spec {self}: expected 0 < step <= min_reso <= resolution <= max_reso")
        if self.min_reso % self.step or self.max_reso % self.step or self.resolution % self.step:
            raise ValueError(f"bucket spec {self}: min_reso, max_reso and resolution must be multiples of step")

    def to_dict(self) -> dict:
        """The spec as a store's identity records it.

        Returns:
            Its fields by name.
        """
        return asdict(self)

    def sizes(self) -> list[tuple[int, int]]:
        """Every bucket, (width, height) in pixels, sorted.

        Returns:
            The distinct buckets; the square ``(resolution, resolution)`` is one of them.
        """
        area = self.resolution * self.resolution
        out = set()
        for width in range(self.min_reso, self.max_reso + 1, self.step):
            height = min(self.max_reso, area // width // self.step * self.step)
            if height >= self.min_reso:
                out |= {(width, height), (height, width)}
        return sorted(out)

    def bucket_of(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket an image of ``size`` is trained in: the nearest aspect ratio (ties: the first).

        Args:
            size: The image's (width, height).

        Returns:
            The bucket's (width, height).
        """
        ratio = size[0] / size[1]
        return min(self.sizes(), key=lambda b: abs(b[0] / b[1] - ratio))


def default_buckets(resolution: int, step: int) -> BucketSpec:
    """kohya's default buckets scaled to a resolution: sides from half to twice it (256 to 1024 at 512).

    Args:
        resolution: The training resolution (square side).
        step: Bucket sides are multiples of it (the model's latent divisibility, e.g. 64 for SD).

    Returns:
        The spec.
    """
    def snap(x: int) -> int:
        return max(step, x // step * step)

    return BucketSpec(snap(resolution), snap(resolution // 2), snap(2 * resolution), step)


def kohya_buckets(metadata: dict[str, str], step: int) -> BucketSpec | None:
    """The buckets a kohya LoRA file says it was trained with (``ss_enable_bucket`` and friends).

    Args:
        metadata: The LoRA file's safetensors header metadata.
        step: The model's bucket step, used when the file records none.

    Returns:
        The spec, or None when the file records no bucketed training.

    Raises:
        ValueError: When the entries cannot be read or describe impossible buckets.
    """
    if str(metadata.get("ss_enable_bucket", "")).lower() != "true":
        return None

    def number(name: str, default: int) -> int:
        found = re.findall(r"\d+", str(metadata.get(name, "")))
        return int(found[0]) if found else default

    sides = [int(n) for n in re.findall(r"\d+", str(metadata.get("ss_resolution", "")))] or [512]
    resolution = int((sides[0] * sides[-1]) ** 0.5) // step * step
    return BucketSpec(resolution, number("ss_min_bucket_reso", 256), number("ss_max_bucket_reso", 1024),
                      number("ss_bucket_reso_steps", step))


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to cover ``bucket`` and crop its centre to exactly that size.

    Args:
        image: An RGB image.
        bucket: The (width, height) to produce.

    Returns:
        A ``bucket``-sized image (bicubic), or ``image`` itself when already that size.
    """
    if image.size == tuple(bucket):
        return image
    (nw, nh), (left, top) = cover_crop(image.size, tuple(bucket))
    image = image.resize((nw, nh), Image.BICUBIC)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))
