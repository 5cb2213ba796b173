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
from das_sd.registry import DEFAULT_METHOD
from das_sd.shares import share_text
from das_sd.generation import GenerationSettings, generate
from helpers import webui_png

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


def webui_lora_folder(shared, tmp_path: Path, loras: dict[str, Path]) -> Path:
    """The webui's LoRA folder (--lora-dir) holding ``loras`` (name -> file) as <name>.safetensors."""
    folder = tmp_path / "Lora"
    folder.mkdir()
    for name, file in loras.items():
        shutil.copy(file, folder / f"{name}.safetensors")
    shared.cmd_opts.lora_dir = str(folder)
    return folder


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
    webui_lora_folder(shared, tmp_path, {"demo_style": demo["lora"]})
    reference = Attributor(demo["store"], device="cpu")
    prompt = "<lora:demo_style:1>, glimber, a red square on a blue background"
    processed, p, clean = run_webui(extension, scripts, prompt, demo["store"], reference.pipe)

    assert scripts.errors == []  # nothing was caught and logged by the host
    assert processed.index_of_first_image == 1 and len(processed.images) == 3
    run = extension.last_run()
    assert [r["index"] for r in run["images"]] == [0, 1] and run["errors"] == []  # the grid is skipped
    for i in range(2):
        image = processed.images[processed.index_of_first_image + i]
        expected = reference.attribute_image(image, prompt=clean, method="das", top_k=5)  # run_webui's choice
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

    assert shared.opts.das_top_k == 8 and shared.opts.das_method == DEFAULT_METHOD
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


def test_the_tab_attributes_an_image_made_earlier_from_its_png_parameters(webui, demo, tmp_path):
    """An image generated earlier, dropped into the tab: its prompt (LoRA tag included) comes from
    the webui's infotext in the PNG; the training images are das_sd's own for that image and prompt."""
    extension, scripts, shared, _ = webui
    webui_lora_folder(shared, tmp_path, {"demo_style": demo["lora"]})
    reference = Attributor(demo["store"], device="cpu")
    clean = "glimber, a red square on a blue background"
    made = generate(reference.pipe, GenerationSettings(prompt=clean, seed=7)).images[0]
    parameters = f"<lora:demo_style:0.8>, {clean}\nNegative prompt: blurry\nSteps: 20, Seed: 7, Size: 32x32"
    dropped = Image.open(webui_png(made, tmp_path / "00007-7.png", parameters))  # as the tab's upload hands it over

    gallery, note = extension.attribute_upload(dropped, "", 4, "das", demo["store"])
    expected = reference.attribute_image(made, prompt=clean, method="das", top_k=4)
    assert [label for _, label in gallery] == [r.label() for r in expected.results]
    for (shown, _), row in zip(gallery, expected.results):
        assert list(shown.convert("RGB").getdata()) == list(Image.open(row.path).convert("RGB").getdata())
    assert "method das" in note and clean in note and "—" not in note  # the tag names the store's LoRA
    assert extension.last_run()["images"] == []  # the last generation's record is left as it was

    # a typed prompt wins over the image's own; the store falls back to Settings > DAS attribution
    shared.opts.das_store = demo["store"]
    other = "zorblat, a green square on a orange background"
    gallery, note = extension.attribute_upload(dropped, other, 4, "das", "")
    expected = reference.attribute_image(made, prompt=other, method="das", top_k=4)
    assert [label for _, label in gallery] == [r.label() for r in expected.results]
    assert "names no LoRA" in note


def test_the_tab_says_what_is_missing_for_a_dropped_image(webui, demo, tmp_path):
    extension, _, _, _ = webui
    reference = Attributor(demo["store"], device="cpu")
    made = generate(reference.pipe, GenerationSettings(prompt="zorblat, a red circle", seed=3)).images[0]
    assert extension.attribute_upload(None, "", 4, "das", demo["store"]) == \
        ([], "Drop an image (a PNG saved by the webui or das-sd) to attribute it.")
    bare = tmp_path / "bare.png"
    made.save(bare)  # no parameters: the prompt must be typed
    gallery, note = extension.attribute_upload(Image.open(bare), "", 4, "das", demo["store"])
    assert gallery == [] and "type the prompt" in note
    gallery, note = extension.attribute_upload(made.resize((48, 48)), "zorblat", 4, "das", demo["store"])
    assert gallery == [] and note.startswith("Attribution failed: QueryError") and "48" in note
    gallery, note = extension.attribute_upload(made, "zorblat", 4, "das", str(tmp_path / "missing"))
    assert gallery == [] and "StoreError" in note and "missing" in note
    assert extension.last_run() == {"images": [], "errors": []}  # a generation's record is not touched


# ---- SDXL checkpoints ----------------------------------------------------------------------------

SDXL_PROMPT = "zorblat, a red circle on a blue background"


@pytest.mark.parametrize("host", ["forge", "a1111"])
def test_sdxl_images_are_attributed_with_the_webuis_size_conditioning(webui, sdxl_demo, tmp_path, monkeypatch, host):
    """An SDXL checkpoint with <lora:> tags: the webui conditions on original = target = the image's
    size and the crop of Settings > SDXL (sdxl_crop_left / sdxl_crop_top); the extension's ranking is
    the Attributor's with the conditioning diffusers computes for those sizes."""
    from types import SimpleNamespace

    from sdxl_store import diffusers_conditioning

    extension, scripts, shared, _ = webui
    monkeypatch.setattr(scripts, "HOST", host)
    monkeypatch.setattr(shared, "sd_model", SimpleNamespace(is_sdxl=True), raising=False)
    shared.opts.sdxl_crop_left, shared.opts.sdxl_crop_top = 2, 1
    webui_lora_folder(shared, tmp_path, {"sdxl_style": sdxl_demo["lora_file"]})
    reference = Attributor(sdxl_demo["store"], device="cpu")
    processed, p, clean = run_webui(extension, scripts, f"<lora:sdxl_style:1>, {SDXL_PROMPT}", str(sdxl_demo["store"]),
                                    reference.pipe)

    run = extension.last_run()
    assert scripts.errors == [] and run["errors"] == [] and [r["index"] for r in run["images"]] == [0, 1]
    cond = diffusers_conditioning(reference.pipe, clean, (16, 16), (1, 2), (16, 16))
    for i in range(2):
        image = processed.images[processed.index_of_first_image + i]
        expected = reference.attribute_latents(reference.encode_image(image), [clean], "das", 5, cond=cond)[0]
        got = run["images"][i]["results"]
        assert [r["key"] for r in got] == [r.key for r in expected.results]
        assert [r["score"] for r in got] == [r.score for r in expected.results]
        assert run["images"][i]["warning"] is None
        assert "DAS error" not in processed.infotexts[processed.index_of_first_image + i]


def test_an_sdxl_store_is_refused_for_an_sd_checkpoint_or_lora(webui, sdxl_demo, base_path, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from das_sd.models.loading import load_pipeline
    from helpers import random_lora

    extension, scripts, shared, _ = webui
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    save_file(random_lora(load_pipeline(base_path, device="cpu"), rank=2), lora_dir / "sd_style.safetensors")
    shared.cmd_opts.lora_dir = str(lora_dir)
    store = str(sdxl_demo["store"])
    reference = Attributor(store, device="cpu")
    shared.opts.sd_model_checkpoint = "v1-5.safetensors"
    monkeypatch.setattr(shared, "sd_model", SimpleNamespace(is_sdxl=False), raising=False)
    processed, _, _ = run_webui(extension, scripts, SDXL_PROMPT, store, reference.pipe, batch_size=1)
    error = extension.last_run()["errors"][0]
    assert f"FamilyMismatch: the das-sd store {store} was built for an SDXL model" in error
    assert "the webui's checkpoint 'v1-5.safetensors' is SD 1.x / 2.x" in error
    assert "DAS error: FamilyMismatch" in processed.infotexts[-1] and scripts.errors == []

    monkeypatch.setattr(shared, "sd_model", SimpleNamespace(is_sdxl=True), raising=False)
    run_webui(extension, scripts, f"<lora:sd_style:1>, {SDXL_PROMPT}", store, reference.pipe, batch_size=1)
    assert "the generation's LoRA 'sd_style' (sd_style.safetensors) is SD 1.x / 2.x" in extension.last_run()["errors"][0]
