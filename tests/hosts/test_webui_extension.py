"""The A1111 / Forge / SD.Next extension inside a stand-in of the webui's script host.

The stand-in (tests/hosts/webui_stub) replicates the host contract; a test checks its names and
parameters against the fact table recorded from a real Forge checkout (webui_facts.json).
Expectations come from das_sd's own API on the same images and prompts.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from das_sd.attribute import Attributor
from das_sd.shares import share_text
from das_sd.generation import GenerationSettings, generate

HERE = Path(__file__).parent
STUB = HERE / "webui_stub"
EXTENSION = HERE.parent.parent / "extensions" / "sd-webui-das-sd"
FACTS = json.loads((HERE / "webui_facts.json").read_text())


def signature_names(fn) -> list[str]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        out.append({p.VAR_POSITIONAL: "*" + p.name, p.VAR_KEYWORD: "**" + p.name,
                    p.KEYWORD_ONLY: p.name + "="}.get(p.kind, p.name))
    return out


@pytest.fixture()
def webui(monkeypatch):
    """Fresh stand-in modules and a freshly imported extension script (as the webui loads it)."""
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(STUB))
    from modules import script_callbacks, scripts, shared

    scripts.errors.clear()
    spec = importlib.util.spec_from_file_location("das_attribution_under_test", EXTENSION / "scripts" / "das_attribution.py")
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    for callback in script_callbacks.callbacks_ui_settings:
        callback()
    return extension, scripts, shared, script_callbacks


def test_stand_in_matches_the_recorded_host_contract(webui):
    _, scripts, shared, script_callbacks = webui
    from modules import extra_networks, options

    recorded = FACTS["modules/scripts.py"]
    for method, params in recorded["Script"].items():
        assert signature_names(getattr(scripts.Script, method)) == params, method
    assert signature_names(scripts.PostprocessImageArgs.__init__) == recorded["PostprocessImageArgs"]["__init__"]
    for fn, params in FACTS["modules/script_callbacks.py"].items():
        assert signature_names(getattr(script_callbacks, fn)) == params, fn
    assert signature_names(options.OptionInfo.__init__) == FACTS["modules/options.py"]["OptionInfo"]["__init__"]
    assert signature_names(options.Options.add_option) == FACTS["modules/options.py"]["Options"]["add_option"]
    assert extra_networks.re_extra_net.pattern == FACTS["modules/extra_networks.py"]["re_extra_net"]
    assert signature_names(extra_networks.parse_prompt) == FACTS["modules/extra_networks.py"]["parse_prompt"]


def run_webui(extension, scripts, prompt: str, store: str, pipe, batch_size: int = 2, top_k: int = 5):
    from modules import processing

    script = extension.DASAttributionScript()
    ui = build_ui(script)
    values = [True, top_k, "das", store]
    assert len(ui) == len(values)
    runner = scripts.ScriptRunner([script], [values])
    p = processing.StableDiffusionProcessing(prompt, seed=40, batch_size=batch_size)
    p.scripts, p.script_args = runner, runner.script_args
    clean = prompt.split(">", 1)[-1].strip(" ,") if "<" in prompt else prompt

    def sample(prompts, seeds):
        return [generate(pipe, GenerationSettings(prompt=clean, seed=s)).images[0] for s in seeds]

    def grid(images):
        return Image.new("RGB", (64, 32))

    return processing.process_images(p, sample, grid), p, clean


def build_ui(script):
    import gradio as gr

    with gr.Blocks():
        return script.ui(False)


@pytest.mark.parametrize("host", ["forge", "a1111"])
def test_each_image_is_attributed_into_its_infotext_and_the_tab(webui, demo, tmp_path, monkeypatch, host):
    extension, scripts, shared, script_callbacks = webui
    monkeypatch.setattr(scripts, "HOST", host)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    shutil.copy(demo["lora"], lora_dir / "demo_style.safetensors")
    shared.cmd_opts.lora_dir = str(lora_dir)
    reference = Attributor(demo["store"], device="cpu")
    prompt = "<lora:demo_style:1>, glimber, a red square on a blue background"
    processed, p, clean = run_webui(extension, scripts, prompt, demo["store"], reference.pipe)

    assert scripts.errors == []  # nothing was caught and logged by the host
    assert processed.index_of_first_image == 1 and len(processed.images) == 3
    run = extension.last_run()
    assert [r["index"] for r in run["images"]] == [0, 1] and run["errors"] == []  # the grid is skipped
    for i in range(2):
        image = processed.images[processed.index_of_first_image + i]
        expected = reference.attribute_image(image, prompt=clean, top_k=5)
        assert [r["key"] for r in run["images"][i]["results"]] == [r.key for r in expected.results]
        infotext = processed.infotexts[processed.index_of_first_image + i]
        best = expected.results[0]
        assert f"DAS top-3: {Path(best.path).name} ({share_text(best.share, best.score, best.sign)});" in infotext
        assert 0 < best.share <= 1 and "%" in infotext.split("DAS top-3: ")[1].split(",")[0]
        assert f"Seed: {40 + i}" in infotext and "DAS error" not in infotext
        assert run["images"][i]["warning"] is None  # the prompt's LoRA is the store's LoRA
    # the tab shows the captioned training images of a chosen image
    gallery, note = extension.gallery_of(2)
    assert len(gallery) == 5 and gallery[0][1].startswith("#1 · ") and "%" in gallery[0][1] and "seed 41" in note
    assert isinstance(gallery[0][0], Image.Image)


def test_rest_route_and_settings(webui, demo, monkeypatch):
    extension, scripts, shared, script_callbacks = webui
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    assert shared.opts.das_top_k == 8 and shared.opts.das_method == "das"
    app = FastAPI()
    for callback in script_callbacks.callbacks_app_started:
        callback(None, app)
    reference = Attributor(demo["store"], device="cpu")
    run_webui(extension, scripts, "zorblat, a green square on a orange background", demo["store"], reference.pipe,
              batch_size=1)
    body = TestClient(app).get("/das/v1/last").json()
    assert body == extension.last_run() and len(body["images"]) == 1
    # no LoRA named in the prompt: attributed anyway, with a warning that says so
    assert "names no LoRA" in body["images"][0]["warning"]


def test_a_failure_is_reported_and_never_breaks_generation(webui, demo, tmp_path):
    extension, scripts, shared, _ = webui
    reference = Attributor(demo["store"], device="cpu")
    processed, p, _ = run_webui(extension, scripts, "a red circle on a blue background", str(tmp_path / "missing"),
                                reference.pipe)
    assert len(processed.images) == 3 and scripts.errors == []
    assert all("DAS error: StoreError" in t for t in processed.infotexts[1:])
    assert len(extension.last_run()["errors"]) == 2 and "no feature store" in extension.last_run()["errors"][0]
    assert any("attribution failed" in c for c in p.comments)


def test_tab_builds_with_the_installed_gradio(webui):
    extension, _, _, script_callbacks = webui
    tabs = [t for callback in script_callbacks.callbacks_ui_tabs for t in callback()]
    assert [(title, elem) for _, title, elem in tabs] == [("DAS attribution", "das_attribution_tab")]
    assert extension.gallery_of(1)[0] == []
