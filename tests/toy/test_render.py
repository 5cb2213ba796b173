"""The procedural renderer refuses what it cannot draw with a message naming the choices."""
from __future__ import annotations

from dataclasses import replace

import pytest

from das_sd.toy.render import COLOURS, SHAPES, ImageSpec, render


def test_an_unknown_colour_is_a_value_error_naming_the_colours():
    first, second = sorted(COLOURS)[:2]
    good = ImageSpec(shape=SHAPES[0], fg=first, bg=second)
    assert render(good, resolution=8).shape == (8, 8, 3)
    for bad in (replace(good, fg="mauve"), replace(good, bg="mauve")):
        with pytest.raises(ValueError, match=r"unknown colour 'mauve'; expected one of \["):
            render(bad, resolution=8)
