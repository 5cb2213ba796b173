"""DAS attribution for AUTOMATIC1111 / Forge / SD.Next: which LoRA training images made each image?

An always-visible script: when enabled, every generated image (never the grid) is attributed with
das-sd right after it is made. Results go to the image's infotext ("DAS top-k"), to the "DAS
attribution" tab (captioned gallery of the training images) and to the REST route /das/v1/last. The
tab also attributes an image made earlier (dropped in, its prompt read from its PNG parameters).
The webui's own model object differs per host, so it is never touched: das-sd loads the base and
LoRA that the store's manifest names. A failure here never breaks generation; it is reported in the
console, in the infotext ("DAS error") and in the tab.

Only gradio APIs present in 3.41 (A1111), 3.43 (SD.Next) and 4.40 (Forge) are used, and das_sd's
torch-using modules are imported only when attribution runs (das_sd.registry, imported at start-up,
is torch-free).
"""

from __future__ import annotations

import json
import threading
import traceback
from pathlib import Path

import gradio as gr
from modules import script_callbacks, scripts, shared

from das_sd.registry import DEFAULT_METHOD, METHOD_NAMES

METHODS = list(METHOD_NAMES)
TITLE = "DAS attribution"

_last = {"images": [], "errors": []}  # the last run, shown in the tab and served by the REST route
_last_lock = threading.Lock()


def _opt(name: str, default):
    value = getattr(shared.opts, name, None) if hasattr(shared, "opts") else None
    return default if value in (None, "") else value


def _default_store() -> str:
    return _opt("das_store", None) or getattr(getattr(shared, "cmd_opts", None), "das_store", None) or ""


def _lora_files() -> dict:
    """The host's LoRA names -> files, via its built-in LoRA extension when loaded, else the LoRA folder."""
    files = {}
    try:
        import networks  # the built-in LoRA extension's module (A1111 / Forge)

        for name, net in getattr(networks, "available_networks", {}).items():
            files[name] = Path(net.filename)
            if getattr(net, "alias", None):
                files.setdefault(net.alias, Path(net.filename))
    except Exception:  # not loaded on this host: scan the LoRA folder instead
        folder = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
        if folder and Path(folder).is_dir():
            files = {p.stem: p for p in Path(folder).rglob("*.safetensors")}
    return files


def _checkpoint_family():
    """The loaded checkpoint's family: "sdxl" / "sd" from the model's ``is_sdxl`` flag (A1111, Forge) or
    SD.Next's ``sd_model_type``; None when the host does not say."""
    if getattr(shared, "sd_model_type", None) == "sdxl":
        return "sdxl"
    flag = getattr(getattr(shared, "sd_model", None), "is_sdxl", None)
    return None if flag is None else ("sdxl" if flag else "sd")


def _size_conditioning(image):
    """SDXL's size conditioning as the webui sets it: original = target = the size of the pass that
    made the image (p.width / p.height, or the hires size), crop from Settings > SDXL."""
    from das_sd.conditioning import SizeConditioning

    crop = (int(float(_opt("sdxl_crop_left", 0))), int(float(_opt("sdxl_crop_top", 0))))
    return SizeConditioning(image.size, crop, image.size)


def _report(message: str) -> None:
    print(f"[das-sd] {message}", flush=True)
    with _last_lock:
        _last["errors"].append(message)


def _top_k_slider(elem_id: str | None = None):
    return gr.Slider(minimum=1, maximum=32, step=1, value=int(_opt("das_top_k", 8)), label="Top-k", elem_id=elem_id)


def _method_dropdown(elem_id: str | None = None):
    return gr.Dropdown(choices=METHODS, value=_opt("das_method", DEFAULT_METHOD), label="Method", elem_id=elem_id)


def _store_box(elem_id: str | None = None):
    return gr.Textbox(value=_default_store(), label="das-sd feature store folder", elem_id=elem_id)


def _attribute(image, prompt: str, method: str, top_k, store: str, info: dict, size, checkpoint: str | None):
    """One image's attribution record, its Attribution and the store id, as the tab and REST route
    show it (``warning``: the prompt's LoRAs are not the store's). ``checkpoint`` names the webui's
    loaded checkpoint when the image was made with it: its family must be the store's."""
    from das_sd.integrations.families import require_family, require_lora_families
    from das_sd.integrations.hosts import CACHE, attribute_pil, lora_mismatch, parse_prompt_loras

    if not store:
        raise ValueError("no feature store set (script field, Settings > DAS attribution, or --das-store)")
    attributor = CACHE.get(store, _opt("das_device", None) or getattr(shared.cmd_opts, "das_device", None))
    _, loras = parse_prompt_loras(prompt)
    files = _lora_files()
    if checkpoint is not None:
        require_family(attributor, _checkpoint_family(), checkpoint)
    require_lora_families(attributor, {lora.name: files[lora.name] for lora in loras if lora.name in files})
    warning = lora_mismatch(attributor, [lora.name for lora in loras], files)
    result = attribute_pil(attributor, image, prompt, method, int(top_k), info, size)
    return result.to_json() | info | {"warning": warning}, result, attributor.store.store_id


class DASAttributionScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion(TITLE, open=False, elem_id=self.elem_id("accordion")):
            enabled = gr.Checkbox(value=False, label="Attribute each image to the LoRA's training images",
                                  elem_id=self.elem_id("enabled"))
            with gr.Row():
                top_k, method = _top_k_slider(self.elem_id("top_k")), _method_dropdown(self.elem_id("method"))
            store = _store_box(self.elem_id("store"))
        return [enabled, top_k, method, store]

    def process(self, p, enabled, top_k, method, store):
        if enabled:
            self._done = 0
            with _last_lock:
                _last["images"], _last["errors"] = [], []

    def postprocess_image(self, p, pp, enabled, top_k, method, store):
        """Per image, before it is saved: attribute it and put the top-k into its infotext."""
        if not enabled:
            return
        index = getattr(pp, "index", None)  # Forge passes it; A1111 / SD.Next: count images
        if index is None:
            index = getattr(self, "_done", 0)
        self._done = index + 1
        p.extra_generation_params.pop("DAS error", None)
        try:
            from das_sd.integrations.hosts import infotext_value

            prompt = p.all_prompts[index] if index < len(getattr(p, "all_prompts", [])) else p.prompt
            seed = p.all_seeds[index] if index < len(getattr(p, "all_seeds", [])) else getattr(p, "seed", None)
            checkpoint = f"the webui's checkpoint {_opt('sd_model_checkpoint', '')!r}".replace(" ''", "")
            record, result, store_id = _attribute(pp.image, prompt, method, top_k, store, {"index": index, "seed": seed},
                                                  _size_conditioning(pp.image), checkpoint)
            p.extra_generation_params[f"DAS top-{min(3, int(top_k))}"] = infotext_value(result)
            p.extra_generation_params["DAS method"] = method
            p.extra_generation_params["DAS store"] = store_id
            with _last_lock:
                _last["images"].append(record)
            if record["warning"]:
                _report(f"image {index}: {record['warning']}")
        except Exception as exc:  # never break generation; say what went wrong
            _report(f"image {index}: attribution failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            p.extra_generation_params["DAS error"] = f"{type(exc).__name__}: {exc}"[:200]

    def postprocess(self, p, processed, enabled, top_k, method, store):
        if enabled and _last["errors"]:
            p.comment("DAS attribution: " + " | ".join(_last["errors"][-3:]))


def last_run() -> dict:
    with _last_lock:
        return json.loads(json.dumps(_last))


def _open(path: str):
    from das_sd.data.images import load_image  # size-checked before decoding

    return load_image(path)


def _gallery(record: dict, title: str) -> tuple[list, str]:
    """A record's captioned training images and the line above them."""
    from das_sd.attribute import AttributionRow

    # PIL images, not paths: Gradio 4 refuses to serve files outside the webui's folders
    items = [(_open(r["path"]), AttributionRow(**r).label()) for r in record["results"]]
    note = f"{title}, method {record['method']}"
    for warning in [record.get("warning"), *record.get("notes", [])]:
        if warning:
            note += f" — {warning}"
    return items, note


def gallery_of(image_number: int) -> tuple[list, str]:
    run = last_run()
    if not run["images"]:
        return [], "No attributed images yet: enable DAS attribution in txt2img / img2img and generate."
    record = run["images"][max(0, min(int(image_number), len(run["images"])) - 1)]
    items, note = _gallery(record, f"Image {record['index'] + 1} (seed {record['seed']})")
    if run["errors"]:
        note += "\n\nErrors: " + "; ".join(run["errors"])
    return items, note


def attribute_upload(image, prompt: str, top_k, method: str, store: str) -> tuple[list, str]:
    """The tab's "Attribute an image": an image made earlier, with the prompt typed or, when left
    empty, read from the image's PNG parameters (A1111 infotext or das-sd's own)."""
    if image is None:
        return [], "Drop an image (a PNG saved by the webui or das-sd) to attribute it."
    try:
        from das_sd.png_metadata import image_metadata

        meta = image_metadata(image)
        prompt = (prompt or "").strip() or meta.get("prompt") or ""
        if not prompt:
            return [], ("The image records no prompt (no PNG parameters): type the prompt it was generated "
                        "with.")
        seed = meta.get("seed")
        record, _, _ = _attribute(image, prompt, method, top_k, store or _default_store(),
                                  {"index": 0, "seed": seed}, None, None)
        return _gallery(record, f"Dropped image (prompt `{prompt}`)")  # code: <lora:...> is no HTML tag
    except Exception as exc:  # shown in the tab and the console; the last generation's record is left alone
        print(f"[das-sd] dropped image: attribution failed: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
        return [], f"Attribution failed: {type(exc).__name__}: {exc}"


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            image_number = gr.Number(value=1, precision=0, label="Generated image number")
            refresh = gr.Button("Show", variant="primary")
        with gr.Accordion("Attribute an image made earlier", open=False):
            with gr.Row():
                upload = gr.Image(type="pil", label="Image (its prompt is read from its PNG parameters)",
                                  elem_id="das_attribution_upload")
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt (empty: from the image)", lines=2)
                    top_k, method, store = _top_k_slider(), _method_dropdown(), _store_box()
                    attribute = gr.Button("Attribute", variant="primary", elem_id="das_attribution_attribute")
        status = gr.Markdown(elem_id="das_attribution_status")
        gallery = gr.Gallery(label="Most influential training images", columns=4, elem_id="das_attribution_gallery")
        refresh.click(gallery_of, inputs=[image_number], outputs=[gallery, status])
        attribute.click(attribute_upload, inputs=[upload, prompt, top_k, method, store], outputs=[gallery, status])
    return [(tab, TITLE, "das_attribution_tab")]


def on_ui_settings():
    section = ("das_sd", TITLE)
    shared.opts.add_option("das_store", shared.OptionInfo("", "das-sd feature store folder", section=section))
    shared.opts.add_option("das_top_k", shared.OptionInfo(8, "Top-k training images", gr.Slider,
                                                          {"minimum": 1, "maximum": 32, "step": 1}, section=section))
    shared.opts.add_option("das_method", shared.OptionInfo(DEFAULT_METHOD, "Attribution method", gr.Dropdown,
                                                           {"choices": METHODS}, section=section))
    shared.opts.add_option("das_device", shared.OptionInfo("", "Device (empty: cuda if available)", section=section))


def on_app_started(demo, app):
    @app.get("/das/v1/last")
    def das_last():
        return last_run()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
