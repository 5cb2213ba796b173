"""build_base per family: a few-step tiny SDXL build writes a loadable SDXL folder on the tiny SD's VAE."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from das_sd.toy.build_base import BaseRecipe, base_recipe, build_base


def test_both_families_share_one_recipe_and_the_shipped_builds_record_it():
    from dataclasses import asdict

    from das_sd.models.loading import embedded_base_path

    assert base_recipe("sd") == base_recipe("sdxl") == BaseRecipe()
    assert base_recipe("sdxl", unet_steps=7) == BaseRecipe(unet_steps=7)
    for family in ("sd", "sdxl"):  # each shipped model was built by today's recipe
        record = json.loads((embedded_base_path(family) / "das_sd_build.json").read_text())
        assert record["recipe"] == asdict(base_recipe(family)), family
    with pytest.raises(ValueError, match="'flux'"):
        base_recipe("flux")
    with pytest.raises(ValueError, match="'flux'"):
        build_base("unused", family="flux")


def test_a_tiny_sdxl_build_is_a_loadable_sdxl_folder(tmp_path):
    from das_sd.conditioning import model_family
    from das_sd.models.loading import embedded_base_path, load_pipeline

    recipe = BaseRecipe(unet_images=16, unet_steps=2, unet_batch_size=4, warmup_steps=1, eval_steps=2, eval_seeds=[0])
    log = build_base(tmp_path / "xl", recipe, family="sdxl")
    assert log["family"] == "sdxl" and "vae" not in log  # no VAE stage: the tiny SD's is reused
    assert json.loads((tmp_path / "xl" / "das_sd_build.json").read_text())["recipe"]["unet_steps"] == 2
    pipe = load_pipeline(tmp_path / "xl")
    assert model_family(pipe) == "sdxl" and pipe.tokenizer.get_vocab() == pipe.tokenizer_2.get_vocab()
    sd_vae = load_file(embedded_base_path("sd") / "vae" / "diffusion_pytorch_model.safetensors")
    xl_vae = load_file(tmp_path / "xl" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all((sd_vae[k] == xl_vae[k]).all() for k in sd_vae) and sd_vae.keys() == xl_vae.keys()
    assert log["scaling_factor"] == pipe.vae.config.scaling_factor
    for name in ("text_encoder", "text_encoder_2"):  # the classic layout every transformers release loads
        with safe_open(str(tmp_path / "xl" / name / "model.safetensors"), "pt") as fh:
            saved = {k: fh.get_tensor(k) for k in fh.keys()}
        # recent transformers name the loaded parameters without the text_model. prefix
        loaded = {k.removeprefix("text_model."): v for k, v in getattr(pipe, name).state_dict().items()}
        saved_names = {k.removeprefix("text_model."): v for k, v in saved.items()}
        assert set(saved_names) == set(loaded) and all((saved_names[k] == loaded[k]).all() for k in loaded)
    assert "text_projection.weight" in saved and all(k.startswith("text_model.") for k in saved if "projection" not in k)
