"""Attribution on the demo: planted ground truth, the CLI's JSON, and clear errors for bad queries."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from das_sd.attribute import Attributor, QueryError
from das_sd.cli import main
from das_sd.data.ground_truth import load_ground_truth
from das_sd.evaluate.groundtruth import SPLITS, evaluate_ground_truth, queries_for
from das_sd.generation import GenerationSettings, generate
from das_sd.png_metadata import save_png
from das_sd.registry import DEFAULT_METHOD, METHODS
from tolerances import U32


@pytest.fixture(scope="module")
def attributor(demo):
    return Attributor(demo["store"], device="cpu")


@pytest.fixture(scope="module")
def ground_truth_summary(demo, attributor):
    """Recall@10 and AP of each group's exemplars, per method, on the test split (3 generations per
    trigger word; the defaults were chosen on the disjoint tune split)."""
    report = evaluate_ground_truth(attributor, demo["data"], split="test")
    print("planted ground truth, test split:", json.dumps(report["methods"]))
    print("AP per group:", json.dumps(report["ap_per_group"][DEFAULT_METHOD]))
    return report["methods"], report["chance_ap"]


def test_tune_and_test_queries_are_disjoint(demo):
    truth = load_ground_truth(demo["data"])
    tune, test = queries_for(truth, "tune"), queries_for(truth, "test")
    assert len(test) == 3 * len(truth["groups"]) and {q.trigger for q in test} == {g["trigger"] for g in truth["groups"]}
    assert not {q.prompt for q in tune} & {q.prompt for q in test}
    assert not {q.seed for q in tune} & {q.seed for q in test}
    assert set(SPLITS) == {"tune", "test"}


def test_planted_exemplars_rank_far_above_chance(ground_truth_summary):
    summary, chance = ground_truth_summary
    assert set(summary) == set(METHODS)
    for name in ("das", DEFAULT_METHOD):
        assert summary[name]["ap"] > 5 * chance  # chance AP is about the exemplars' share of the set
        assert summary[name]["recall@10"] > summary["latent-sim"]["recall@10"]


def test_planted_exemplars_reach_the_recall_target(ground_truth_summary):
    summary, _ = ground_truth_summary
    assert summary[DEFAULT_METHOD]["recall@10"] >= 0.8 and summary["das"]["recall@10"] >= 0.8


def test_attribute_json_schema_and_same_keys_as_api(demo, attributor, tmp_path, capsys):
    result = generate(attributor.pipe, GenerationSettings(prompt="zorblat, a green square on a orange background", seed=3))
    path = save_png(result.images[0], tmp_path / "gen.png", result.metadata(0))
    code = main(["attribute", "--store", demo["store"], "--image", str(path), "--top-k", "5", "--json",
                 "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["method"] == DEFAULT_METHOD and out["query"]["prompt"] == result.settings.prompt
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert set(out["results"][0]) == {"rank", "key", "path", "caption", "score", "sign", "share"}
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)
    # share: the score over the sum of all N training images' scores (the default method's scores t^2
    # are all >= 0),
    # recomputed here in float64 from the same query's t: the CLI's float32 t^2 differ by <= 2 u each
    latents, prompt, _ = attributor.image_query(path)
    assert METHODS[DEFAULT_METHOD].squared
    t = attributor.scores(latents, [prompt], DEFAULT_METHOD).double()
    total = float(t.pow(2).sum())
    assert [r["share"] for r in out["results"]] == pytest.approx([s / total for s in scores], rel=4 * U32)
    assert [r["share"] for r in out["results"]] == pytest.approx([float(t.abs().max() ** 2 / total)] + [
        r["share"] for r in out["results"][1:]], rel=4 * U32)  # the best share belongs to the largest |t|
    api = attributor.attribute_image(path, method=DEFAULT_METHOD, top_k=5)
    assert [r.key for r in api.results] == [r["key"] for r in out["results"]]


def test_a_long_prompt_is_shortened_in_output_and_its_truncation_said(demo, attributor, tmp_path, capsys):
    result = generate(attributor.pipe, GenerationSettings(prompt="zorblat, a green square on a orange background", seed=3))
    path = save_png(result.images[0], tmp_path / "gen.png", result.metadata(0))
    long_prompt = "zorblat, a green square on a orange background, " + "very " * 2000
    code = main(["attribute", "--store", demo["store"], "--image", str(path), "--prompt", long_prompt,
                 "--top-k", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    assert long_prompt not in captured.out and len(captured.out) < 2000  # the prompt echoed shortened
    # the text encoder reads model_max_length tokens (77 for SD, 32 for the tiny model), start and end included
    tokenizer = attributor.pipe.tokenizer
    ids = tokenizer(long_prompt, truncation=False, verbose=False)["input_ids"]
    assert len(ids) > 2000
    assert f"its last {len(ids) - tokenizer.model_max_length} tokens had no effect" in captured.err
    code = main(["attribute", "--store", demo["store"], "--image", str(path), "--top-k", "3", "--device", "cpu"])
    assert code == 0 and "warning" not in capsys.readouterr().err  # the image's own prompt fits


def test_bad_queries_get_clear_errors(attributor, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "no_meta.png")
    with pytest.raises(QueryError, match="no prompt"):
        attributor.attribute_image(tmp_path / "no_meta.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "big.png")
    with pytest.raises(QueryError, match="64x64"):
        attributor.attribute_image(tmp_path / "big.png", prompt="a red square")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(QueryError, match="corrupt.png: not a readable image"):
        attributor.attribute_image(tmp_path / "corrupt.png", prompt="x")
    with pytest.raises(ValueError, match="unknown method"):
        attributor.attribute_image(tmp_path / "no_meta.png", prompt="x", method="nope")
    size = attributor.resolution
    Image.new("RGBA", (size, size), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.raises(QueryError, match="clear.png: the image is fully transparent"):
        attributor.attribute_image(tmp_path / "clear.png", prompt="x")
    from test_images import png_header

    (tmp_path / "bomb.png").write_bytes(png_header(22000, 22000))
    with pytest.raises(QueryError, match="bomb.png: image of 484,000,000 pixels, over das-sd's limit"):
        attributor.attribute_image(tmp_path / "bomb.png", prompt="x")


def test_a_method_whose_feature_set_the_store_lacks_is_refused_by_every_path(attributor, monkeypatch):
    """Attributor.require_method, the one check: scoring, attribution in memory or streamed, inspection."""
    import torch

    from das_sd.inspect import InspectSettings, inspect_generations

    monkeypatch.delitem(attributor.featurizers, "dtrak")  # as if the store had been featurized without it
    assert "dtrak" not in attributor.methods and "das" in attributor.methods
    side = attributor.resolution // attributor.pipe.vae_scale_factor
    latents = torch.zeros(1, attributor.pipe.unet.config.in_channels, side, side)
    lacks = ("method 'dtrak' needs feature set 'dtrak', which this store lacks "
             "(it supports das, das-signed, das-noleverage, trak, tracin, latent-sim)")
    with pytest.raises(ValueError, match=re.escape(lacks)):
        attributor.scores(latents, ["x"], "dtrak")
    with pytest.raises(ValueError, match=re.escape(lacks)):
        attributor.attribute_latents(latents, "x", "dtrak")
    monkeypatch.setattr(attributor, "max_in_memory_bytes", 0)  # the streamed path
    with pytest.raises(ValueError, match=re.escape(lacks)):
        attributor.attribute_latents(latents, "x", "dtrak")
    with pytest.raises(ValueError, match=re.escape(lacks)):
        inspect_generations(attributor, iter([]), 0, InspectSettings(method="dtrak"))


def test_weights_that_load_differently_from_the_store_are_refused(demo, monkeypatch):
    """Right files, wrong weights in memory (e.g. another library release reading them differently):
    the store's weight probes catch it."""
    import torch

    import das_sd.attribute as attribute_module

    original = attribute_module.load_pipeline

    def misread(*args, **kwargs):
        pipe = original(*args, **kwargs)
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight.mul_(1.1)
        return pipe

    monkeypatch.setattr(attribute_module, "load_pipeline", misread)
    with pytest.raises(attribute_module.StoreError, match="base model is not the one"):
        Attributor(demo["store"], device="cpu")
