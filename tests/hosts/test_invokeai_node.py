"""The InvokeAI node in a real InvokeAI server (invokeai==6.14.2 in its own venv, HOSTS.md section 3.6).

The server loads the node pack from its nodes/ folder; the test uploads a generated image with
InvokeAI-style metadata, runs the node through the session queue and checks its outputs against
das_sd's own API on the same image and prompt, in this process.
Needs DAS_SD_INVOKEAI_PYTHON (the python of a venv with invokeai and das-sd; .ci/run makes one);
skipped without it, failed without it when DAS_SD_REQUIRE_INVOKEAI=1.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from das_sd.attribute import Attributor
from das_sd.generation import GenerationSettings, generate
from das_sd.integrations.hosts import attribute_pil

httpx = pytest.importorskip("httpx")

from invokeai_server import (  # noqa: E402
    NODES, PROMPT, SEED, TOP_K, install_model, invokeai_server, run_node, upload, upload_generation,
)


def invokeai_python() -> Path:
    value = os.environ.get("DAS_SD_INVOKEAI_PYTHON")
    if not value:
        if os.environ.get("DAS_SD_REQUIRE_INVOKEAI") == "1":
            pytest.fail("DAS_SD_REQUIRE_INVOKEAI=1 but DAS_SD_INVOKEAI_PYTHON is not set")
        pytest.skip("set DAS_SD_INVOKEAI_PYTHON to a venv python with invokeai==6.14.2 and das-sd")
    return Path(value)


@pytest.fixture(scope="module")
def invokeai(tmp_path_factory):
    python = invokeai_python()
    root = tmp_path_factory.mktemp("invokeai-root")
    with invokeai_server(python, root) as (client, _):
        yield client, root


@pytest.fixture(scope="module")
def query(demo):
    attributor = Attributor(demo["store"], device="cpu")
    image = generate(attributor.pipe, GenerationSettings(prompt=PROMPT, seed=SEED)).images[0]
    return attributor, image


def test_node_pack_loads_and_shows_in_the_schema(invokeai):
    client, root = invokeai
    assert f"Loaded 1 node pack from {root / 'nodes'}: {NODES.name}" in (root / "server.log").read_text(errors="replace")
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    node = schemas["DASAttributionInvocation"]["properties"]
    assert {"image", "store_path", "prompt", "method", "top_k", "device", "board"} <= set(node)
    assert set(schemas["DASAttributionOutput"]["properties"]) >= {"collection", "scores_json"}


def test_node_attributes_an_uploaded_generation(invokeai, query, demo, tmp_path):
    client, _ = invokeai
    attributor, image = query
    name = upload_generation(client, image, demo["lora"], tmp_path)

    item = run_node(client, name, demo["store"])
    assert item["status"] == "completed", item.get("error_traceback") or item
    (output,) = item["session"]["results"].values()
    payload = json.loads(output["scores_json"])

    expected = attribute_pil(attributor, image, PROMPT, "das", TOP_K)
    got = payload["attributions"][0]["results"]
    assert [r["key"] for r in got] == [r.key for r in expected.results]
    np.testing.assert_allclose([r["score"] for r in got], [r.score for r in expected.results], rtol=1e-3)
    np.testing.assert_allclose([r["share"] for r in got], [r.share for r in expected.results], rtol=1e-3)
    assert payload["store_id"] == attributor.store.store_id
    assert payload["warning"] is None  # the metadata's LoRA is the store's LoRA (same file contents)

    # the top-k training images are in the gallery, pixel for pixel, with their rank in the metadata
    assert len(output["collection"]) == TOP_K
    for rank, (field, row) in enumerate(zip(output["collection"], expected.results), start=1):
        full = client.get(f"/api/v1/images/i/{field['image_name']}/full")
        full.raise_for_status()
        saved = np.asarray(Image.open(io.BytesIO(full.content)).convert("RGB"))
        with Image.open(row.path) as original:
            assert np.array_equal(saved, np.asarray(original.convert("RGB")))
        meta = client.get(f"/api/v1/images/i/{field['image_name']}/metadata").json()
        assert meta["das_sd"]["rank"] == rank and meta["das_sd"]["key"] == row.key
        assert meta["das_sd"]["query_image"] == name


def test_node_warns_when_the_generation_used_another_lora(invokeai, query, demo):
    client, _ = invokeai
    _, image = query
    other = {"key": "not-installed", "hash": "blake3:0", "name": "someone_else", "base": "sd-1", "type": "lora"}
    name = upload(client, image, {"positive_prompt": PROMPT, "loras": [{"model": other, "weight": 0.7}]})
    item = run_node(client, name, demo["store"], top_k=2)
    assert item["status"] == "completed", item
    (output,) = item["session"]["results"].values()
    assert "'someone_else'" in json.loads(output["scores_json"])["warning"]


def test_node_without_a_prompt_fails_with_a_clear_error(invokeai, query, demo):
    client, _ = invokeai
    _, image = query
    name = upload(client, image, None)
    item = run_node(client, name, demo["store"])
    assert item["status"] == "failed"
    assert "positive_prompt" in item["error_message"] + (item.get("error_traceback") or "")

    typed = run_node(client, name, demo["store"], prompt=PROMPT, top_k=1)  # typing the prompt fixes it
    assert typed["status"] == "completed", typed


# ---- SDXL: a model and LoRA InvokeAI itself recognises as SDXL, installed through its model manager ----

@pytest.fixture(scope="module")
def sdxl_installed(invokeai, tmp_path_factory):
    """An SDXL-layout pipeline folder with SDXL's text-encoder widths (768 + 1280: the UNet's
    cross-attention width 2048 is what InvokeAI's probe reads to call a model SDXL), its LoRA exported
    to kohya's SDXL naming (the single file sd-scripts writes) and a store built from that file; the
    folder and the file installed through InvokeAI's model manager API."""
    from sdxl_store import build_sdxl_store

    client, _ = invokeai
    demo = build_sdxl_store(tmp_path_factory.mktemp("sdxl-invokeai"), text_widths=(768, 1280), kohya=True)
    return demo | {"main": install_model(client, demo["base"]), "lora_model": install_model(client, demo["lora_file"])}


def test_invokeai_installs_the_sdxl_model_and_lora_as_sdxl(sdxl_installed):
    assert (sdxl_installed["main"]["type"], sdxl_installed["main"]["base"]) == ("main", "sdxl")
    assert (sdxl_installed["lora_model"]["type"], sdxl_installed["lora_model"]["base"]) == ("lora", "sdxl")


def test_node_attributes_an_sdxl_generation_of_installed_models(invokeai, sdxl_installed):
    """An SDXL image whose metadata names the installed SDXL main model and LoRA: the LoRA resolves,
    through InvokeAI's model records, to the store's file (no warning); the scores are das-sd's own,
    with the size conditioning InvokeAI's SDXL graphs use (original = target = the image's size)."""
    client, _ = invokeai
    store = str(sdxl_installed["store"])
    reference = Attributor(store, device="cpu")
    image = generate(reference.pipe, GenerationSettings(prompt=PROMPT, seed=12)).images[0]
    metadata = {"positive_prompt": PROMPT, "model": sdxl_installed["main"],
                "loras": [{"model": sdxl_installed["lora_model"], "weight": 1.0}]}
    item = run_node(client, upload(client, image, metadata), store)
    assert item["status"] == "completed", item.get("error_traceback") or item
    (output,) = item["session"]["results"].values()
    payload = json.loads(output["scores_json"])
    assert payload["warning"] is None
    got = payload["attributions"][0]["results"]
    expected = attribute_pil(reference, image, PROMPT, "das", TOP_K)
    assert [r["key"] for r in got] == [r.key for r in expected.results]
    np.testing.assert_allclose([r["score"] for r in got], [r.score for r in expected.results], rtol=1e-3)


def test_stores_refuse_installed_models_of_another_family(invokeai, sdxl_installed, query, demo):
    """Metadata of an SD 1.x main model is refused by the SDXL store; the SD store refuses the
    installed SDXL main model and, alone, the installed SDXL LoRA; each message names the store."""
    client, _ = invokeai
    store = str(sdxl_installed["store"])
    _, sd_image = query
    sd_model = {**sdxl_installed["main"], "name": "tiny-sd", "base": "sd-1"}
    refused = run_node(client, upload(client, sd_image, {"positive_prompt": PROMPT, "model": sd_model}), store)
    message = refused["error_message"] + (refused.get("error_traceback") or "")
    assert refused["status"] == "failed" and f"store {store} was built for an SDXL model" in message
    assert "main model 'tiny-sd' is SD 1.x / 2.x" in message

    for metadata in ({"positive_prompt": PROMPT, "model": sdxl_installed["main"]},
                     {"positive_prompt": PROMPT, "loras": [{"model": sdxl_installed["lora_model"], "weight": 1.0}]}):
        refused = run_node(client, upload(client, sd_image, metadata), demo["store"])
        message = refused["error_message"] + (refused.get("error_traceback") or "")
        assert refused["status"] == "failed" and "is SDXL" in message and demo["store"] in message
