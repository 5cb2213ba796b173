"""The LDS instrument (das_sd/evaluate/lds.py and its lds_*.py parts) against known answers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from das_sd.attribute import Attributor
from das_sd.evaluate.lds import run_lds
from das_sd.evaluate.lds_outputs import model_outputs
from das_sd.evaluate.lds_settings import LDSSettings
from das_sd.evaluate.lds_stats import lds, oracle_scores, spearman
from das_sd.evaluate.lds_subsets import draw_subsets
from helpers import tiny_attributed_store, torch_threads, write_imagefolder
from tolerances import FLOAT32_FORWARD_RTOL


def test_spearman_known_values():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # textbook example without ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    x, y = np.array([10, 20, 30, 40, 50.0]), np.array([2, 1, 4, 3, 5.0])
    assert spearman(x, y) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # ties get average ranks: x ranks (0.5, 0.5, 2), y ranks (0, 1, 2)
    expected = np.corrcoef([0.5, 0.5, 2.0], [0.0, 1.0, 2.0])[0, 1]
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(expected)
    assert np.isnan(spearman(np.ones(4), a[:4]))


def test_subsets_are_half_size_and_reproducible():
    settings = LDSSettings(subsets=12, subset_seed=3)
    masks = draw_subsets(40, settings)
    assert masks.shape == (12, 40) and (masks.sum(axis=1) == 20).all()
    assert np.array_equal(masks, draw_subsets(40, settings))
    assert not np.array_equal(masks, draw_subsets(40, LDSSettings(subsets=12, subset_seed=4)))
    # a run grows M without retraining: subset j is the same draw for any M > j
    assert np.array_equal(draw_subsets(40, LDSSettings(subsets=30, subset_seed=3))[:12], masks)


def test_lds_of_true_oracle_and_random_scores():
    """Outputs that follow a linear datamodel exactly (plus noise): the true scores and the oracle
    fitted to the outputs reach LDS near 1, random scores near 0."""
    rng = np.random.default_rng(0)
    n, queries = 30, 40
    masks = draw_subsets(n, LDSSettings(subsets=64))
    true = rng.normal(size=(queries, n))
    outputs = -(masks @ true.T) + 0.3 * rng.normal(size=(64, queries))
    assert lds(true, masks, outputs)["lds"] > 0.9
    oracle = lds(oracle_scores(masks, outputs), masks, outputs)
    assert oracle["lds"] > 0.9 and oracle["ci"][0] <= oracle["lds"] <= oracle["ci"][1]
    random = lds(rng.normal(size=(queries, n)), masks, outputs)
    assert abs(random["lds"]) < 0.1 and random["ci"][0] < 0 < random["ci"][1]
    flipped = lds(-true, masks, outputs)  # the sign convention matters: yhat = -sum of scores
    assert flipped["lds"] < -0.9


def test_model_outputs_are_fixed_per_query_and_track_the_loss(lora_pipe):
    """Same key, same noise: identical outputs; the average equals a direct L_simple computation."""
    import torch
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ids = lora_pipe.tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=32,
                              return_tensors="pt").input_ids
    cond = lora_pipe.text_encoder(ids)[0].detach()
    settings = LDSSettings(output_timesteps=3, output_noise_draws=2)
    first = model_outputs(lora_pipe, latents, cond, ["a", "b"], settings)
    assert np.array_equal(first, model_outputs(lora_pipe, latents, cond, ["a", "b"], settings))
    assert not np.array_equal(first, model_outputs(lora_pipe, latents, cond, ["a", "c"], settings))
    # brute force for query 0 with the same noise rule
    import hashlib

    alphas = DDPMScheduler.from_config(lora_pipe.scheduler.config).alphas_cumprod
    losses = []
    for t in (0, 500, 999):
        digest = hashlib.sha256(f"das-sd-lds:0:a:{t}".encode()).digest()
        noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
        for d in range(2):
            x_t = alphas[t].sqrt() * latents[0] + (1 - alphas[t]).sqrt() * noise[d]
            with torch.no_grad():
                pred = lora_pipe.unet(x_t[None], torch.tensor([t]), encoder_hidden_states=cond[:1]).sample[0]
            losses.append(((pred - noise[d]) ** 2).mean().item())
    assert first[0] == pytest.approx(np.mean(losses), rel=1e-5)


def test_retraining_harness_is_cached_resumable_and_parallel(demo, tmp_path):
    """Tiny configuration: 12 training images, 4 subsets, a short recipe, two worker processes."""
    import os

    import torch
    from safetensors.torch import load_file

    from das_sd.data.datasets import open_dataset
    from das_sd.evaluate.lds_outputs import retrained_outputs
    from das_sd.evaluate.lds_queries import LDSQueries
    from das_sd.evaluate.lds_subsets import retrain_subsets
    from das_sd.latents import encode_images
    from das_sd.models.loading import load_pipeline
    from das_sd.lora_record import LORA_WEIGHT_NAME, LoraRecipe
    from das_sd.train import train_lora

    full = open_dataset(demo["data"])
    dataset = full.subset(full.keys[::22][:12])
    recipe = LoraRecipe(steps=6, batch_size=4, rank=2, alpha=2.0, seed=5)
    settings = LDSSettings(subsets=4, output_timesteps=2, output_noise_draws=1)
    masks = draw_subsets(len(dataset), settings)
    folders = retrain_subsets(demo["base"], dataset, masks, recipe, tmp_path, workers=2, progress=False)
    files = [f[0] / LORA_WEIGHT_NAME for f in folders]
    assert all(f.is_file() for f in files)

    # the seed rule: subset 2 equals a direct training run with seed recipe.seed + 1000 * 2, bit for bit
    # with the worker's thread count (one each for two workers on two cores)
    with torch_threads(max(1, torch.get_num_threads() // 2)):
        train_lora(demo["base"], dataset.subset([k for k, m in zip(dataset.keys, masks[2]) if m]),
                   tmp_path / "direct", LoraRecipe(steps=6, batch_size=4, rank=2, alpha=2.0, seed=2005), progress=False)
    direct, worker = load_file(str(tmp_path / "direct" / LORA_WEIGHT_NAME)), load_file(str(files[2]))
    assert direct.keys() == worker.keys()
    for key in direct:
        assert torch.equal(worker[key], direct[key]), key
    other = load_file(str(files[3]))
    assert any(not torch.allclose(other[k], direct[k], atol=1e-4) for k in direct)  # another subset, another LoRA

    # resume: only the missing LoRA is trained again
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    shutil.rmtree(folders[1][0])
    retrain_subsets(demo["base"], dataset, masks, recipe, tmp_path, workers=1, progress=False)
    assert [os.stat(f).st_mtime_ns == stamps[f] for f in files] == [True, False, True, True]

    pipe = load_pipeline(demo["base"], device="cpu")
    held_out = full.subset(full.keys[1::50][:2])
    queries = LDSQueries("val", held_out.keys, encode_images(pipe, held_out, 32), [s.caption for s in held_out])
    outputs = retrained_outputs(demo["base"], folders, queries, settings, progress=False)
    assert outputs.shape == (4, 2) and np.isfinite(outputs).all()
    assert len({round(float(v), 9) for v in outputs[:, 0]}) == 4  # each subset's LoRA changes the output
    cached = list(tmp_path.glob("subset-*/seed-0/outputs-val-*.json"))
    assert len(cached) == 4
    assert np.array_equal(outputs, retrained_outputs(demo["base"], folders, queries, settings, progress=False))

    # the prompts go through each LoRA's text-encoder part (trained by the recipe), as in its generations
    from das_sd.latents import encode_prompts
    from das_sd.models.loading import load_lora

    base_cond = encode_prompts(pipe, queries.prompts)
    load_lora(pipe, folders[2][0], adapter_name="check")
    lora_cond = encode_prompts(pipe, queries.prompts)
    assert not torch.allclose(lora_cond, base_cond, atol=1e-4)  # the text-encoder LoRA changes the prompts
    with_lora_text = model_outputs(pipe, queries.latents, lora_cond, queries.keys, settings)
    with_base_text = model_outputs(pipe, queries.latents, base_cond, queries.keys, settings)
    # equal within the bound of two float32 evaluations of one forward quantity; the base text
    # encoder's prompts move these outputs by 1 - 3 %, far outside it
    assert np.allclose(outputs[2], with_lora_text, rtol=FLOAT32_FORWARD_RTOL, atol=0)
    assert (np.abs(outputs[2] - with_base_text) > 5 * FLOAT32_FORWARD_RTOL * np.abs(with_base_text)).all()


def test_eval_lds_command_end_to_end_on_a_tiny_store(demo, tmp_path, capsys):
    """A 12-image LoRA and store, 3 subsets: the command runs, resumes from its cache, refuses a
    changed plan and training images given as val queries."""
    from das_sd.cli import main
    from das_sd.data.datasets import open_dataset

    full = open_dataset(demo["data"])
    data, val = tmp_path / "data", write_imagefolder(tmp_path / "val", full.samples[5::40][:2])
    _, store = tiny_attributed_store(demo["base"], tmp_path, full.samples[::22][:12])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zorblat, a red circle on a blue background\n")
    argv = ["eval", "lds", "--store", str(store.root), "--workdir", str(tmp_path / "run"), "--val", str(val),
            "--prompts", str(prompts), "--subsets", "3", "--output-timesteps", "2", "--output-noise-draws", "1",
            "--device", "cpu", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first["query_sets"]) == {"val", "gen"}
    val, gen = first["query_sets"]["val"], first["query_sets"]["gen"]
    # val: one query held out to choose lambda, the other reported; gen (one query) is not split
    assert (val["queries"], val["tune_queries"], gen["queries"], gen["tune_queries"]) == (1, 1, 1, 0)
    assert not set(val["query_keys"]) & set(val["tune_keys"])
    assert {"das", "tracin"} <= set(val["lds"])
    curve = first["lambda"]["das"]["curve"]
    assert [p["rho"] for p in curve] == [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    best = max((p for p in curve if p["tune"] == p["tune"]), key=lambda p: p["tune"])  # skip nan
    assert first["lambda"]["das"]["chosen_rho"] == best["rho"]
    assert val["lds"]["das"]["lds"] == next(p for p in curve if p["rho"] == best["rho"])["report"]["val"]
    assert val["lds"]["tracin"] == val["lds_store_lambda"]["tracin"]  # no kernel, no lambda
    assert "tracin" not in first["lambda"]
    assert first["plan"]["recipe"]["steps"] == 6  # the attributed LoRA's own recipe
    assert main(argv) == 0  # everything cached: the same numbers again
    assert json.loads(capsys.readouterr().out) == first
    assert (tmp_path / "run" / f"lds-{store.store_id}.json").is_file()
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("subset-*/seed-0/*.safetensors")}
    assert len(trained) == 3
    assert main([*argv[:-1], "--subsets", "4", "--json"]) == 0  # M grows: only subset 3 is trained
    grown = json.loads(capsys.readouterr().out)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("subset-*/seed-0/*.safetensors")}
    assert len(after) == 4 and all(after[p] == t for p, t in trained.items())
    assert grown["plan"]["settings"]["subsets"] == 4
    attributor = Attributor(store.root, device="cpu")
    with pytest.raises(ValueError, match=r"other retraining settings \(subsets differ\)"):
        run_lds(attributor, tmp_path / "run", [], LDSSettings(subsets=3, fraction=0.25), progress=False)
    assert main([*argv[:7], str(data), *argv[8:]]) == 2  # training images as val queries
    assert "training images of the store" in capsys.readouterr().err


def test_retraining_on_a_local_ray_cluster_gives_the_same_loras(demo, tmp_path):
    ray = pytest.importorskip("ray")
    import torch
    from safetensors.torch import load_file

    from das_sd.data.datasets import open_dataset
    from das_sd.evaluate.lds_subsets import retrain_subsets
    from das_sd.lora_record import LORA_WEIGHT_NAME, LoraRecipe

    full = open_dataset(demo["data"])
    dataset = full.subset(full.keys[::22][:12])
    recipe = LoraRecipe(steps=6, batch_size=4, rank=2, alpha=2.0, seed=5)
    masks = draw_subsets(len(dataset), LDSSettings(subsets=3))
    with torch_threads(1):  # as each Ray task: the same reduction orders, so the same LoRAs bit for bit
        local = retrain_subsets(demo["base"], dataset, masks, recipe, tmp_path / "local", progress=False)
    try:
        on_ray = retrain_subsets(demo["base"], dataset, masks, recipe, tmp_path / "ray", workers=2, progress=False,
                                 ray_address="")
    finally:
        ray.shutdown()
    for a, b in zip(local, on_ray):
        x, y = load_file(str(a[0] / LORA_WEIGHT_NAME)), load_file(str(b[0] / LORA_WEIGHT_NAME))
        assert x.keys() == y.keys()
        for key in x:  # same seed rule, same thread count
            assert torch.equal(y[key], x[key]), key


def test_eval_lds_runs_on_an_sdxl_store(sdxl_demo, tmp_path, capsys):
    """The LDS on an SDXL store (tests/sdxl_store.py): subsets retrained as SDXL LoRAs with both
    text-encoder parts, gen queries generated and scored with SDXL conditioning."""
    from safetensors import safe_open

    from das_sd.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zorblat, a red circle on a blue background\nquimvex, a white triangle on a green background\n")
    argv = ["eval", "lds", "--store", str(sdxl_demo["store"]), "--workdir", str(tmp_path / "run"), "--prompts",
            str(prompts), "--subsets", "3", "--output-timesteps", "2", "--output-noise-draws", "1", "--device", "cpu",
            "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    gen = report["query_sets"]["gen"]
    assert (gen["queries"], gen["tune_queries"]) == (1, 1)
    assert np.isfinite(gen["lds"]["das"]["lds"]) and np.isfinite(gen["lds"]["tracin"]["lds"])
    loras = sorted((tmp_path / "run").glob("subset-*/seed-0/*.safetensors"))
    assert len(loras) == 3
    with safe_open(str(loras[0]), "pt") as fh:
        parts = {key.split(".")[0] for key in fh.keys()}
    assert parts == {"unet", "text_encoder", "text_encoder_2"}  # the recipe's SDXL LoRA, retrained whole
    outputs = [json.loads(p.read_text()) for p in sorted((tmp_path / "run").glob("subset-*/seed-0/outputs-gen-*.json"))]
    # the tune and the reported query of each subset; each subset's LoRA moves them
    assert len(outputs) == 6 and len({json.dumps(o) for o in outputs}) == 6
