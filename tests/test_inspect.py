"""Dataset-level inspection (das_sd/inspect/) against planted truth and brute force."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from das_sd.attribute import Attributor
from das_sd.cli import main
from das_sd.toy.demo_data import TRIGGERS
from das_sd.inspect import (InspectSettings, credit_shares, generate_queries, group_credits, image_credits,
                            inspect_generations, signed_shares)
from tolerances import U32, score_slack

SUBJECTS = ("a red circle on a blue background", "a white triangle on a green background")


@pytest.fixture(scope="module")
def attributor(demo):
    return Attributor(demo["store"], device="cpu")


@pytest.fixture(scope="module")
def trigger_inspection(attributor, tmp_path_factory):
    """Every trigger word with two subjects, one seed each, grouped by the demo's concept column."""
    prompts = [f"{t}, {s}" for t in TRIGGERS for s in SUBJECTS]
    out = tmp_path_factory.mktemp("inspect")
    queries = generate_queries(attributor, prompts, 1, out / "generations", InspectSettings())
    inspection = inspect_generations(attributor, queries, len(prompts), InspectSettings(batch_size=5),
                                     group_by="column:concept")
    return inspection, out


def test_rollup_matches_brute_force():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(7, 11))
    scores = t ** 2
    shares = credit_shares(scores)
    for q in range(7):
        np.testing.assert_allclose(shares[q], scores[q] / scores[q].sum())
        np.testing.assert_allclose(signed_shares(t)[q], t[q] / np.abs(t[q]).sum())
    credits = image_credits(shares, signed_shares(t), top_k=3, per_image=2)
    for i, c in enumerate(credits):
        assert c.total_share == pytest.approx(shares[:, i].sum())
        in_top = sum(i in np.argsort(-shares[q])[:3] for q in range(7))
        assert c.top_k_count == in_top
        assert c.top_generations[0][0] == int(np.argmax(shares[:, i]))
    assert sum(c.top_k_count for c in credits) == 7 * 3
    groups = ["a", "b", "a", "c", "b", "a", "c", "c", "a", "b", "a"]
    rolled = {g.name: g for g in group_credits(shares, groups, bootstrap=500)}
    for name in "abc":
        members = [i for i, g in enumerate(groups) if g == name]
        per_generation = shares[:, members].sum(axis=1)
        assert rolled[name].mean_share == pytest.approx(per_generation.mean())
        assert rolled[name].ci_low <= rolled[name].mean_share <= rolled[name].ci_high
        assert rolled[name].size == len(members)
    assert sum(g.mean_share for g in rolled.values()) == pytest.approx(1.0)


def test_negative_scores_get_no_credit_but_keep_their_sign():
    t = np.array([[1.0, -3.0, 0.5]])
    np.testing.assert_allclose(credit_shares(t), [[1 / 1.5, 0, 0.5 / 1.5]])
    np.testing.assert_allclose(signed_shares(t), [[1 / 4.5, -3 / 4.5, 0.5 / 4.5]])
    # a top-k with the total of all N images: the same shares as the full row (hand-computed)
    np.testing.assert_allclose(credit_shares([[1.0, 0.5]], total=[1.5]), [[1 / 1.5, 0.5 / 1.5]])
    np.testing.assert_allclose(credit_shares([[-3.0]], total=[1.5]), [[0.0]])
    np.testing.assert_allclose(credit_shares([[-1.0, -2.0]]), [[0.0, 0.0]])  # no positive credit: no share


def test_shares_read_as_percentages_with_the_digits_they_need():
    from das_sd.shares import share_text

    assert [share_text(x, 1.0, 1) for x in (0.234, 0.01, 0.0021, 0.00004, 0.0, 1.0)] == \
        ["23.4%", "1.0%", "0.21%", "<0.01%", "0.0%", "100.0%"]
    assert share_text(None, 6.663e-06, -1) == "score 6.66e-06 (−)"  # a record without shares


def test_trigger_generations_credit_their_own_group(trigger_inspection):
    """Planted truth: generations with trigger X give group X (its 8 exemplars, 3 % of the set) more
    credit than any other group, the 72-image style groups included."""
    inspection, _ = trigger_inspection
    names = sorted(set(inspection.groups))
    member = np.array([[g == n for n in names] for g in inspection.groups], dtype=float)
    wins, lifts = 0, []
    for trigger in TRIGGERS:
        rows = [q for q, g in enumerate(inspection.generations) if g.prompt.startswith(trigger + ",")]
        per_group = (inspection.shares[rows] @ member).mean(axis=0)
        wins += names[int(np.argmax(per_group))] == trigger
        lifts.append(per_group[names.index(trigger)] / (member[:, names.index(trigger)].sum() / len(inspection.groups)))
    print("own group first for", wins, "of", len(TRIGGERS), "triggers; share / size share:", np.round(lifts, 1))
    assert wins >= len(TRIGGERS) - 1
    assert min(lifts) > 2.0


def test_batched_inspection_equals_one_by_one_attribution(demo, tmp_path):
    """Batches of query features scored as one matrix product give the scores of attributing each
    generation on its own (same final latents, same prompt). In float64 up to the scoring (a float32
    f = l1 feature may flip a sign between batch shapes: tests/tolerances.py), so the two differ only
    by the float32 scoring product, whose rounding float32_dot_bound bounds."""
    from das_sd.models.loading import load_lora, load_pipeline
    from das_sd.score import train_vectors

    pipe = load_pipeline(demo["base"], device="cpu", dtype=torch.float64)
    load_lora(pipe, demo["lora"])
    attributor = Attributor(demo["store"], pipe=pipe, check_fingerprints=False)
    prompts = [f"{t}, {SUBJECTS[0]}" for t in TRIGGERS[:3]]
    queries = list(generate_queries(attributor, prompts, 1, tmp_path, InspectSettings()))
    inspection = inspect_generations(attributor, iter(queries), len(queries), InspectSettings(batch_size=2))
    method = InspectSettings().method  # the method inspect_generations scored with
    psi = train_vectors(attributor.store, method)
    for q, (generation, latents) in enumerate(queries):
        one = attributor.attribute_latents(latents, [generation.prompt], method, top_k=len(inspection.keys))[0]
        by_key = {r.key: r.score for r in one.results}
        phi = attributor.query_features(latents, [generation.prompt], feature_sets=["das"])["das"]
        # casting the float64 features to float32 may round an entry either way: one more u32
        slack = score_slack(method, phi, psi, relative=U32).item()
        got, expected = np.asarray(inspection.scores[q]), np.asarray([by_key[k] for k in inspection.keys])
        assert np.all(np.abs(got - expected) <= 2 * slack), np.abs(got - expected).max() / slack


def test_planted_duplicates_are_flagged(demo, tmp_path):
    """A dataset with exact copies (other file names, same captions) of three images: exactly the
    copies and their originals are flagged as near-duplicates, each pointing at its twin."""
    from das_sd.data.datasets import open_dataset
    from das_sd.featurize.build import featurize_dataset
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.inspect import image_signals
    from das_sd.models.loading import load_lora, load_pipeline
    from das_sd.score import LambdaRule, build_index

    source = open_dataset(demo["data"])
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    picked = source.samples[::6][:40]
    rows = []
    for s in picked:
        shutil.copy(s.path, data / s.relpath)
        rows.append({"file_name": s.relpath, "text": s.caption})
    twins = {}
    for s in picked[:3]:
        copy = f"images/copy_of_{s.path.name}"
        shutil.copy(s.path, data / copy)
        rows.append({"file_name": copy, "text": s.caption})
        twins[copy] = s.relpath
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = load_pipeline(demo["base"], device="cpu")
    load_lora(pipe, demo["lora"])
    store = featurize_dataset(pipe, open_dataset(data), tmp_path / "store", Path(demo["base"]), Path(demo["lora"]),
                              {"das": FeaturizerSettings()}, progress=False)
    build_index(store, "das", LambdaRule())
    attributor = Attributor(store.root, pipe=pipe)
    signals = image_signals(attributor.store)
    paths = [r.path for r in attributor.store.rows()]
    flagged = {paths[i] for i in range(len(paths)) if signals.is_duplicate(i)}
    print("twin similarity", [round(float(signals.nn_similarity[paths.index(c)]), 4) for c in twins],
          "highest other", round(float(max(signals.nn_similarity[i] for i in range(len(paths)) if paths[i] not in twins and paths[i] not in twins.values())), 4))
    assert flagged == set(twins) | set(twins.values())
    for copy, original in twins.items():
        assert paths[int(signals.nn_index[paths.index(copy)])] == original


def test_cli_writes_reports_from_a_folder_of_generations(demo, trigger_inspection, tmp_path, capsys):
    _, out = trigger_inspection
    mapping = tmp_path / "groups.csv"
    from das_sd.data.datasets import open_dataset

    samples = open_dataset(demo["data"]).samples
    mapping.write_text("file,group\n" + "".join(f"{s.path.name},{'exemplar' if s.metadata.get('concept') in TRIGGERS else 'style'}\n"
                                             for s in samples))
    report = tmp_path / "report"
    code = main(["inspect", "--store", demo["store"], "--images", str(out / "generations"), "--out", str(report),
                 "--group-by", f"file:{mapping}", "--device", "cpu", "--bootstrap", "200"])
    assert code == 0
    data = json.loads((report / "inspection.json").read_text())
    assert data["num_generations"] == len(TRIGGERS) * len(SUBJECTS) and data["num_training_images"] == len(samples)
    assert {g["name"] for g in data["groups"]} == {"exemplar", "style"}
    exemplar = next(g for g in data["groups"] if g["name"] == "exemplar")
    assert exemplar["mean_share"] > exemplar["size_share"]  # trigger prompts credit the exemplars
    with (report / "images.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(samples) and float(rows[0]["total_share"]) >= float(rows[-1]["total_share"])
    html = (report / "report.html").read_text()
    # self-contained: nothing to fetch (the SVG namespace URI is an identifier, not a request)
    assert "<script" not in html and "<link" not in html and 'src="http' not in html and "url(" not in html
    assert html.count("data:image/png;base64,") >= 32


def test_report_is_rebuilt_from_inspection_json_alone(trigger_inspection, tmp_path):
    """report.html is a function of inspection.json: the report module needs nothing else (and so
    imports nothing of inspection.py); the group sections appear exactly when groups were asked for."""
    from dataclasses import replace

    from das_sd.inspect.report import html_report

    inspection, _ = trigger_inspection
    for grouped in (True, False):
        shown = inspection if grouped else replace(inspection, group_by=None, groups=None, group_credits=[])
        files = shown.save(tmp_path / f"report-{grouped}")
        html = files["html"].read_text()
        assert html_report(json.loads(files["json"].read_text())) == html
        assert ("Credit by group" in html) == grouped and ("<th>group</th>" in html) == grouped
        assert f"in no generation's top-{inspection.settings.top_k}." in html


def test_bad_inspect_inputs_get_clear_errors(demo, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", "--store", demo["store"], "--images", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no generated images" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n")
    assert main(["inspect", "--store", demo["store"], "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
    prompts.write_text("a red circle\n")
    assert main(["inspect", "--store", demo["store"], "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--group-by", "column:contributor"]) == 2
    assert "no metadata column 'contributor'" in capsys.readouterr().err
    assert main(["inspect", "--store", demo["store"], "--prompts", str(prompts), "--images", str(empty),
                 "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of --prompts" in capsys.readouterr().err


def test_html_report_renders_in_chromium(trigger_inspection, tmp_path):
    from helpers import chromium_page

    inspection, _ = trigger_inspection
    files = inspection.save(tmp_path / "report")
    with chromium_page() as page:
        page.goto(files["html"].as_uri())
        assert page.locator("h1").inner_text().startswith("das-sd inspection: 264 training images")
        assert page.locator("svg rect.bar").count() == len(set(inspection.groups))
        assert page.locator("tr.image-row img").count() >= 32
        widths = page.locator("tr.image-row img").evaluate_all("els => els.map(e => e.naturalWidth)")
        assert min(widths) > 0  # every inlined thumbnail decodes
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _within(seconds: float, fn):
    """fn() run in a thread: a read that blocks (a FIFO) fails the test instead of hanging it."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the read blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_mappings_named_by_untrusted_callers_stay_inside_the_dataset(tmp_path):
    """The app's file:PATH: relative paths inside the dataset folder only, regular files only, capped;
    refusals say the same whether or not a path exists outside and never quote a file."""
    import os

    from das_sd.inspect import read_group_mapping, read_mapping_inside

    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "groups.csv").write_text("file,group\na.png,alice\nb.png,bob\n")
    (root / "groups.json").write_text(json.dumps({"a.png": "alice"}))
    (tmp_path / "secret.csv").write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.mkfifo(root / "pipe.csv")
    (root / "zero.csv").symlink_to("/dev/zero")
    (root / "escape.csv").symlink_to(tmp_path / "secret.csv")
    (root / "big.csv").write_text("a.png,x\n" * 200_000)
    assert read_mapping_inside(root, "sub/groups.csv") == {"a.png": "alice", "b.png": "bob"}
    assert read_mapping_inside(root, "groups.json") == {"a.png": "alice"}

    refusals = {}
    for path in ("/etc/passwd", "/nonexistent/x.csv", "../secret.csv", "sub/../../secret.csv", "escape.csv",
                 "zero.csv", "/dev/zero", "~/x.csv", "", "."):
        with pytest.raises(ValueError) as err:
            _within(5, lambda: read_mapping_inside(root, path))
        refusals[path] = str(err.value)
        assert "root:x" not in refusals[path] and "No such file" not in refusals[path], refusals[path]
        assert "must be a file inside the dataset folder" in refusals[path], refusals[path]
    # no existence oracle: an existing and a missing absolute path get the same answer
    assert refusals["/etc/passwd"].replace("/etc/passwd", "P") == refusals["/nonexistent/x.csv"].replace(
        "/nonexistent/x.csv", "P")
    with pytest.raises(ValueError, match="not a regular file"):
        _within(5, lambda: read_mapping_inside(root, "pipe.csv"))
    with pytest.raises(ValueError, match="not a regular file"):
        _within(5, lambda: read_mapping_inside(root, "sub"))
    with pytest.raises(ValueError, match="larger than 1024 KB"):
        read_mapping_inside(root, "big.csv")
    # the CLI reads the user's own files, but a FIFO or device still cannot hang it
    with pytest.raises(ValueError, match="not a regular file"):
        _within(5, lambda: read_group_mapping(Path("/dev/zero")))
    with pytest.raises(ValueError, match="not a regular file"):
        _within(5, lambda: read_group_mapping(root / "pipe.csv"))
    assert len(read_group_mapping(root / "big.csv")) == 1


def test_bad_mappings_are_described_not_quoted(tmp_path):
    from das_sd.inspect import read_group_mapping

    (tmp_path / "m.json").write_text('{"a.png": "secret value')
    with pytest.raises(ValueError) as err:
        read_group_mapping(tmp_path / "m.json", name="the uploaded mapping")
    assert str(err.value).startswith("the uploaded mapping: not valid JSON (Unterminated string starting at column")
    assert "secret" not in str(err.value) and "at at" not in str(err.value)
    (tmp_path / "m.csv").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ValueError) as err:
        read_group_mapping(tmp_path / "m.csv")
    assert "line 1: expected two columns" in str(err.value) and "root:x" not in str(err.value)
    (tmp_path / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_group_mapping(tmp_path / "bin.csv")


def test_a_mapping_that_matches_no_training_image_is_refused(tmp_path):
    """A mapping that gives no training image a group is almost surely the wrong file (here the
    dataset's metadata.jsonl, read as CSV): refused with its name, not every image in "(none)"."""
    from types import SimpleNamespace

    from das_sd.inspect.groups import mapping_coverage, read_group_mapping, training_groups

    rows = [SimpleNamespace(key=f"key{i}", path=f"images/{i}.png", caption="a caption") for i in range(3)]
    attributor = SimpleNamespace(rows=rows)
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("".join(json.dumps({"file_name": f"images/{i}.png", "text": "a caption"}) + "\n" for i in range(3)))
    mapping = read_group_mapping(meta)  # two CSV columns a line: '{"file_name": "images/0.png"', ' "text": ...'
    assert len(mapping) == 3
    refusal = r"group by file:{}: the mapping gives no training image of the store a group: none of its 3 entries"
    with pytest.raises(ValueError, match=refusal.format("metadata.jsonl")):
        training_groups(attributor, "file:metadata.jsonl", mapping)  # as the app passes an upload
    with pytest.raises(ValueError, match=refusal.format(re.escape(str(meta)))):
        training_groups(attributor, f"file:{meta}")  # as the CLI reads a path
    with pytest.raises(ValueError, match="none of its 0 entries"):
        training_groups(attributor, "file:empty.json", {})
    with pytest.raises(ValueError, match="none of its 1 entries"):
        training_groups(attributor, "file:m.csv", {"key0": ""})  # no group name is no group

    partial = {"key0": "alice", "images/1.png": "bob", "elsewhere.png": "carol"}
    assert training_groups(attributor, "file:m.csv", partial) == ["alice", "bob", "(none)"]
    assert mapping_coverage(rows, partial, "file:m.csv") == (
        'file:m.csv: 2 of its 3 entries name a training image; 2 of the 3 training images have a group, '
        '1 in "(none)"')
    assert mapping_coverage(rows, {"0.png": "a", "1.png": "b", "2.png": "c"}, "file:m.csv") == (
        "file:m.csv: 3 of its 3 entries name a training image; 3 of the 3 training images have a group")
