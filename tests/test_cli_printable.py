"""Captions, paths and group names from a dataset are printed escaped in plain-text output: a
caption holding terminal escapes (clear screen, set the window title) cannot drive the terminal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import das_sd.attribute
import das_sd.generation
import das_sd.inspect.jobs
import das_sd.store
from das_sd.attribute import Attribution, AttributionRow
from das_sd.cli import main
from das_sd.io import printable

EVIL = "cat\x1b[2J\x1b]0;PWNED\x07 \x9b31m"
SHOWN = "cat\\x1b[2J\\x1b]0;PWNED\\x07 \\x9b31m"


def test_printable_escapes_c0_c1_and_del_and_keeps_the_rest():
    assert printable(EVIL) == SHOWN
    assert printable("a\nb\tc\x7f\u2028") == "a\\nb\\tc\\x7f\\u2028"
    assert printable("été, 日本, C:\\dir\\x") == "été, 日本, C:\\dir\\x"


@pytest.fixture()
def fake_attributor(monkeypatch, tmp_path):
    store = SimpleNamespace(root=tmp_path, identity={"feature_sets": {"das": {}}, "base_fingerprint": "b",
                                                     "lora_fingerprint": "l", "resolution": 8})
    monkeypatch.setattr(das_sd.store.FeatureStore, "open", classmethod(lambda cls, root, *a, **k: store))
    monkeypatch.setattr(das_sd.generation, "warn_truncated_prompts", lambda *a, **k: None)

    class FakeAttributor:
        def __init__(self, *_args, **_kwargs):
            self.pipe = SimpleNamespace(tokenizer=None)
            self.store = store

        def attribute_image(self, image, prompt, method, top_k):
            rows = [AttributionRow(1, "k", f"/data/{EVIL}.png", EVIL, 2.0, 1)]
            return Attribution(method, {"prompt": prompt}, rows)

    monkeypatch.setattr(das_sd.attribute, "Attributor", FakeAttributor)


def test_attribute_prints_captions_and_paths_escaped(fake_attributor, capsys):
    code = main(["attribute", "--store", "S", "--image", f"q{EVIL}.png", "--prompt", "p"])
    out, err = capsys.readouterr()
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert f"  {SHOWN}  [/data/{SHOWN}.png]" in out and f"for q{SHOWN}.png" in out
    code = main(["attribute", "--store", "S", "--image", "q.png", "--prompt", "p", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and "\x1b" not in out and "\\u001b[2J" in out  # json.dumps escapes it already


def test_inspect_prints_captions_and_group_names_escaped(fake_attributor, monkeypatch, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    inspection = SimpleNamespace(
        generations=[1], keys=["k"], image_rows=lambda: [{"mean_share": 0.5, "top_k_count": 1, "caption": EVIL}],
        group_credits=[SimpleNamespace(name=EVIL, mean_share=0.5, ci_low=0.1, ci_high=0.9, size=1, size_share=0.1)],
        save=lambda out: {"report": f"{out}/{EVIL}.html"})
    monkeypatch.setattr(das_sd.inspect.jobs, "image_queries", lambda *a, **k: iter(()))
    monkeypatch.setattr(das_sd.inspect.jobs, "inspect_generations", lambda *a, **k: inspection)
    code = main(["inspect", "--store", "S", "--images", str(images), "--out", str(tmp_path / "out")])
    out, _ = capsys.readouterr()
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert f"  {SHOWN}\n" in out and f"group {SHOWN}: " in out and f"/{SHOWN}.html" in out
