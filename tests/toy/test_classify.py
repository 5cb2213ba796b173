import numpy as np

from das_sd.toy.classify import classify
from das_sd.toy.render import COLOURS, SHAPES, random_spec, render


def test_classifier_reads_rendered_shapes_and_colours():
    rng = np.random.default_rng(123)
    specs = [random_spec(rng) for _ in range(600)]
    correct = sum(classify(render(s, 32, rng)).matches(s.shape, s.fg, s.bg) for s in specs)
    assert correct / len(specs) >= 0.98


def test_classifier_reports_nothing_on_a_blank_image():
    blank = np.full((32, 32, 3), COLOURS["blue"], dtype=np.uint8)
    reading = classify(blank)
    assert reading.bg == "blue" and reading.shape is None and reading.fg is None


def test_render_is_deterministic_and_respects_the_spec():
    spec = random_spec(np.random.default_rng(0), shape="square", fg="red", bg="green")
    a = render(spec, 32, np.random.default_rng(5))
    b = render(spec, 32, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert set(SHAPES) == {"circle", "square", "triangle"}
