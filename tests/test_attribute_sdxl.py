"""Attribution on the tiny SDXL demo: the embedded SDXL-architecture base, its demo LoRA and the
planted ground truth, as tests/test_attribute.py checks them on the tiny SD."""

from __future__ import annotations

import json

import pytest

from das_sd.attribute import Attributor
from das_sd.evaluate.groundtruth import evaluate_ground_truth
from das_sd.registry import METHODS


@pytest.fixture(scope="session")
def demo_sdxl(das_sd_home) -> dict:
    """The prepared tiny SDXL demo: data, LoRA, feature store and index under this session's DAS_SD_HOME."""
    from das_sd.toy.demo import prepare_demo

    return prepare_demo(progress=False, family="sdxl")


@pytest.fixture(scope="module")
def attributor_sdxl(demo_sdxl):
    return Attributor(demo_sdxl["store"], device="cpu")


@pytest.fixture(scope="module")
def ground_truth_sdxl(demo_sdxl, attributor_sdxl):
    """Recall@10 and AP of each group's exemplars, per method, on the test split (the SD demo's
    protocol: 3 generations per trigger word, disjoint from the tune split)."""
    report = evaluate_ground_truth(attributor_sdxl, demo_sdxl["data"], split="test")
    print("tiny SDXL planted ground truth, test split:", json.dumps(report["methods"]))
    print("AP per group:", json.dumps(report["ap_per_group"]["das"]))
    return report["methods"], report["chance_ap"]


def test_the_embedded_sdxl_is_an_sdxl_pipeline_on_the_tiny_sd_vae():
    from safetensors.torch import load_file

    from das_sd.conditioning import model_family
    from das_sd.models.loading import embedded_base_path, load_pipeline

    pipe = load_pipeline(embedded_base_path("sdxl"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and model_family(pipe) == "sdxl"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # both encoders' states concatenated feed the cross-attention; the pooled one the added embedding
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.projection_class_embeddings_input_dim == (
        6 * pipe.unet.config.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
    sd_vae = load_file(embedded_base_path("sd") / "vae" / "diffusion_pytorch_model.safetensors")
    xl_vae = load_file(embedded_base_path("sdxl") / "vae" / "diffusion_pytorch_model.safetensors")
    assert sd_vae.keys() == xl_vae.keys() and all((sd_vae[k] == xl_vae[k]).all() for k in sd_vae)
    sd_scaling = json.loads((embedded_base_path("sd") / "vae" / "config.json").read_text())["scaling_factor"]
    assert pipe.vae.config.scaling_factor == sd_scaling


def test_unknown_family_is_refused_by_name():
    from das_sd.models.loading import embedded_base_path
    from das_sd.toy.demo import prepare_demo

    with pytest.raises(ValueError, match="sdxl"):
        embedded_base_path("flux")
    with pytest.raises(ValueError, match="'flux'"):
        prepare_demo(family="flux")


def test_the_sdxl_demo_store_is_an_sdxl_store_of_its_own(demo_sdxl, attributor_sdxl):
    assert attributor_sdxl.store.identity["model_family"] == "sdxl"
    assert demo_sdxl["family"] == "sdxl" and demo_sdxl["store"].endswith("store-sdxl")


def test_sdxl_planted_exemplars_rank_far_above_chance(ground_truth_sdxl):
    summary, chance = ground_truth_sdxl
    assert set(summary) == set(METHODS)
    assert summary["das"]["ap"] > 5 * chance  # chance AP is about the exemplars' share of the set


def test_sdxl_planted_exemplars_reach_the_recall_target(ground_truth_sdxl):
    summary, _ = ground_truth_sdxl
    assert summary["das"]["recall@10"] >= 0.8
