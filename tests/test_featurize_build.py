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
