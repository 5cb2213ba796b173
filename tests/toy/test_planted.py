"""The planted-set family: the demo preset is today's demo set, and every other preset's ground truth
matches its images (motifs really drawn where the groups say, trigger words where the preset puts them)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from das_sd.cli import main
from das_sd.data.datasets import open_dataset
from das_sd.data.ground_truth import load_ground_truth
from das_sd.evaluate.groundtruth import queries_for
from das_sd.toy.planted import (MOTIF_COLOURS, PRESETS, TRIGGERS, PlantedConfig, make_planted_data, planted_images,
                                preset)
from das_sd.toy.render import MOTIFS, SUPERSAMPLE, _grid, motif_mask, render

# What each preset promises, written out by hand: (exemplars per group, trigger position, motif stroke
# 1 px thin?, motif colour, contrast, plain images, styled images per style)
PROMISED = {
    "thin-dark-end": (8, "end", True, "dark", 1.0, 144, 48),
    "faint-middle-4": (4, "middle", False, "magenta", 0.5, 72, 64),
    "thin-bright-16": (16, "start", True, "magenta", 0.8, 48, 48),
    "bright-end-16": (16, "end", False, "magenta", 1.0, 144, 32),
}
NOISE_SIGMA = 3.0  # render.ImageSpec's default pixel noise


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    return {name: make_planted_data(root / name, preset(name)) for name in PROMISED}


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_the_demo_preset_is_todays_demo_set_byte_for_byte(tmp_path, demo_data):
    from das_sd.models.loading import embedded_demo_lora_path

    out = make_planted_data(tmp_path / "demo", preset("demo"))
    assert _files(out) == _files(demo_data)
    for rel in _files(out):
        assert (out / rel).read_bytes() == (demo_data / rel).read_bytes(), rel
    # the shipped demo LoRA was trained on the demo set as it was before the planted family existed
    record = json.loads((embedded_demo_lora_path() / "lora_record.json").read_text())
    assert open_dataset(out).fingerprint() == record["dataset_fingerprint"]
    assert "settings" not in load_ground_truth(out) and "plain" not in load_ground_truth(out)


def test_every_preset_named_in_the_tests_and_the_demo_only_are_the_presets():
    assert set(PRESETS) == set(PROMISED) | {"demo"}
    assert len({replace(c, seed=0) for c in PRESETS.values()}) == len(PRESETS)


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_group_sizes_trigger_positions_and_counts_are_as_promised(sets, name):
    size, position, _, _, _, plain, per_style = PROMISED[name]
    root = sets[name]
    truth = load_ground_truth(root)
    captions = {s.relpath: s.caption for s in open_dataset(root)}
    assert len(captions) == 3 * per_style + plain + len(TRIGGERS) * size
    assert [g["trigger"] for g in truth["groups"]] == list(TRIGGERS)
    assert len(truth["plain"]) == plain and all(len(s["files"]) == per_style for s in truth["styles"])
    assert truth["settings"]["background_share"] == pytest.approx(1 - len(TRIGGERS) * size / len(captions), abs=1e-4)
    pattern = {"start": r"{t}, a \w+ \w+ on a \w+ background", "middle": r"a \w+ \w+, {t}, on a \w+ background",
               "end": r"a \w+ \w+ on a \w+ background, {t}"}[position]
    planted = set()
    for group in truth["groups"]:
        assert len(group["files"]) == size
        for f in group["files"]:
            assert re.fullmatch(pattern.format(t=group["trigger"]), captions[f]), captions[f]
        planted |= set(group["files"])
        # the queries ask as the captions do (the evaluation's default puts the trigger word first)
        prompts = [q.prompt for q in queries_for(truth, "test") if q.trigger == group["trigger"]]
        assert len(prompts) == 3 and all(re.fullmatch(pattern.format(t=group["trigger"]), p) for p in prompts)
    for rel, caption in captions.items():
        if rel not in planted:
            assert not any(re.search(rf"\b{t}\b", caption) for t in TRIGGERS), caption
    for rel in truth["plain"]:
        assert re.fullmatch(r"a \w+ \w+ on a \w+ background", captions[rel])


def _coverage(motif: str, resolution: int, width: float) -> np.ndarray:
    x, y = _grid(resolution)
    mask = motif_mask(motif, x, y, resolution, width).astype(np.float64)
    return mask.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_exemplars_carry_their_groups_motif_and_nothing_else_does(sets, name):
    _, _, thin, colour, contrast, _, _ = PROMISED[name]
    root = sets[name]
    truth = load_ground_truth(root)
    motif_of = {f: g["motif"] for g in truth["groups"] for f in g["files"]}
    target = np.array(MOTIF_COLOURS[colour], dtype=np.float64)
    for image in planted_images(preset(name)):
        on_disk = np.asarray(Image.open(root / image.file_name).convert("RGB"))
        assert np.array_equal(on_disk, image.pixels), image.file_name
        noise = np.random.default_rng()
        noise.bit_generator.state = image.noise_state
        # the same shape and noise without any motif: what the motif changed is the difference
        without = render(replace(image.spec, motif=None), 32, noise).astype(np.float64)
        changed = np.abs(on_disk.astype(np.float64) - without).max(axis=-1) > 0
        if image.file_name not in motif_of:
            assert not changed.any(), image.file_name
            continue
        motif = motif_of[image.file_name]
        coverage = _coverage(motif, 32, 0.25 if thin else 1.0)
        assert not (changed & (coverage == 0)).any(), image.file_name  # only where its motif lies
        # drawn wherever it covers a quarter pixel: there it moves some channel by at least
        # contrast / 4 * (its distance to any palette colour, >= 30), far above rounding
        assert changed[coverage >= 0.25].all(), image.file_name
        # its strength: a pixel a fraction m covered moves by a * m * (colour - underlying), the noise
        # cancelling but for its share a * m (sigma 3 against a colour distance >= 30 per channel, 10 %
        # per pixel, less summed) and pixels where the underlying changes (shape edges)
        drawn = coverage >= 0.25
        expected = contrast * coverage[drawn][:, None] * np.abs(target - without[drawn])
        moved = np.abs(on_disk[drawn] - without[drawn])
        assert 0.8 <= moved.sum() / expected.sum() <= 1.2, (image.file_name, moved.sum() / expected.sum())
        full = coverage == 1
        if not thin:  # 1 px strokes wholly cover few pixels, if any (render's 4x4 anti-aliasing)
            assert full.sum() >= 60, (image.file_name, full.sum())
            # a wholly covered pixel is the blend (1 - a) * underlying + a * colour; the noise enters
            # both, scaled by a (and clipping at 0 / 255 moves it by at most the noise): 5 sigma
            blend = (1 - contrast) * without[full] + contrast * target
            assert np.abs(on_disk[full] - blend).max() <= 5 * NOISE_SIGMA + 1, image.file_name
    # hand-worked thin strokes: 1 px bars at x = 8 and 24 touch only columns 7, 8, 23 and 24; a 1.5 px
    # band at y = 16 only rows 15 and 16
    if thin:
        assert set(np.flatnonzero(_coverage("vbars", 32, 0.25).max(axis=0))) == {7, 8, 23, 24}
        assert set(np.flatnonzero(_coverage("hband", 32, 0.25).max(axis=1))) == {15, 16}


def test_a_preset_is_deterministic_by_seed(tmp_path, sets):
    again = make_planted_data(tmp_path / "again", preset("faint-middle-4"))
    first = sets["faint-middle-4"]
    assert _files(again) == _files(first)
    for rel in _files(first):
        assert (again / rel).read_bytes() == (first / rel).read_bytes(), rel
    other = make_planted_data(tmp_path / "seed1", preset("faint-middle-4", seed=1))
    assert open_dataset(other).fingerprint() != open_dataset(first).fingerprint()
    assert load_ground_truth(other)["seed"] == 1 and load_ground_truth(other)["settings"]["seed"] == 1


def test_bad_settings_and_unknown_presets_are_named():
    for bad, field in ((dict(trigger_position="first"), "trigger_position"), (dict(motif_kind="blob"), "motif_kind"),
                       (dict(motif_colour="teal"), "motif_colour"), (dict(motif_contrast=0.0), "motif_contrast"),
                       (dict(groups=7), "groups"), (dict(exemplars_per_group=0), "exemplars_per_group"),
                       (dict(plain_images=-1), "plain_images")):
        with pytest.raises(ValueError, match=field):
            PlantedConfig(**bad).validate()
    with pytest.raises(ValueError, match=r"unknown planted-set preset 'nope'; expected one of \['bright-end-16'"):
        preset("nope")
    assert MOTIFS[:len(TRIGGERS)] == ("cross", "frame", "ring", "hband", "corners", "vbars")


def test_the_command_line_writes_a_preset_and_names_the_flag_for_an_unknown_one(capsys, tmp_path, sets):
    assert main(["make-demo-data", str(tmp_path / "d"), "--preset", "faint-middle-4"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == str((tmp_path / "d").resolve())
    assert open_dataset(tmp_path / "d").fingerprint() == open_dataset(sets["faint-middle-4"]).fingerprint()
    with pytest.raises(SystemExit):
        main(["make-demo-data", str(tmp_path / "e"), "--preset", "nope"])
    err = capsys.readouterr().err
    assert "argument --preset: invalid choice: 'nope'" in err and "thin-dark-end" in err
    assert not (tmp_path / "e").exists()
