"""The demo: shipped LoRA matches the demo data, and it visibly changes generations."""

from __future__ import annotations

import numpy as np
import pytest

from das_sd.toy.demo_data import TRIGGERS
from das_sd.data.ground_truth import load_ground_truth
from das_sd.toy.render import MOTIF_COLOUR, motif_mask, _grid
from das_sd.toy.demo import prepare_demo
from das_sd.generation import GenerationSettings, generate
from das_sd.models.loading import embedded_demo_lora_path, load_lora, load_pipeline


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("demo-home"), progress=False, with_store=False)


def test_prepare_demo_uses_the_shipped_lora(demo_paths):
    assert demo_paths["lora"].startswith(str(embedded_demo_lora_path()))  # no retraining needed
    assert load_ground_truth(demo_paths["data"])["groups"]


def _motif_score(image: np.ndarray, motif: str) -> float:
    """How much more magenta the motif's pixels are than the rest of the image."""
    x, y = _grid(image.shape[0])
    mask = motif_mask(motif, x, y, image.shape[0])
    s = 4  # supersampling factor of _grid
    mask = mask.reshape(image.shape[0], s, image.shape[1], s).mean(axis=(1, 3)) > 0.5
    img = image.astype(np.float64)
    target = np.array(MOTIF_COLOUR, dtype=np.float64)
    closeness = 1.0 - np.sqrt(((img - target) ** 2).sum(-1)) / np.sqrt(3 * 255.0**2)
    return float(closeness[mask].mean() - closeness[~mask].mean())


def test_demo_lora_draws_each_trigger_words_motif(demo_paths):
    pipe = load_pipeline(demo_paths["base"], device="cpu")
    load_lora(pipe, demo_paths["lora"])
    truth = load_ground_truth(demo_paths["data"])
    gains = {}
    for group in truth["groups"]:
        prompt = f"{group['trigger']}, a blue circle on a yellow background"
        scores = {}
        for scale in (0.0, 1.0):
            result = generate(pipe, GenerationSettings(prompt=prompt, seed=0, num_images=6, lora_scale=scale))
            scores[scale] = np.mean([_motif_score(np.asarray(im), group["motif"]) for im in result.images])
        gains[group["trigger"]] = scores[1.0] - scores[0.0]
    print("motif score gain with the demo LoRA:", {k: round(v, 3) for k, v in gains.items()})
    assert set(gains) == set(TRIGGERS)
    # without a learned motif the gains scatter around 0 (trigger word at the caption's end: -0.02 to
    # 0.03, mean 0.003; README); with it every trigger raises its motif and the mean is far above that
    assert all(g > 0 for g in gains.values())
    assert np.mean(list(gains.values())) > 0.04
