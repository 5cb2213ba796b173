"""Featurization in parts (--shard I/N, merged) and on a local Ray cluster equals one process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from das_sd.data.datasets import open_dataset
from das_sd.featurize.build import default_feature_sets, featurize_dataset
from das_sd.featurize.parallel import merge_parts
from das_sd.featurize.plan import parse_part
from das_sd.featurize.settings import FeaturizerSettings
from das_sd.store import StoreError
from helpers import featurize_cli, random_lora, store_arrays, subset_dataset


pytestmark = pytest.mark.numerics

SETTINGS = FeaturizerSettings(num_timesteps=2, projection_dim=32, residual_timesteps=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_data, base_path):
    from das_sd.models.loading import load_lora, load_pipeline

    root = tmp_path_factory.mktemp("fp")
    data = subset_dataset(demo_data, root / "data", 10)  # 5 blocks of 2
    pipe = load_pipeline(base_path, device="cpu")
    lora = root / "lora.safetensors"
    save_file(random_lora(pipe, rank=2), str(lora))
    load_lora(pipe, lora)

    def run(store, part=None):
        return featurize_dataset(pipe, open_dataset(data), store, base_path, lora, default_feature_sets(SETTINGS),
                                 batch_size=4, shard_size=2, progress=False, part=part)
    reference = root / "reference"
    run(reference)
    return root, data, lora, reference, run


def _same_store(a, b) -> None:
    """Bit for bit: same rows per batch and same thread count give the same reduction orders."""
    x, y = store_arrays(a), store_arrays(b)
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)
    ma, mb = (json.loads((s / "manifest.json").read_text()) for s in (a, b))
    assert ma["shards"] == mb["shards"] and ma["identity"] == mb["identity"] and mb["complete"] is True
    assert not (b / "parts").exists()


def test_parts_merged_equal_a_single_process_store(setup):
    root, data, lora, reference, run = setup
    store = root / "sharded"
    out, err = featurize_cli(store, data, lora, "--shard", "0/3").communicate(timeout=600)
    assert json.loads(out)["complete"] is True, err
    store_settings = json.loads((store / "parts/part-000-of-003/manifest.json").read_text())["identity"]
    assert store_settings == json.loads((reference / "manifest.json").read_text())["identity"]
    with pytest.raises(StoreError, match=r"not started \['1/3', '2/3'\]"):
        merge_parts(store)
    for part in ((2, 3), (1, 3)):  # any order, as a job array would
        run(store, part)
    parts = sorted(p.name for p in (store / "parts").iterdir())
    assert parts == ["part-000-of-003", "part-001-of-003", "part-002-of-003"]
    # block j of 5 goes to part j mod 3: part 0 holds blocks 0 and 3
    blocks = [s["block"] for s in json.loads((store / "parts" / parts[0] / "manifest.json").read_text())["shards"]]
    assert blocks == [0, 3]
    assert len(merge_parts(store, open_dataset(data))) == 10
    _same_store(reference, store)


def test_interrupted_merge_resumes(setup):
    root, data, lora, reference, run = setup
    store = root / "merge-killed"
    for part in ((0, 2), (1, 2)):
        run(store, part)
    # a merge killed after moving the first shard but before recording it in the store's manifest
    part0 = store / "parts" / "part-000-of-002"
    first = json.loads((part0 / "manifest.json").read_text())["shards"][0]
    shutil.move(part0 / first["file"], store / "features-00000.safetensors")
    out, err = featurize_cli(store, data, lora, "--merge").communicate(timeout=600)
    assert json.loads(out)["complete"] is True, err
    _same_store(reference, store)


def test_bad_part_specs_are_refused(setup):
    root, data, lora, _, run = setup
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_part(bad)
    _, err = featurize_cli(root / "bad", data, lora, "--shard", "2/2").communicate(timeout=600)
    assert "--shard '2/2'" in err and "Traceback" not in err
    with pytest.raises(StoreError, match="no parts to merge"):
        merge_parts(root / "reference")


def test_a_part_planned_before_the_main_store_grew_is_refused(setup):
    root, data, lora, reference, run = setup
    store = root / "grown"
    run(store, (0, 2))  # planned against an empty main store: its blocks are cut from all 10 samples
    shutil.copytree(reference, store, dirs_exist_ok=True)  # meanwhile the main store got every row
    with pytest.raises(StoreError, match=r"part-000-of-002: this part was planned when .* held 0 rows, it now holds 10"):
        run(store, (0, 2))


def test_ray_local_cluster_with_two_workers_equals_single_process(setup):
    pytest.importorskip("ray")
    root, data, lora, _, run = setup
    store = root / "ray"
    out, err = featurize_cli(store, data, lora, "--ray", "--ray-workers", "2").communicate(timeout=900)
    assert json.loads(out)["complete"] is True, err
    # Ray workers run one thread each: so does the reference here, for the same reduction orders
    one_thread = root / "reference-1-thread"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(one_thread)
    finally:
        torch.set_num_threads(threads)
    _same_store(one_thread, store)
