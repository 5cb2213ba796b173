"""The ComfyUI nodes, loaded and executed by a stand-in of ComfyUI's custom-node loader and executor.

Expectations come from das_sd's own API on the same images; the graph is a recorded API-format
workflow (LoadCheckpoint -> LoraLoader -> KSampler -> VAEDecode -> DAS nodes -> PreviewImage).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from das_sd.attribute import Attributor
from das_sd.generation import GenerationSettings, generate

HERE = Path(__file__).parent
NODES = HERE.parent.parent / "extensions" / "comfyui-das-sd"
GRAPH = json.loads((HERE / "comfy_graph.json").read_text())
PROMPT = GRAPH["6"]["inputs"]["text"]


@pytest.fixture()
def comfy(monkeypatch, tmp_path, demo):
    monkeypatch.syspath_prepend(str(HERE / "comfy_stub"))
    for name in ("comfy_host", "folder_paths", "comfyui-das-sd", "comfyui-das-sd.nodes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import comfy_host
    import folder_paths

    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(demo["lora"], loras / "demo_style.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", [str(loras)])
    assert comfy_host.load_custom_node(str(NODES))
    return comfy_host


def comfy_images(pipe, seeds) -> torch.Tensor:
    """What VAEDecode hands on: IMAGE = (B, H, W, 3) float32 in [0, 1]."""
    images = [generate(pipe, GenerationSettings(prompt=PROMPT, seed=s)).images[0] for s in seeds]
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


def test_stand_in_matches_the_recorded_host_contract(comfy):
    """The stand-in against facts recorded from a real ComfyUI checkout (comfy_facts.json)."""
    import inspect

    import folder_paths

    facts = json.loads((HERE / "comfy_facts.json").read_text())
    for name, recorded in facts["folder_paths.py"].items():
        assert list(inspect.signature(getattr(folder_paths, name)).parameters) == recorded, name
    # the real loader is async with keyword extras; the stand-in keeps its first, positional parameter
    assert list(inspect.signature(comfy.load_custom_node).parameters)[0] == facts["nodes.py"]["load_custom_node"][0]
    executed = facts["execution.py"]
    assert executed["runs_under_inference_mode"] and executed["splits_ui_and_result"]
    assert "with torch.inference_mode():" in inspect.getsource(comfy.execute)
    used = {kind for cls in comfy.NODE_CLASS_MAPPINGS.values() for kind in cls.INPUT_TYPES().get("hidden", {}).values()}
    assert used <= set(executed["hidden_kinds"])


def test_nodes_register_with_prefixed_ids(comfy):
    assert set(comfy.NODE_CLASS_MAPPINGS) == {"DASLoadStore", "DASAttribute"}
    for cls in comfy.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "das-sd" and callable(getattr(cls, cls.FUNCTION))
    assert comfy.NODE_DISPLAY_NAME_MAPPINGS["DASAttribute"] == "DAS Attribute"


def test_attribute_node_returns_top_k_images_and_scores(comfy, demo):
    graph = json.loads(json.dumps(GRAPH).replace("STORE", demo["store"]))
    _, (store,) = comfy.execute("DASLoadStore", graph["11"]["inputs"], graph)
    images = comfy_images(store.pipe, (7, 8))
    inputs = {k: v for k, v in graph["12"]["inputs"].items() if k not in ("das_store", "images")}
    ui, (batch, text) = comfy.execute("DASAttribute", {**inputs, "das_store": store, "images": images}, graph, "12")

    report = json.loads(text)
    assert ui == {"text": (text,)} and report["warning"] is None  # the graph's LoRA is the store's
    assert batch.shape == (2 * 4, 32, 32, 3) and batch.dtype == torch.float32
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    reference = Attributor(demo["store"], device="cpu")
    for i in range(2):
        pil = generate(reference.pipe, GenerationSettings(prompt=PROMPT, seed=7 + i)).images[0]
        expected = reference.attribute_image(pil, prompt=PROMPT, top_k=4)
        got = report["attributions"][i]["results"]
        assert [r["key"] for r in got] == [r.key for r in expected.results]
        # each image with its share of the influence (das_sd.shares), computed the same way in-process
        np.testing.assert_allclose([r["share"] for r in got], [r.share for r in expected.results], rtol=1e-5)
        # the IMAGE batch holds those training images, in order
        first = np.asarray(Image.open(expected.results[0].path).convert("RGB"), dtype=np.float32) / 255.0
        np.testing.assert_allclose(batch[4 * i].numpy(), first, atol=1e-6)


def test_lora_from_graph_is_checked_against_the_store(comfy, demo, tmp_path):
    from das_sd.integrations.hosts import CACHE

    from_graph = sys.modules["comfyui-das-sd.nodes"].loras_in_graph(GRAPH)
    assert from_graph == ["demo_style.safetensors"]
    CACHE.clear()  # loaded by the node under inference_mode below, as in ComfyUI
    graph = json.loads(json.dumps(GRAPH).replace("STORE", demo["store"]))
    _, (store,) = comfy.execute("DASLoadStore", graph["11"]["inputs"], graph)
    with torch.inference_mode():  # IMAGE tensors made by upstream nodes are inference tensors
        images = comfy_images(store.pipe, (3,))
    other = json.loads(json.dumps(GRAPH).replace("demo_style.safetensors", "someone_else.safetensors"))
    _, (_, text) = comfy.execute("DASAttribute", {"das_store": store, "images": images, "prompt": PROMPT,
                                                  "method": "dtrak", "top_k": 2}, other)
    report = json.loads(text)
    assert "not found" in report["warning"] and report["attributions"][0]["method"] == "dtrak"
    with pytest.raises(ValueError, match="prompt"):
        comfy.execute("DASAttribute", {"das_store": store, "images": images, "prompt": " ", "method": "das",
                                       "top_k": 2}, GRAPH)
