"""SDXL LoRA files as kohya's sd-scripts writes them (``sdxl_train_network``): UNet layers named by the original
SGM module paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), both text encoders
(``lora_te1_`` / ``lora_te2_``), per-layer ranks and alphas; on a pipeline with SDXL base's block layout
at reduced widths. The SGM names are written from a table typed out by hand for SDXL's layout
(tests/sgm_layout.py), not from das-sd's derivation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from das_sd.models.loading import ModelError, export_lora, load_lora, load_pipeline
from sd_layouts import save_pipeline, sd_pipeline, sdxl_pipeline
from sgm_layout import sgm_name
from tolerances import ALGEBRAIC_RTOL, relative_error

pytestmark = pytest.mark.numerics

# kohya's SDXL defaults (transformer linears) with LoCon's ResNet and sampler convs, and the embeddings
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in",
                "conv_out", "time_embedding.linear_1", "add_embedding.linear_2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA_TEXT = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    return save_pipeline(sdxl_pipeline(), tmp_path_factory.mktemp("sdxl") / "base")


def _layers(pipe):
    """(model, module path, module) of every targeted linear / conv layer of the UNet and both text encoders."""
    for model, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        for name, module in getattr(pipe, model).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(targets):
                if model != "unet" and not name.startswith("text_model."):
                    name = "text_model." + name  # transformers 5 dropped the submodule; files keep it
                yield model, name, module


def sgm_kohya_file(pipe, seed: int = 0, ranks: tuple = (2, 4, 3), alphas: tuple = (1.0, 6.0, 2.5, 4.0)):
    """An sd-scripts SDXL file, float64, the layers' ranks and alphas cycling through ``ranks`` and
    ``alphas``; and the update of each layer."""
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for i, (model, name, module) in enumerate(_layers(pipe)):
        rank, alpha = ranks[i % len(ranks)], alphas[i % len(alphas)]
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g, dtype=torch.float64)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g, dtype=torch.float64)
        else:
            down = torch.randn(rank, module.in_features, generator=g, dtype=torch.float64)
            up = torch.randn(module.out_features, rank, generator=g, dtype=torch.float64)
        down, up = down / down[0].numel() ** 0.5, up * 0.3 / rank ** 0.5
        key = ("lora_unet_" + sgm_name(name) if model == "unet" else KOHYA_TEXT[model] + name).replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha, dtype=torch.float64)})
        expected[(model, name)] = alpha / rank * (up.flatten(1) @ down.flatten(1))
    return state, expected


def loaded_updates(pipe, adapter: str = "default") -> dict:
    """scaling * B A of every LoRA layer peft holds in the pipeline's UNet and text encoders."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for model in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(pipe, model).named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                if model != "unet" and not name.startswith("text_model."):
                    name = "text_model." + name
                b, a = module.lora_B[adapter].weight, module.lora_A[adapter].weight
                out[(model, name)] = module.scaling[adapter] * (b.flatten(1).double() @ a.flatten(1).double())
    return out


def assert_same_updates(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for layer, value in expected.items():
        assert relative_error(got[layer], value) < ALGEBRAIC_RTOL, layer


def merged_by_hand(base, expected: dict):
    """Independent expectation: each layer's update added to the base weights, no peft involved."""
    pipe = load_pipeline(base, device="cpu", dtype=torch.float64)
    with torch.no_grad():
        for (model, name), delta in expected.items():
            modules = dict(getattr(pipe, model).named_modules())
            module = modules.get(name) or modules[name.removeprefix("text_model.")]
            module.weight += delta.view(module.weight.shape)
    return pipe


def outputs(pipe) -> list[torch.Tensor]:
    """The UNet's prediction with SDXL's added conditioning, and both text encoders' states, in float64."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 560, (2, 77), generator=g)
    with torch.no_grad():
        states = [pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
                  pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2],
                  pipe.text_encoder_2(ids).text_embeds]
        sample = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2, dtype=torch.float64)
        eps = pipe.unet(sample, torch.tensor([500, 20]), encoder_hidden_states=torch.cat(states[:2], dim=-1),
                        added_cond_kwargs={"text_embeds": states[2], "time_ids": time_ids}).sample
    return [eps, *states]


def assert_same_outputs(got: list, expected: list, base: list) -> None:
    for g, e, b in zip(got, expected, base, strict=True):
        assert relative_error(g, e) < ALGEBRAIC_RTOL
        assert relative_error(b, e) > 1e-3  # the LoRA changes every output far beyond the bound


def test_sd_scripts_sdxl_file_loads_each_layer_with_its_rank_and_alpha(sdxl_base, tmp_path):
    """SGM-named UNet layers (attention, feed-forward, projections, ResNet / sampler convs, embeddings)
    and both text encoders' layers, ranks 2-4, alphas 1-6: every layer's update is alpha / rank *
    up @ down and the UNet's and text encoders' outputs are those of the weights merged by hand."""
    pipe = load_pipeline(sdxl_base, device="cpu", dtype=torch.float64)
    state, expected = sgm_kohya_file(pipe)
    assert {model for model, _ in expected} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(".op" in sgm_name(n) for m, n in expected if m == "unet")  # the samplers are among them
    save_file(state, str(tmp_path / "sdxl_kohya.safetensors"))
    assert load_lora(pipe, tmp_path / "sdxl_kohya.safetensors") == "kohya"
    assert_same_updates(loaded_updates(pipe), expected)
    base = outputs(load_pipeline(sdxl_base, device="cpu", dtype=torch.float64))
    assert_same_outputs(outputs(pipe), outputs(merged_by_hand(sdxl_base, expected)), base)


def test_diffusers_own_sgm_conversion_places_every_layer_where_das_sd_does(sdxl_base, tmp_path):
    """With one rank and alpha for all layers (diffusers' kohya conversion gives attention layers the
    file's most common alpha, not their own), diffusers' load_lora_weights, with its own SGM -> diffusers
    renaming, loads the same update into every layer as das-sd: an independent check of the names."""
    pipe = load_pipeline(sdxl_base, device="cpu", dtype=torch.float64)
    state, expected = sgm_kohya_file(pipe, seed=5, ranks=(4,), alphas=(6.0,))
    save_file(state, str(tmp_path / "uniform.safetensors"))
    load_lora(pipe, tmp_path / "uniform.safetensors")
    assert_same_updates(loaded_updates(pipe), expected)
    theirs = load_pipeline(sdxl_base, device="cpu", dtype=torch.float64)
    theirs.load_lora_weights(str(tmp_path), weight_name="uniform.safetensors", adapter_name="default")
    assert_same_updates(loaded_updates(theirs), expected)


def test_export_to_kohya_writes_sd_scripts_sdxl_names_and_round_trips(sdxl_base, tmp_path):
    """A LoRA loaded from an sd-scripts SDXL file, saved in diffusers' format as train-lora saves it and
    exported to kohya: the export has the SGM / lora_te1_ / lora_te2_ names and alphas of the original
    file, with --base and without (its text_encoder_2 part tells SDXL), and loads to the same outputs."""
    from das_sd.lora_record import LORA_WEIGHT_NAME
    from das_sd.train import _save_lora

    pipe = load_pipeline(sdxl_base, device="cpu", dtype=torch.float64)
    state, expected = sgm_kohya_file(pipe, seed=3)
    save_file(state, str(tmp_path / "original.safetensors"))
    load_lora(pipe, tmp_path / "original.safetensors")
    _save_lora(pipe, tmp_path / "trained", [pipe.text_encoder, pipe.text_encoder_2])
    assert (tmp_path / "trained" / LORA_WEIGHT_NAME).is_file()
    for base in (sdxl_base, None):
        out = export_lora(tmp_path / "trained", "kohya", tmp_path / f"export-{base is None}.safetensors", base=base)
        exported = load_file(str(out))
        assert exported.keys() == state.keys()
        for key in (k for k in state if k.endswith(".alpha")):
            assert float(exported[key]) == pytest.approx(float(state[key]), rel=1e-12), key
        again = load_pipeline(sdxl_base, device="cpu", dtype=torch.float64)
        load_lora(again, out)
        assert_same_updates(loaded_updates(again), expected)
    base_outputs = outputs(load_pipeline(sdxl_base, device="cpu", dtype=torch.float64))
    assert_same_outputs(outputs(again), outputs(merged_by_hand(sdxl_base, expected)), base_outputs)


def test_a_text_encoder_2_lora_on_an_sd1_pipeline_is_refused(tmp_path):
    pipe = sd_pipeline("sd15")
    width = pipe.text_encoder.config.hidden_size  # the layer exists in text_encoder, not in a text_encoder_2
    state = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, width),
             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(width, 2)}
    save_file(state, str(tmp_path / "sdxl_te2.safetensors"))
    with pytest.raises(ModelError, match=r"sdxl_te2\.safetensors: 1 of its 1 kohya layers name no layer of this "
                                         r"pipeline \(e\.g\. lora_te2_text_model_encoder_layers_0_self_attn_q_proj\)"):
        load_lora(pipe, tmp_path / "sdxl_te2.safetensors")


def test_sgm_names_of_another_layout_are_refused_by_name(sdxl_base, tmp_path):
    """input_blocks.9 does not exist in SDXL (eight input blocks after conv_in), nor does input_blocks.1.1
    (level 0 has no attention): such a file is refused naming the layers, nothing loaded."""
    pipe = load_pipeline(sdxl_base, device="cpu")
    state = {}
    for name in ("input_blocks_9_0_in_layers_2", "input_blocks_1_1_proj_in"):
        state[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(2, 4)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(4, 2)
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match=r"other\.safetensors: 2 of its 2 kohya layers name no layer of this pipeline "
                                         r"\(e\.g\. (?=[^)]*lora_unet_input_blocks_9_0_in_layers_2)"
                                         r"(?=[^)]*lora_unet_input_blocks_1_1_proj_in)"):
        load_lora(pipe, tmp_path / "other.safetensors")
    assert not getattr(pipe.unet, "peft_config", None)


def test_the_same_module_named_twice_is_refused(sdxl_base, tmp_path):
    """An SGM and a diffusers name of one layer in one file: which one holds would be a guess."""
    pipe = load_pipeline(sdxl_base, device="cpu")
    state = {}
    for name in ("input_blocks_4_1_proj_in", "down_blocks_1_attentions_0_proj_in"):
        state[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(2, 64)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(64, 2)
    save_file(state, str(tmp_path / "twice.safetensors"))
    with pytest.raises(ModelError, match=r"twice\.safetensors: kohya layers .* both name the unet's layer "
                                         r"'down_blocks\.1\.attentions\.0\.proj_in'"):
        load_lora(pipe, tmp_path / "twice.safetensors")
