"""The evaluation jobs check their inputs before loading a model, and fall back to the store's dataset."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from das_sd.evaluate.jobs import QuerySources, StoreTarget, ablations_report, dataset_of


def test_an_lds_run_needs_val_images_or_prompts():
    with pytest.raises(ValueError, match=r"--val DIR .* --prompts FILE"):
        QuerySources().build(attributor=None)


def test_an_lds_ablation_without_its_queries_is_refused_before_the_store_opens(tmp_path):
    target = StoreTarget(tmp_path / "no-store")  # opening it would raise a StoreError instead
    with pytest.raises(ValueError, match="query sources and settings"):
        ablations_report(target, tmp_path / "w", lds_workdir=tmp_path / "lds")


def test_the_dataset_defaults_to_the_one_the_store_was_featurized_from():
    attributor = SimpleNamespace(store=SimpleNamespace(manifest={"info": {"dataset_root": "/data/set"}}))
    assert dataset_of(attributor, None) == "/data/set"
    assert dataset_of(attributor, "/other") == "/other"
    assert dataset_of(SimpleNamespace(store=SimpleNamespace(manifest={})), None) is None
