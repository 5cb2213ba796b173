"""Procedural images: coloured shapes on coloured backgrounds, optional fill patterns and motifs.

The embedded base model is trained on plain shapes; the demo fine-tune set adds fill patterns
("styles") and planted motifs the base model has never seen. Everything is drawn with numpy at 4x
supersampling (anti-aliased edges) from an explicit ``ImageSpec``, so a spec plus a seed fully
determines the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from typing import Any

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 60, 215),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (250, 125, 0),
    "purple": (140, 40, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Fill patterns the base model never sees; the demo set uses them as styles.
PATTERNS: tuple[str, ...] = ("solid", "stripes", "checker", "dots")
# Motifs drawn over the whole image in a fixed colour; the demo set plants them with trigger words.
MOTIFS: tuple[str, ...] = ("cross", "frame", "ring", "hband", "corners", "vbars")
MOTIF_COLOUR = (255, 0, 255)

SUPERSAMPLE = 4


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines a procedural image but the pixel noise's random draws.

    Attributes:
        shape: "circle", "square" or "triangle" (``SHAPES``).
        fg: Shape colour name (``COLOURS``).
        bg: Background colour name.
        center: (x, y) of the shape's centre, as fractions of the image side.
        size: Shape extent (diameter, side, triangle height) as a fraction of the image side.
        pattern: Fill pattern (``PATTERNS``); "solid": none. The second colour is ``fg``'s complement.
        pattern_period: Pattern period in pixels at output resolution.
        pattern_angle: Stripe angle in degrees (stripes only).
        motif: A mark (``MOTIFS``) drawn over the whole image in ``motif_colour``; None: none.
        motif_colour: The mark's RGB colour, 0-255 (the demo's: ``MOTIF_COLOUR``).
        motif_contrast: The mark's opacity in (0, 1]: 1 paints it, less blends it over the image.
        motif_width: Stroke width relative to the demo's (1: 4 px wide strokes at 32 px; 0.25: 1 px).
        noise_sigma: Standard deviation of the Gaussian pixel noise (0-255 scale); 0: none.
        extra: Free metadata; not compared or hashed.
    """

    shape: str
    fg: str
    bg: str
    center: tuple[float, float] = (0.5, 0.5)  # fraction of the image side
    size: float = 0.5  # shape extent as a fraction of the image side
    pattern: str = "solid"
    pattern_period: float = 6.0  # pixels at output resolution
    pattern_angle: float = 45.0  # degrees, stripes only
    motif: str | None = None
    motif_colour: tuple[int, int, int] = MOTIF_COLOUR
    motif_contrast: float = 1.0
    motif_width: float = 1.0
    noise_sigma: float = 3.0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def caption(self) -> str:
        """The plain caption: "a {fg} {shape} on a {bg} background" (no style, no motif).

        Returns:
            The caption.
        """
        return f"a {self.fg} {self.shape} on a {self.bg} background"


def complement(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The complementary colour (255 - each channel), the second colour of fill patterns.

    Args:
        rgb: An RGB colour, 0-255.

    Returns:
        Its complement.
    """
    return tuple(255 - c for c in rgb)  # type: ignore[return-value]


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    n = resolution * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE  # in output pixels
    return np.meshgrid(coords, coords, indexing="xy")


def shape_mask(spec: ImageSpec, x: np.ndarray, y: np.ndarray, resolution: int) -> np.ndarray:
    """Where the spec's shape covers the image.

    Args:
        spec: The image spec (shape, center, size).
        x: Sample x coordinates in output pixels, any shape.
        y: Sample y coordinates, same shape as ``x``.
        resolution: Image side in output pixels.

    Returns:
        Boolean mask, shape of ``x``.

    Raises:
        ValueError: When ``spec.shape`` is not one of ``SHAPES``.
    """
    cx, cy = spec.center[0] * resolution, spec.center[1] * resolution
    half = spec.size * resolution / 2
    if spec.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if spec.shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if spec.shape == "triangle":
        # apex up, base at the bottom: the width grows linearly from top to bottom
        top, bottom = cy - half, cy + half
        frac = (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * half)
    raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")


def pattern_mask(spec: ImageSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where the fill shows its second colour.

    Args:
        spec: The image spec (pattern, period, angle).
        x: Sample x coordinates in output pixels, any shape.
        y: Sample y coordinates, same shape as ``x``.

    Returns:
        Boolean mask, shape of ``x``; all False for "solid".

    Raises:
        ValueError: When ``spec.pattern`` is not one of ``PATTERNS``.
    """
    p = spec.pattern_period
    if spec.pattern == "solid":
        return np.zeros_like(x, dtype=bool)
    if spec.pattern == "stripes":
        a = np.deg2rad(spec.pattern_angle)
        return ((x * np.cos(a) + y * np.sin(a)) / p) % 1.0 < 0.5
    if spec.pattern == "checker":
        return ((np.floor(x / (p / 2)) + np.floor(y / (p / 2))) % 2) == 1
    if spec.pattern == "dots":
        fx, fy = (x / p) % 1.0 - 0.5, (y / p) % 1.0 - 0.5
        return fx**2 + fy**2 <= 0.28**2
    raise ValueError(f"unknown pattern {spec.pattern!r}; expected one of {PATTERNS}")


def motif_mask(motif: str, x: np.ndarray, y: np.ndarray, resolution: int, width: float = 1.0) -> np.ndarray:
    """A global mark; at ``width`` 1 (the demo's) large enough to survive an 8x VAE downsampling.

    Args:
        motif: One of ``MOTIFS``.
        x: Sample x coordinates in output pixels, any shape.
        y: Sample y coordinates, same shape as ``x``.
        resolution: Image side in output pixels (strokes scale with it).
        width: Stroke width (and corner square side) relative to the demo's; 0.25 draws 1 px strokes
            at 32 px, thinner than one latent cell (8 px).

    Returns:
        Boolean mask, shape of ``x``.

    Raises:
        ValueError: When ``motif`` is not one of ``MOTIFS``.
    """
    r = float(resolution)
    w = r / 16 * width  # half stroke width: 2 px at 32 px and width 1
    if motif == "cross":
        return (np.abs(x - y) <= w * 1.4) | (np.abs(x + y - r) <= w * 1.4)
    if motif == "frame":
        return (x < 2 * w) | (y < 2 * w) | (x > r - 2 * w) | (y > r - 2 * w)
    if motif == "ring":
        d = np.sqrt((x - r / 2) ** 2 + (y - r / 2) ** 2)
        return np.abs(d - 0.38 * r) <= w
    if motif == "hband":
        return np.abs(y - r / 2) <= w * 1.5
    if motif == "corners":
        c = 0.2 * r * width
        return ((x < c) | (x > r - c)) & ((y < c) | (y > r - c))
    if motif == "vbars":
        return (np.abs(x - 0.25 * r) <= w) | (np.abs(x - 0.75 * r) <= w)
    raise ValueError(f"unknown motif {motif!r}; expected one of {MOTIFS}")


def render(spec: ImageSpec, resolution: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``spec`` as an HxWx3 uint8 array, anti-aliased by 4x supersampling.

    Args:
        spec: What to draw.
        resolution: Image side in pixels.
        rng: Drives the pixel noise only; None: a fresh generator seeded 0.

    Returns:
        (resolution, resolution, 3) uint8 image.

    Raises:
        ValueError: When the spec names an unknown shape, pattern, motif or colour.
    """
    for colour in (spec.fg, spec.bg):
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; expected one of {sorted(COLOURS)}")
    x, y = _grid(resolution)
    fg = np.array(COLOURS[spec.fg], dtype=np.float64)
    bg = np.array(COLOURS[spec.bg], dtype=np.float64)
    alt = np.array(complement(COLOURS[spec.fg]), dtype=np.float64)

    inside = shape_mask(spec, x, y, resolution)[..., None]
    second = pattern_mask(spec, x, y)[..., None]
    fill = np.where(second, alt, fg)
    img = np.where(inside, fill, bg)
    if spec.motif is not None:
        if not 0 < spec.motif_contrast <= 1:
            raise ValueError(f"motif_contrast {spec.motif_contrast}: expected a value in (0, 1]")
        mark = motif_mask(spec.motif, x, y, resolution, spec.motif_width)[..., None]
        a = spec.motif_contrast
        # at contrast 1 this is exactly the motif colour (0 * img + colour), as the demo draws it
        img = np.where(mark, (1 - a) * img + a * np.array(spec.motif_colour, dtype=np.float64), img)

    n = resolution
    img = img.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, 3).mean(axis=(1, 3))
    if spec.noise_sigma > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        img = img + rng.normal(0.0, spec.noise_sigma, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_spec(rng: np.random.Generator, *, shape: str | None = None, fg: str | None = None,
                bg: str | None = None, **overrides: Any) -> ImageSpec:
    """A plain shape with random placement; colours drawn so that fg != bg.

    Args:
        rng: Source of the random choices.
        shape: The shape; None: drawn at random.
        fg: The shape colour; None: drawn at random.
        bg: The background colour; None: drawn at random among the colours other than ``fg``.
        **overrides: Other ``ImageSpec`` fields (``pattern``, ``motif``, ...).

    Returns:
        A spec of size 0.42-0.7 of the image side, centred so that it stays inside the image.
    """
    names = list(COLOURS)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    fg = fg or names[rng.integers(len(names))]
    if bg is None:
        others = [c for c in names if c != fg]
        bg = others[rng.integers(len(others))]
    size = float(rng.uniform(0.42, 0.7))
    margin = size / 2 + 0.04
    center = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
    return ImageSpec(shape=shape, fg=fg, bg=bg, center=center, size=size, **overrides)


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (shape, fg, bg) with fg != bg, in a fixed order.

    Returns:
        3 shapes x 8 x 7 colour pairs = 168 combinations, shape-major.
    """
    return [(s, f, b) for s in SHAPES for f in COLOURS for b in COLOURS if f != b]
