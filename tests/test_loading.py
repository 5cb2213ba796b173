from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from das_sd.models.loading import (ModelError, load_lora, load_pipeline, read_lora, resolve_base,
                                   resolve_lora_file, to_kohya, to_peft)
from helpers import random_lora, unet_outputs
from tolerances import FLOAT32_FORWARD_ATOL, FLOAT32_FORWARD_RTOL

pytestmark = pytest.mark.numerics


def _merged_by_hand(pipe, state: dict[str, torch.Tensor], scale: float = 1.0):
    """Independent expectation: W + scale * B @ A written into the base weights directly."""
    modules = dict(pipe.unet.named_modules())
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                name = key[len("unet."):-len(".lora_A.weight")]
                b = state[f"unet.{name}.lora_B.weight"]
                modules[name].weight += scale * (b @ a)
    return pipe


def test_embedded_pipeline_loads_offline_with_sd_classes(base_path, monkeypatch):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(str(base_path), local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    # weights equal the shipped safetensors bit for bit
    shipped = load_file(str(base_path / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, shipped[name]), name
    total = sum(p.stat().st_size for p in base_path.rglob("*") if p.is_file())
    assert total < 25 * 1024 * 1024
    assert not list(base_path.rglob("*.bin")) and not list(base_path.rglob("*.ckpt"))


def test_resolve_base_errors(tmp_path):
    with pytest.raises(ModelError, match="model_index.json"):
        resolve_base(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="single-file checkpoint"):
        resolve_base(tmp_path / "model.safetensors")


def test_diffusers_lora_file_matches_merged_weights(pipe, base_path, tmp_path):
    state = random_lora(pipe)
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    expected = unet_outputs(_merged_by_hand(load_pipeline(base_path, device="cpu"), state))
    assert load_lora(pipe, tmp_path) == "diffusers"
    got = unet_outputs(pipe)
    assert torch.allclose(got, expected, atol=FLOAT32_FORWARD_ATOL, rtol=FLOAT32_FORWARD_RTOL)
    assert not torch.allclose(got, unet_outputs(load_pipeline(base_path, device="cpu")), atol=1e-3)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "peft-alpha"])
def test_kohya_and_peft_files_load_to_the_same_outputs(base_path, tmp_path, fmt):
    reference = load_pipeline(base_path, device="cpu")
    state = random_lora(reference, seed=1)
    save_file(state, str(tmp_path / "ref.safetensors"))
    load_lora(reference, tmp_path / "ref.safetensors")
    expected = unet_outputs(reference)

    pipe = load_pipeline(base_path, device="cpu")
    if fmt == "kohya":
        converted = to_kohya(state)
        assert all(k.startswith("lora_unet_") for k in converted)
        save_file(converted, str(tmp_path / "kohya.safetensors"))
        assert load_lora(pipe, tmp_path / "kohya.safetensors") == "kohya"
    else:
        converted = to_peft(state)
        folder = tmp_path / "peft"
        folder.mkdir()
        if fmt == "peft-alpha":  # alpha = 2r doubles the update: store B halved to get the same model
            converted = {k: v / 2 if ".lora_B." in k else v for k, v in converted.items()}
            (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
        save_file(converted, str(folder / "adapter_model.safetensors"))
        assert load_lora(pipe, folder) == "peft"
    assert torch.allclose(unet_outputs(pipe), expected, atol=FLOAT32_FORWARD_ATOL, rtol=FLOAT32_FORWARD_RTOL)


def test_pickled_and_foreign_lora_files_are_refused(tmp_path):
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelError, match="pickled checkpoints are never loaded"):
        resolve_lora_file(tmp_path / "evil.ckpt")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelError, match="odd.safetensors.*unrecognised"):
        read_lora(tmp_path / "odd.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ModelError, match="broken.safetensors"):
        read_lora(tmp_path / "broken.safetensors")
    with pytest.raises(ModelError, match="not found"):
        resolve_lora_file(tmp_path / "nope.safetensors")


def test_shipped_text_encoder_uses_the_key_layout_every_transformers_reads(base_path):
    """Classic ``text_model.*`` keys (as in real SD 1.x checkpoints), and load_pipeline reads them all."""
    file = load_file(str(base_path / "text_encoder" / "model.safetensors"))
    assert file and all(k.startswith("text_model.") for k in file)
    loaded = {k.removeprefix("text_model."): v for k, v in load_pipeline(base_path, device="cpu").text_encoder.state_dict().items()}
    for key, value in file.items():
        assert torch.equal(loaded[key.removeprefix("text_model.")], value), key


def test_text_encoder_keys_the_installed_transformers_cannot_read_are_refused(base_path, tmp_path):
    """transformers itself only logs missing keys and would hand back a random text encoder."""
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(base_path, copy)
    file = copy / "text_encoder" / "model.safetensors"
    save_file({"renamed." + k: v for k, v in load_file(str(file)).items()}, str(file))
    with pytest.raises(ModelError, match=r"text_encoder: transformers .* does not find \d+ of the text encoder's weights"):
        load_pipeline(copy, device="cpu")


def test_text_encoder_layers_convert_to_kohya_and_load_like_merged_weights(base_path, tmp_path):
    from das_sd.models.loading import embedded_demo_lora_path

    state, fmt = read_lora(embedded_demo_lora_path())  # UNet and text-encoder LoRA (the default recipe)
    assert fmt == "diffusers" and any(k.startswith("text_encoder.text_model.") for k in state)
    # independent expectation: W + B @ A written by hand into the UNet and the text encoder
    expected_pipe = load_pipeline(base_path, device="cpu")
    models = {"unet": dict(expected_pipe.unet.named_modules()),
              "text_encoder": dict(expected_pipe.text_encoder.named_modules())}
    with torch.no_grad():
        for key, down in state.items():
            if not key.endswith(".down.weight"):
                continue
            model, name = key.split(".", 1)
            name = name[:-len(".lora_linear_layer.down.weight") if "lora_linear_layer" in name else -len(".lora.down.weight")]
            up = state[key.replace(".down.weight", ".up.weight")]
            target = name.removeprefix("text_model.") if model == "text_encoder" else name
            models[model][target].weight += up @ down
    expected = unet_outputs(expected_pipe)

    converted = to_kohya(state)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in converted)
    save_file(converted, str(tmp_path / "kohya.safetensors"))
    pipe = load_pipeline(base_path, device="cpu")
    assert load_lora(pipe, tmp_path / "kohya.safetensors") == "kohya"
    assert torch.allclose(unet_outputs(pipe), expected, atol=FLOAT32_FORWARD_ATOL, rtol=FLOAT32_FORWARD_RTOL)
    with pytest.raises(ModelError, match="text-encoder layers.*kohya"):
        to_peft(state)


@pytest.mark.parametrize("component,safe_name,pickled_name", [
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
])
def test_pickled_component_weights_are_refused_without_unpickling(base_path, tmp_path, monkeypatch, component,
                                                                  safe_name, pickled_name):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_path, base)
    weights = load_file(str(base / component / safe_name))
    (base / component / safe_name).unlink()
    torch.save(weights, str(base / component / pickled_name))  # a loadable pickle: only policy refuses it

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ModelError, match=f"{component}/{pickled_name}: pickled weights are never loaded"):
        load_pipeline(base, device="cpu")


def test_a_tokenizer_saved_as_tokenizer_json_only_loads_under_transformers_4(base_path, monkeypatch):
    """transformers 4.x's CLIPTokenizer needs vocab.json; the embedded tokenizers are saved by
    transformers 5 as tokenizer.json only. Under a 4.x version string the fast class is loaded and
    registered in the pipeline, and tokenizes exactly as the pipeline's own."""
    from das_sd.latents import tokenize_prompts
    from das_sd.models.tokenizer import fast_only_tokenizers

    assert not (base_path / "tokenizer" / "vocab.json").exists()  # the case the fallback exists for
    assert fast_only_tokenizers(base_path, ("tokenizer",)) == {}  # transformers 5: nothing to do
    prompts = ["quimvex, a red circle on a blue background", "Zorblat, a GREEN square!", "xyzzy " * 40]
    expected = tokenize_prompts(load_pipeline(base_path, device="cpu"), prompts)[0]
    # the module in sys.modules now (loading the pipeline may have put a new lazy module there)
    transformers = sys.modules["transformers"]
    monkeypatch.setattr(transformers, "__version__", "4.51.3")
    assert list(fast_only_tokenizers(base_path, ("tokenizer",))) == ["tokenizer"]
    pipe = load_pipeline(base_path, device="cpu")
    assert isinstance(pipe.tokenizer, transformers.CLIPTokenizerFast)
    assert torch.equal(tokenize_prompts(pipe, prompts)[0], expected)


def test_lora_headers_hold_only_what_any_peft_reads(pipe, base_path, tmp_path):
    """The adapter config das-sd writes into a LoRA header rebuilds the same LoraConfig, without the
    default-valued fields a newer peft adds (an older peft refuses unknown ones)."""
    from peft import LoraConfig

    from das_sd.models.lora_files import adapter_metadata, portable_adapter_config, unknown_adapter_fields

    config = LoraConfig(r=4, lora_alpha=2.5, target_modules={"to_q", "to_v"}, init_lora_weights="gaussian",
                        rank_pattern={"to_q": 2})
    entries = portable_adapter_config(config)
    assert set(entries) == {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "init_lora_weights"}
    assert entries["target_modules"] == ["to_q", "to_v"]
    assert LoraConfig(**entries).to_dict() == config.to_dict()
    # the shipped demo LoRAs are written that way: every entry is one of those fields or differs from its default
    defaults = LoraConfig().to_dict()
    for family in ("sd", "sdxl"):
        from das_sd.models.loading import embedded_demo_lora_path

        metadata = adapter_metadata(resolve_lora_file(embedded_demo_lora_path(family)))
        assert unknown_adapter_fields(metadata) == []
        for key, value in metadata.items():
            field = key.split(".", 1)[1]
            assert field in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern") or \
                value != defaults[field], key

    # a header written by a newer peft (a field this peft does not know) is refused by name, not with
    # LoraConfig's TypeError
    state = random_lora(pipe)
    header = {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": ["to_q"], "unet.rank_pattern": {},
              "unet.alpha_pattern": {}, "unet.future_peft_field": None}
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})
    assert unknown_adapter_fields(header) == ["unet.future_peft_field"]
    with pytest.raises(ModelError, match=r"pytorch_lora_weights.safetensors: .*future_peft_field.*newer peft"):
        load_lora(load_pipeline(base_path, device="cpu"), tmp_path)
