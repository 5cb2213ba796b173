"""Attribution on the demo: planted ground truth, the CLI's JSON, and clear errors for bad queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from das_sd.attribute import Attributor, QueryError
from das_sd.cli import main
from das_sd.data.datasets import open_dataset
from das_sd.data.demo import load_ground_truth
from das_sd.evaluate.metrics import average_precision, recall_at_k
from das_sd.generate import GenerationSettings, generate, save_png
from das_sd.score import METHODS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from das_sd.demo import prepare_demo

    return prepare_demo(progress=False)  # default workdir under this session's DAS_SD_HOME


@pytest.fixture(scope="module")
def attributor(demo):
    return Attributor(demo["store"], device="cpu")


@pytest.fixture(scope="module")
def ground_truth_summary(demo, attributor):
    """Recall@10 and AP of each group's exemplars, per method, over 3 generations per trigger word."""
    import torch

    truth = load_ground_truth(demo["data"])
    key_of = {s.relpath: s.key for s in open_dataset(demo["data"])}
    subjects = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "white", "green")]
    table = {m: {"recall@10": [], "ap": []} for m in attributor.methods}
    for group in truth["groups"]:
        relevant = {key_of[f] for f in group["files"]}
        prompts = [f"{group['trigger']}, a {fg} {shape} on a {bg} background" for shape, fg, bg in subjects]
        latents = torch.cat([generate(attributor.pipe, GenerationSettings(prompt=p, seed=100 + i)).latents
                             for i, p in enumerate(prompts)])
        for name in attributor.methods:
            score, _ = attributor.scores(latents, prompts, name)
            for q in range(len(prompts)):
                ranked = [attributor.rows[i].key for i in torch.argsort(score[q], descending=True).tolist()]
                table[name]["recall@10"].append(recall_at_k(ranked, relevant, 10))
                table[name]["ap"].append(average_precision(ranked, relevant))
    summary = {m: {k: round(float(np.mean(v)), 3) for k, v in d.items()} for m, d in table.items()}
    print("planted ground truth (6 groups x 3 generations):", json.dumps(summary))
    return summary, len(relevant) / len(attributor.rows)


def test_planted_exemplars_rank_far_above_chance(ground_truth_summary):
    summary, chance = ground_truth_summary
    assert set(summary) == set(METHODS)
    assert summary["das"]["ap"] > 5 * chance  # chance AP is about the exemplars' share of the set
    assert summary["das"]["recall@10"] > summary["latent-sim"]["recall@10"]


@pytest.mark.xfail(strict=True, reason="open: DAS reaches Recall@10 of about 0.66 on the demo (ceiling 0.83 with 12 exemplars), not yet 0.8")
def test_planted_exemplars_reach_the_recall_target(ground_truth_summary):
    summary, _ = ground_truth_summary
    assert summary["das"]["recall@10"] >= 0.8


def test_attribute_json_schema_and_same_keys_as_api(demo, attributor, tmp_path, capsys):
    result = generate(attributor.pipe, GenerationSettings(prompt="zorblat, a green square on a orange background", seed=3))
    path = save_png(result.images[0], tmp_path / "gen.png", result.metadata(0))
    code = main(["attribute", "--store", demo["store"], "--image", str(path), "--top-k", "5", "--json",
                 "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["method"] == "das" and out["query"]["prompt"] == result.settings.prompt
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert set(out["results"][0]) == {"rank", "key", "path", "caption", "score", "sign"}
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)
    api = attributor.attribute_image(path, method="das", top_k=5)
    assert [r.key for r in api.results] == [r["key"] for r in out["results"]]


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
