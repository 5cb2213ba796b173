"""Featurizing a dataset into a store: resume after SIGKILL, incremental additions, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from helpers import (
    featurize_cli,
    random_lora,
    store_arrays,
    subset_dataset,
)
from safetensors.torch import save_file
from tolerances import FLOAT32_STORE_RTOL

from das_sd.store import FeatureStore, StoreError


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_data, base_path):
    from das_sd.models.loading import load_pipeline

    root = tmp_path_factory.mktemp("fb")
    data = subset_dataset(demo_data, root / "data", 16)
    pipe = load_pipeline(base_path, device="cpu")
    lora = root / "lora.safetensors"
    save_file(random_lora(pipe, rank=2), str(lora))
    other = root / "other.safetensors"
    save_file(random_lora(pipe, rank=2, seed=5), str(other))
    return root, data, lora, other


def test_killed_featurization_resumes_to_an_identical_store(setup):
    root, data, lora, _ = setup
    reference = root / "reference"
    proc = featurize_cli(reference, data, lora)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    interrupted = root / "interrupted"
    proc = featurize_cli(interrupted, data, lora)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as the first shard is recorded
        manifest = interrupted / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((interrupted / "manifest.json").read_text())
    assert 1 <= len(state["shards"]) < 8 and state["complete"] is False

    proc = featurize_cli(interrupted, data, lora)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert json.loads(out)["last_run"]["samples"] == 16 - 2 * len(state["shards"])
    a, b = store_arrays(reference), store_arrays(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((s / "manifest.json").read_text()) for s in (reference, interrupted))
    assert ma["shards"] == mb["shards"] and ma["identity"] == mb["identity"] and mb["complete"] is True
    assert not list(interrupted.glob(".*.tmp"))


def test_added_images_are_featurized_without_recomputing_the_others(setup, demo_data):
    root, data, lora, _ = setup
    grown = root / "grown"
    shutil.copytree(data, grown)
    store = root / "incremental"
    proc = featurize_cli(store, grown, lora)
    assert proc.wait(timeout=600) == 0
    before = {p.name: p.read_bytes() for p in store.glob("features-*.safetensors")}
    extra = (demo_data / "metadata.jsonl").read_text().splitlines()[5:8]
    for line in extra:
        name = json.loads(line)["file_name"]
        shutil.copy(demo_data / name, grown / name)
    with (grown / "metadata.jsonl").open("a") as fh:
        fh.write("\n".join(extra) + "\n")
    proc = featurize_cli(store, grown, lora)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert json.loads(out)["last_run"]["samples"] == 3 and json.loads(out)["samples"] == 19
    after = {p.name: p.read_bytes() for p in store.glob("features-*.safetensors")}
    assert all(after[name] == data for name, data in before.items())  # old shards untouched
    assert len(after) == len(before) + 2  # 3 new rows in shards of 2


def test_store_for_another_lora_or_settings_is_refused(setup):
    root, data, lora, other = setup
    store = root / "reference"
    for extra, lora_file, needle in (([], other, "lora_fingerprint"),
                                     (["--dim", "64"], lora, "feature_sets.das.projection_dim"),
                                     (["--autocast", "bf16"], lora, "compute_dtype")):
        proc = featurize_cli(store, data, lora_file, *extra)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and needle in err and "Traceback" not in err
    with pytest.raises(StoreError, match="lora_fingerprint"):
        FeatureStore.open(store, {**FeatureStore.open(store).identity, "lora_fingerprint": "sha256:x"})


@pytest.fixture(scope="module")
def sd15_locon(tmp_path_factory):
    """An SD 1.5-layout pipeline folder and a LoCon LoRA file (attention, feed-forward, 1x1 conv
    projections, 3x3 ResNet and sampler convs) in diffusers format, as diffusers' own saver writes it."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from sd_layouts import LOCON, add_random_lora, save_pipeline, sd_pipeline

    root = tmp_path_factory.mktemp("sd15")
    pipe = sd_pipeline("sd15")
    save_pipeline(pipe, root / "base")
    add_random_lora(pipe.unet, LOCON, rank=4, alpha=8.0)
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    return root


def test_a_locon_lora_on_an_sd15_layout_model_is_featurized_whole_and_accounted(sd15_locon, demo_data, tmp_path):
    from das_sd.featurize.lora_layers import lora_inventory
    from das_sd.models.loading import load_lora, load_pipeline

    data = subset_dataset(demo_data, tmp_path / "data", 4)
    proc = featurize_cli(tmp_path / "store", data, sd15_locon / "lora", "--base", str(sd15_locon / "base"),
                         "--feature-sets", "das")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    printed = json.loads(out)["lora_parameters"]
    pipe = load_pipeline(sd15_locon / "base", device="cpu")
    load_lora(pipe, sd15_locon / "lora")
    expected = sum(p.numel() for n, p in pipe.unet.named_parameters() if ".lora_" in n)  # every adapter parameter
    assert printed == lora_inventory(pipe.unet).record()
    assert printed["differentiated_total"] == expected and printed["left_out_total"] == 0
    assert set(printed["differentiated"]) == {"linear", "conv1x1", "conv3x3"}
    store = FeatureStore.open(tmp_path / "store")
    assert store.manifest["info"]["lora_parameters"] == printed and store.identity["lora_parameters"] == expected
    assert len(store) == 4 and store.manifest["complete"]


def test_parameters_das_sd_cannot_differentiate_are_refused_or_recorded_with_allow_partial(sd15_locon, demo_data,
                                                                                          tmp_path):
    from peft import LoraConfig

    from das_sd.attribute import Attributor
    from das_sd.data.datasets import open_dataset
    from das_sd.featurize.build import featurize_dataset
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.models.loading import ModelError, load_pipeline
    from sd_layouts import ATTENTION

    pipe = load_pipeline(sd15_locon / "base", device="cpu")
    names = sorted({n for n, _ in pipe.unet.named_modules() if n.endswith(tuple(ATTENTION))})
    # a LoRA that also trains a full copy of conv_out (peft modules_to_save), as some trainers do
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=names, modules_to_save=["conv_out"]))
    dataset = open_dataset(subset_dataset(demo_data, tmp_path / "data", 2))
    lora_file = sd15_locon / "lora" / "pytorch_lora_weights.safetensors"  # names the LoRA in the identity only
    sets = {"das": FeaturizerSettings(num_timesteps=2, projection_dim=32, residual_timesteps=2)}
    with pytest.raises(ModelError, match=r"modules_to_save \(Conv2d\) \(1,156 parameters\).*--allow-partial"):
        featurize_dataset(pipe, dataset, tmp_path / "refused", sd15_locon / "base", lora_file, sets, progress=False)
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    store = featurize_dataset(pipe, dataset, tmp_path / "partial", sd15_locon / "base", lora_file, sets,
                              progress=False, allow_partial=True)
    record = store.manifest["info"]["lora_parameters"]
    assert record["left_out"] == {"modules_to_save (Conv2d)": 1156} and record["left_out_total"] == 1156
    conv_out = pipe.unet.conv_out.modules_to_save["default"]
    assert 1156 == conv_out.weight.numel() + conv_out.bias.numel()
    notes = Attributor.notes.fget(type("Bare", (), {"store": store})())  # what every attribution carries
    assert len(notes) == 1 and "partial attribution" in notes[0] and "modules_to_save (Conv2d) (1,156)" in notes[0]


@pytest.mark.parametrize("header, side", [("(512, 512)", 512), ("512,512", 512), ("768", 768),
                                          ("(512, 768)", 624), ("[1024, 576]", 768), (None, None), ("?", None)])
def test_the_featurizing_resolution_follows_what_a_kohya_lora_records(tmp_path, header, side):
    from das_sd.featurize.build import training_resolution

    file = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(file),
              metadata={"ss_resolution": header} if header else None)
    # a non-square (bucketed) w x h: the square of the same area, a multiple of 8
    assert training_resolution(file) == side


def test_the_featurizing_resolution_follows_a_das_sd_record(tmp_path):
    from das_sd.featurize.build import training_resolution

    file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, str(file), metadata={"ss_resolution": "(64, 64)"})
    (tmp_path / "lora_record.json").write_text(json.dumps({"recipe": {"resolution": 24}}))
    assert training_resolution(file) == 24  # das-sd's own record wins
    (tmp_path / "lora_record.json").write_text(json.dumps({"recipe": {"resolution": None}}))
    assert training_resolution(file) is None  # trained at the model's native resolution


def test_a_signed_residual_store_is_built_and_indexed(setup, tmp_path):
    """--residual signed end to end: the store keeps a (N, k) u_i per row beside phi_i, records the form,
    and `das-sd index` stores (G - phi_i phi_i^T)^-1 u_i, recomputed here from the stored arrays."""
    import numpy as np

    from das_sd.cli import main

    root, data, lora, _ = setup
    proc = featurize_cli(tmp_path / "signed", data, lora, "--residual", "signed", "--residual-timesteps", "0",
                         "--feature-sets", "das")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    store = FeatureStore.open(tmp_path / "signed")
    assert store.identity["feature_sets"]["das"]["residual"] == "signed"
    phi, u = store.load("features.das").double().numpy(), store.load("residuals.das").double().numpy()
    assert u.shape == phi.shape == (16, store.identity["feature_sets"]["das"]["projection_dim"])
    assert main(["index", "--store", str(store.root)]) == 0
    store = FeatureStore.open(store.root)
    g = phi.T @ phi + store.manifest["indexes"]["das"]["lambda"] * np.eye(phi.shape[1])
    expected = np.stack([np.linalg.solve(g - np.outer(phi[i], phi[i]), u[i]) for i in range(len(phi))])
    got = store.load_index("das")["psi_das"].double().numpy()
    # float32 storage of a float64 solve (tests/tolerances.py), with a floor for entries that cancel to ~0
    assert np.allclose(got, expected, rtol=FLOAT32_STORE_RTOL, atol=1e-12 * np.abs(expected).max())
