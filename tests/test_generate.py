from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from das_sd.generation import GenerationSettings, decode_latents, generate
from das_sd.png_metadata import read_png_metadata, save_png
from tolerances import sampler_atol


def test_same_seed_same_image_and_latents_decode_to_the_images(pipe):
    settings = GenerationSettings(prompt="a red circle on a blue background", seed=7, steps=8, num_images=2)
    a = generate(pipe, settings)
    b = generate(pipe, settings)
    assert a.seeds == [7, 8] and a.latents.shape == (2, 4, 8, 8)
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))
    # image i of a batch is the same as generating seed + i alone (A1111's seed rule)
    single = generate(pipe, GenerationSettings(prompt=settings.prompt, seed=8, steps=8))
    assert torch.allclose(single.latents[0], a.latents[1], rtol=0, atol=sampler_atol(8, settings.guidance))
    redecoded = decode_latents(pipe, a.latents)
    assert np.array_equal(np.asarray(redecoded[1]), np.asarray(a.images[1]))


def test_png_metadata_round_trip(pipe, tmp_path):
    settings = GenerationSettings(prompt="a green square on a black background", negative_prompt="blurry",
                                  seed=3, steps=6, guidance=5.0)
    result = generate(pipe, settings, provenance={"base_name": "tiny-sd", "base_hash": "abc123",
                                                  "lora_name": "demo", "lora_hash": "def456"})
    meta = result.metadata(0) | {"width": 32, "height": 32}
    path = save_png(result.images[0], tmp_path / "out.png", meta)
    read = read_png_metadata(path)
    assert read["prompt"] == settings.prompt and read["negative_prompt"] == "blurry"
    assert read["seed"] == 3 and read["steps"] == 6 and read["guidance"] == 5.0
    assert read["base_hash"] == "abc123" and read["lora_hash"] == "def456"
    assert read["scheduler"] == "DDIMScheduler"
    with Image.open(path) as image:
        text = image.text["parameters"]
    assert text.startswith("a green square on a black background\nNegative prompt: blurry\n")
    assert "Seed: 3" in text and "Lora hashes: \"demo: def456\"" in text


def test_lora_scale_zero_equals_the_base(pipe, base_path, tmp_path):
    from das_sd.models.loading import load_lora, load_pipeline
    from helpers import random_lora
    from safetensors.torch import save_file

    settings = dict(prompt="a white triangle on a purple background", seed=1, steps=6)
    base_latents = generate(pipe, GenerationSettings(**settings)).latents
    save_file(random_lora(pipe), str(tmp_path / "l.safetensors"))
    with_lora = load_pipeline(base_path, device="cpu")
    load_lora(with_lora, tmp_path / "l.safetensors")
    off = generate(with_lora, GenerationSettings(**settings, lora_scale=0.0)).latents
    on = generate(with_lora, GenerationSettings(**settings, lora_scale=1.0)).latents
    tolerance = sampler_atol(6, GenerationSettings(**settings).guidance)
    assert torch.allclose(off, base_latents, rtol=0, atol=tolerance)
    assert (on - base_latents).abs().max() > 10 * tolerance  # the LoRA moves the latents far beyond rounding


def test_package_root_api_names_stay_functions_after_their_modules_load():
    # das_sd.generate is both a public function and (formerly) a module name: loading the module
    # rebinds the package attribute, so the root API must not share names with submodules
    import types

    import das_sd
    import das_sd.attribute  # noqa: F401  (loads the generation module, as any attribution does)

    for name in das_sd.__all__:
        first, again = getattr(das_sd, name), getattr(das_sd, name)
        assert not isinstance(first, types.ModuleType) and not isinstance(again, types.ModuleType), name
    assert das_sd.generate is das_sd.generation.generate
