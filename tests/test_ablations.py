"""The ablation harness (das_sd/evaluate/ablations.py) on a 12-image fine-tune."""

from __future__ import annotations

import json

import pytest

from das_sd.attribute import Attributor
from das_sd.data.datasets import open_dataset
from das_sd.evaluate.ablations import run_ablations
from das_sd.evaluate.groundtruth import evaluate_ground_truth
from das_sd.evaluate.lds import run_lds
from das_sd.evaluate.lds_queries import val_queries
from das_sd.evaluate.lds_settings import LDSSettings
from helpers import store_arrays, tiny_attributed_store, write_imagefolder


def test_ablations_build_variant_stores_and_share_the_retrained_loras(demo, tmp_path):
    from das_sd.cli import main

    full = open_dataset(demo["data"])
    samples = full.samples[::22][:12]
    dataset, store = tiny_attributed_store(demo["base"], tmp_path, samples)
    data = tmp_path / "data"
    truth = {"version": 1, "groups": [
        {"trigger": "stripes", "files": [s.relpath for s in dataset.samples[:4]],
         "prompts": ["a red circle on a blue background, striped style"]},
        {"trigger": "dots", "files": [s.relpath for s in dataset.samples[4:8]],
         "prompts": ["a white square on a green background, dotted style"]}]}
    (data / "ground_truth.json").write_text(json.dumps(truth))
    attributor = Attributor(store.root, device="cpu")
    val = write_imagefolder(tmp_path / "val", full.samples[5::40][:2])
    settings = LDSSettings(subsets=3, output_timesteps=2, output_noise_draws=1)
    lds_run = {"workdir": tmp_path / "lds", "queries": [val_queries(attributor, val)], "settings": settings}

    work = tmp_path / "ablations"
    out = run_ablations(attributor, work, ["f=mean", "k=512"], data, lds_run, progress=False)
    assert list(out["rows"]) == ["das (base store)", "leverage off", "signed (t_i, not t_i^2)", "f=mean", "k=512"]

    # each variant store changes exactly its setting, and holds what a plain featurization gives
    cmd = ["featurize", "--data", str(data), "--lora", str(tmp_path / "lora"), "--store", str(tmp_path / "direct"),
           "--device", "cpu", "--feature-sets", "das", "--timesteps", "2", "--residual-timesteps", "4",
           "--output", "mean"]
    assert main(cmd) == 0
    variant = Attributor(work / "stores" / "f=mean", device="cpu")
    base_sets, variant_sets = store.identity["feature_sets"], variant.store.identity["feature_sets"]
    assert set(variant_sets) == {"das"}
    assert {k for k in base_sets["das"] if base_sets["das"][k] != variant_sets["das"][k]} == {"output"}
    assert store_arrays(work / "stores" / "f=mean").keys() == store_arrays(tmp_path / "direct").keys()
    for key, value in store_arrays(tmp_path / "direct").items():
        assert (store_arrays(work / "stores" / "f=mean")[key] == value).all(), key
    assert Attributor(work / "stores" / "k=512", device="cpu").store.identity["feature_sets"]["das"][
        "projection_dim"] == 512

    # rows are the instruments' own numbers: ground truth per split and LDS from the same 3 retrained LoRAs
    assert out["rows"]["das (base store)"]["groundtruth_test"] == evaluate_ground_truth(
        attributor, data, "test", ["das"])["methods"]["das"]
    assert out["rows"]["leverage off"]["groundtruth_tune"] == evaluate_ground_truth(
        attributor, data, "tune", ["das-noleverage"])["methods"]["das-noleverage"]
    loras = sorted((tmp_path / "lds").glob("subset-*/seed-*/pytorch_lora_weights.safetensors"))
    assert len(loras) == 3
    direct = run_lds(variant, tmp_path / "lds", lds_run["queries"], settings, ["das"], progress=False)
    assert out["rows"]["f=mean"]["lds"]["val"]["lds"] == direct["query_sets"]["val"]["lds"]["das"]["lds"]
    assert len(list((tmp_path / "lds").glob("lds-das-*.json"))) == 3  # base, f=mean and k=512 stores

    # a rerun reuses every variant store and retrained LoRA and gives the same numbers
    mtimes = {p: p.stat().st_mtime_ns for p in work.glob("stores/*/features-*.safetensors")}
    again = run_ablations(attributor, work, ["f=mean", "k=512"], None, lds_run, method_variants=False,
                          progress=False)
    assert {p: p.stat().st_mtime_ns for p in work.glob("stores/*/features-*.safetensors")} == mtimes
    assert len(mtimes) == 2 and "groundtruth_test" not in again["rows"]["f=mean"]
    assert {n: r["lds"] for n, r in again["rows"].items()} == \
        {n: out["rows"][n]["lds"] for n in ("das (base store)", "f=mean", "k=512")}

    assert sorted((tmp_path / "lds").glob("subset-*/seed-*/pytorch_lora_weights.safetensors")) == loras
    with pytest.raises(ValueError, match="--variants: unknown"):
        run_ablations(attributor, work, ["f=median"], data, None)
