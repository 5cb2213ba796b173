from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from das_sd.data.datasets import open_dataset
from das_sd.featurize.lora_layers import lora_parameters
from das_sd.lora_record import LORA_WEIGHT_NAME, LoraRecipe, read_record, recipe_from_record
from das_sd.models.loading import load_lora, load_pipeline
from das_sd.train import batch_schedule, read_subset_file, train_lora
from helpers import unet_outputs
from tolerances import FLOAT32_FORWARD_ATOL, FLOAT32_FORWARD_RTOL

FAST = dict(steps=12, batch_size=8, rank=4, alpha=4.0, learning_rate=3e-3)


@pytest.fixture(scope="module")
def small_set(demo_data):
    ds = open_dataset(demo_data)
    return ds.subset(ds.keys[::12])  # 21 samples across all concepts


def test_training_is_deterministic_for_a_seed(base_path, small_set, tmp_path):
    pipe = load_pipeline(base_path, device="cpu")
    a = train_lora(base_path, small_set, tmp_path / "a", LoraRecipe(seed=3, **FAST), pipe=pipe, progress=False)
    b = train_lora(base_path, small_set, tmp_path / "b", LoraRecipe(seed=3, **FAST), pipe=pipe, progress=False)
    c = train_lora(base_path, small_set, tmp_path / "c", LoraRecipe(seed=4, **FAST), pipe=pipe, progress=False)
    wa, wb, wc = (load_file(str(tmp_path / n / LORA_WEIGHT_NAME)) for n in "abc")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert a["lora_fingerprint"] == b["lora_fingerprint"] != c["lora_fingerprint"]
    # the base pipeline is left without adapters
    assert not getattr(pipe.unet, "peft_config", None)
    assert not any("lora_" in n for n, _ in pipe.text_encoder.named_parameters())


def test_saved_lora_reproduces_the_trained_model(base_path, small_set, tmp_path):
    pipe = load_pipeline(base_path, device="cpu")
    before = unet_outputs(pipe)
    record = train_lora(base_path, small_set, tmp_path / "lora", LoraRecipe(seed=0, **FAST), pipe=pipe,
                        progress=False, keep_adapter=True)
    trained = unet_outputs(pipe)
    assert not torch.allclose(trained, before, atol=1e-4)  # training changed the model

    fresh = load_pipeline(base_path, device="cpu")
    assert load_lora(fresh, tmp_path / "lora") == "diffusers"
    assert torch.allclose(unet_outputs(fresh), trained, atol=FLOAT32_FORWARD_ATOL, rtol=FLOAT32_FORWARD_RTOL)

    on_disk = read_record(tmp_path / "lora")
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["sample_keys"] == small_set.keys
    assert on_disk["dataset_fingerprint"] == small_set.fingerprint()
    assert on_disk["recipe"]["seed"] == 0 and on_disk["recipe"]["resolution"] == 32
    assert on_disk["base_fingerprint"].startswith("sha256:")


def text_embeddings(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["zorblat, a red circle on a blue background"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_encoder_lora_is_trained_saved_and_reloaded(base_path, small_set, tmp_path):
    pipe = load_pipeline(base_path, device="cpu")
    before = text_embeddings(pipe)
    train_lora(base_path, small_set, tmp_path / "lora", LoraRecipe(seed=0, **FAST), pipe=pipe, progress=False,
               keep_adapter=True)
    trained = text_embeddings(pipe)
    assert not torch.allclose(trained, before, atol=1e-4)
    keys = load_file(str(tmp_path / "lora" / LORA_WEIGHT_NAME)).keys()
    te_keys = [k for k in keys if k.startswith("text_encoder.")]
    # q, k, v, out of every text-encoder layer, down and up, spelled as SD 1.x LoRA files spell them
    assert len(te_keys) == 8 * pipe.text_encoder.config.num_hidden_layers
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    fresh = load_pipeline(base_path, device="cpu")
    load_lora(fresh, tmp_path / "lora")
    assert torch.allclose(text_embeddings(fresh), trained, atol=FLOAT32_FORWARD_ATOL, rtol=FLOAT32_FORWARD_RTOL)

    train_lora(base_path, small_set, tmp_path / "unet-only", LoraRecipe(seed=0, text_encoder_rank=0, **FAST),
               pipe=load_pipeline(base_path, device="cpu"), progress=False)
    assert all(k.startswith("unet.") for k in load_file(str(tmp_path / "unet-only" / LORA_WEIGHT_NAME)))


def test_alpha_different_from_rank_survives_save_and_load(base_path, small_set, tmp_path):
    pipe = load_pipeline(base_path, device="cpu")
    recipe = LoraRecipe(seed=1, **(FAST | {"alpha": 16.0}))
    train_lora(base_path, small_set, tmp_path / "l", recipe, pipe=pipe, progress=False, keep_adapter=True)
    trained = unet_outputs(pipe)
    fresh = load_pipeline(base_path, device="cpu")
    load_lora(fresh, tmp_path / "l")
    assert torch.allclose(unet_outputs(fresh), trained, atol=FLOAT32_FORWARD_ATOL, rtol=FLOAT32_FORWARD_RTOL)
    # the header records the adapter config portably: what rebuilds it, none of peft's other defaults
    # (which an older peft would refuse as unknown fields; tests/test_min_versions.py loads such files)
    from peft import LoraConfig

    from das_sd.models.lora_files import adapter_metadata

    header = {k.split(".", 1)[1]: v for k, v in adapter_metadata(tmp_path / "l" / LORA_WEIGHT_NAME).items()
              if k.startswith("unet.")}
    assert header["lora_alpha"] == 16.0 and header["r"] == recipe.rank
    assert LoraConfig(**header).to_dict() == pipe.unet.peft_config["default"].to_dict()
    assert set(header) <= {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "init_lora_weights"}


def test_training_leaves_the_callers_rng_state_and_modes_as_it_found_them(base_path, small_set, tmp_path):
    """peft's LoRA init draws from torch's global generator: train_lora seeds it for the call only.
    The trained LoRA does not depend on the caller's RNG state, and the caller's (here mixed) module
    modes are back after the call; the LoRA parameters are the ones whose names say lora_."""
    recipe = LoraRecipe(seed=3, **(FAST | {"steps": 2}))
    weights = []
    for caller_seed, text_encoder_rank in ((11, 8), (99, 8), (11, 0)):
        pipe = load_pipeline(base_path, device="cpu")
        unet, text_encoder = pipe.unet, pipe.text_encoder
        unet.train()
        unet.conv_in.eval()
        text_encoder.train()
        modes = [(m, m.training) for m in (*unet.modules(), *text_encoder.modules())]
        torch.manual_seed(caller_seed)
        torch.rand(3)
        state = torch.random.get_rng_state()
        train_lora(base_path, small_set, tmp_path / f"{caller_seed}-{text_encoder_rank}",
                   LoraRecipe(**(asdict(recipe) | {"text_encoder_rank": text_encoder_rank})), pipe=pipe,
                   progress=False, keep_adapter=True)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert [m.training for m, _ in modes] == [training for _, training in modes]
        weights.append(load_file(str(tmp_path / f"{caller_seed}-{text_encoder_rank}" / LORA_WEIGHT_NAME)))
        for model in (unet, pipe.text_encoder) if text_encoder_rank else (unet,):
            by_name = [p for n, p in model.named_parameters() if "lora_" in n]
            assert len(by_name) > 0 and len(lora_parameters(model)) == len(by_name)
            assert all(a is b for a, b in zip(lora_parameters(model), by_name))
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_batch_schedule_respects_repeats_and_seed():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = batch_schedule([1, 3, 1], batch_size=5, steps=4, generator=g1)
    b = batch_schedule([1, 3, 1], batch_size=5, steps=4, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.cat(a)
    assert len(flat) == 20
    counts = torch.bincount(flat[:15], minlength=3).tolist()
    assert counts == [3, 9, 3]  # three full epochs of the repeated pool


def test_subset_file_formats(tmp_path):
    (tmp_path / "a.json").write_text('["k1", "k2"]')
    (tmp_path / "b.txt").write_text("# keys\nk1\n\nk2\n")
    assert read_subset_file(tmp_path / "a.json") == read_subset_file(tmp_path / "b.txt") == ["k1", "k2"]
    (tmp_path / "c.json").write_text('{"k": 1}')
    with pytest.raises(ValueError, match="c.json"):
        read_subset_file(tmp_path / "c.json")


def test_recipe_from_record_reads_old_records_as_unet_only(base_path, small_set, tmp_path):
    record = train_lora(base_path, small_set, tmp_path / "l", LoraRecipe(seed=2, **FAST), progress=False)
    assert recipe_from_record(record) == LoraRecipe(seed=2, resolution=32, **FAST)
    old = {"recipe": {k: v for k, v in record["recipe"].items() if k != "text_encoder_rank"}}
    assert recipe_from_record(old).text_encoder_rank == 0


def test_a_record_without_a_recipe_is_refused_clearly():
    with pytest.raises(ValueError, match="no 'recipe' object"):
        recipe_from_record({"sample_keys": []})
