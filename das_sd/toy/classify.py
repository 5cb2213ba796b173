"""Read shape and colours back from a procedural image with pixel statistics.

No learned classifier: the background is the median of the border, the foreground is what differs
from it, and the shape follows from how the foreground fills its bounding box and how its width
changes from top to bottom. Used to check that the embedded model draws what it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import COLOURS

_NAMES = list(COLOURS)
_TABLE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Reading:
    """What ``classify`` read from an image.

    Attributes:
        shape: "circle", "square" or "triangle"; None when no shape was found or recognised.
        fg: Palette name of the shape's colour; None when no foreground was found.
        bg: Palette name of the background colour.
    """

    shape: str | None
    fg: str | None
    bg: str

    def matches(self, shape: str, fg: str, bg: str) -> bool:
        """Whether the reading is exactly the given shape and colours.

        Args:
            shape: Expected shape name.
            fg: Expected shape colour name.
            bg: Expected background colour name.

        Returns:
            True when all three match.
        """
        return (self.shape, self.fg, self.bg) == (shape, fg, bg)


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour (``render.COLOURS``) nearest to an RGB value.

    Args:
        rgb: (3,) RGB value, 0-255.

    Returns:
        The colour's name (Euclidean distance in RGB).
    """
    return _NAMES[int(np.argmin(((_TABLE - rgb) ** 2).sum(axis=1)))]


def classify(image: np.ndarray, border: int = 2, min_fraction: float = 0.04) -> Reading:
    """Classify an HxWx3 uint8 image of one shape on a plain background.

    Args:
        image: (h, w, 3 or 4) uint8 image; an alpha channel is ignored.
        border: Width in pixels of the border ring whose median colour is the background.
        min_fraction: Foreground pixels needed, as a fraction of the image, to read a shape at all.

    Returns:
        The shape and colours read; ``shape`` and ``fg`` are None with too little foreground.
    """
    img = np.asarray(image, dtype=np.float64)[..., :3]
    h, w, _ = img.shape
    ring = np.concatenate([
        img[:border].reshape(-1, 3), img[-border:].reshape(-1, 3),
        img[:, :border].reshape(-1, 3), img[:, -border:].reshape(-1, 3),
    ])
    bg_rgb = np.median(ring, axis=0)
    bg = nearest_colour(bg_rgb)
    distance = np.sqrt(((img - _TABLE[_NAMES.index(bg)]) ** 2).sum(axis=-1))
    # half the distance from the background to its nearest palette neighbour separates the two
    bg_table = _TABLE[_NAMES.index(bg)]
    gaps = np.sqrt(((_TABLE - bg_table) ** 2).sum(axis=1))
    mask = distance > 0.5 * np.min(gaps[gaps > 0])
    if mask.sum() < min_fraction * h * w:
        return Reading(shape=None, fg=None, bg=bg)
    fg = nearest_colour(np.median(img[mask], axis=0))
    # keep only pixels close to the foreground colour, which drops blurry halo pixels
    fg_mask = np.sqrt(((img - _TABLE[_NAMES.index(fg)]) ** 2).sum(axis=-1)) < distance
    fg_mask &= mask
    return Reading(shape=_shape_of(fg_mask), fg=fg, bg=bg)


def _shape_of(mask: np.ndarray) -> str | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) < 3 or len(cols) < 3:
        return None
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    box = mask[top:bottom + 1, left:right + 1]
    fill = box.mean()
    widths = box.sum(axis=1).astype(np.float64)

    def width_at(fraction: float) -> float:
        i = int(round(fraction * (len(widths) - 1)))
        return float(widths[max(0, i - 1): i + 2].mean())

    # a square is as wide near its top and bottom as in its middle, a circle narrower at both,
    # a triangle (apex up) narrow at the top only
    upper, middle, lower = width_at(0.15), width_at(0.5), width_at(0.85)
    if upper < 0.6 * lower:
        return "triangle"
    if min(upper, lower) >= 0.85 * middle and fill > 0.75:
        return "square"
    if fill > 0.55 and max(upper, lower) < 0.9 * middle:
        return "circle"
    return None
