"""Counterfactual removal (das_sd/evaluate/counterfactual.py) on a 12-image LoRA and store."""

from __future__ import annotations

import json
import os

import pytest

from helpers import tiny_attributed_store


@pytest.fixture(scope="module")
def tiny(demo, tmp_path_factory):
    from das_sd.data.datasets import open_dataset

    root = tmp_path_factory.mktemp("cf")
    dataset, store = tiny_attributed_store(demo["base"], root, open_dataset(demo["data"]).samples[::22][:12])
    prompts = root / "prompts.txt"
    prompts.write_text("zorblat, a red circle on a blue background\n")
    return root, dataset, store, prompts


def test_counterfactual_command_retrains_without_the_top_k_and_measures_the_change(tiny, capsys):
    from das_sd.attribute import Attributor
    from das_sd.cli import main
    from das_sd.generation import GenerationSettings, generate
    from das_sd.lora_record import read_record

    root, dataset, store, prompts = tiny
    run = root / "run"
    argv = ["eval", "counterfactual", "--store", str(store.root), "--workdir", str(run), "--prompts", str(prompts),
            "--top-k", "3", "--methods", "das,tracin", "--device", "cpu", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    row = first["per_generation"][0]
    # what was removed: each method's own top-3 for this generation, and 3 random images
    attributor = Attributor(store.root, device="cpu")
    original = generate(attributor.pipe, GenerationSettings(prompt=prompts.read_text().strip(), seed=0))
    for name in ("das", "tracin"):
        top = attributor.attribute_latents(original.latents, prompts.read_text().strip(), name, top_k=3)[0]
        assert row["removed"][name] == [r.key for r in top.results]
    assert len(set(row["removed"]["random-0"])) == 3
    # each retrained LoRA saw exactly the dataset minus the removed images, with the attributed seed
    for name, folder in (("das", "das"), ("tracin", "tracin"), ("random-0", "random-0")):
        record = read_record(run / "gen-000" / folder)
        assert set(record["sample_keys"]) == set(dataset.keys) - set(row["removed"][name])
        assert record["recipe"]["seed"] == 0 and record["recipe"]["steps"] == 6
    # the full set retrained is the attributed LoRA again: the generation comes back (float noise only)
    full = "full set (retraining noise)"
    assert row["pixel"][full] < 2e-3 and row["latent"][full] < 1e-2
    for name in ("das", "tracin", "random-0"):  # removing 3 of 12 images moves the generation
        assert row["pixel"][name] > 10 * row["pixel"][full] and row["latent"][name] > 0
    assert set(first["median"]) == {"das", "tracin", "random (control)", full}
    assert first["median"]["das"]["pixel"] == pytest.approx(row["pixel"]["das"])
    # rerun: everything cached, the same numbers, nothing retrained
    stamps = {p: os.stat(p).st_mtime_ns for p in run.glob("gen-000/*/pytorch_lora_weights.safetensors")}
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
    assert main([*argv[:-1], "--top-k", "4", "--json"]) == 2
    assert "holds a counterfactual run with other settings" in capsys.readouterr().err
