"""The Gradio app: generate, and see beside each image the training images that shaped it.

Layout only: every handler is a thin call into ``Workbench``. Heavy events (generate, attribute,
inspect, build) share one queue slot (events.py's ``HEAVY``), so any number of browsers can use the
app while the model runs one job at a time; re-ranking from cached query features is cheap and
runs beside them. The Inspect tab is inspect_tab.py's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
from starlette.middleware import Middleware

from ..attribute_results import Attribution
from ..data.images import open_image
from ..generation import GenerationSettings
from ..integrations.hosts import captioned
from ..registry import DEFAULT_METHOD, METHOD_NAMES
from .events import HEAVY, guarded, warn
from .examples import example_prompts
from .guard import DatasetImagesOnly
from .inspect_tab import InspectTab
from .session import AppError, Query, Workbench
from .views import EFFECT_COLOURS, SHARE_EXPLAINED, api_json, detail_of, md_text, score_plot, status_markdown, upload_note

if TYPE_CHECKING:
    from typing import Any


MAX_IMAGES = 4  # generation slots shown side by side with their attributions
MAX_TOP_K = 32
MAX_UPLOAD = "10mb"

CSS = """
.das-thumbs img, .das-generated img, .das-detail img { image-rendering: pixelated; }
.das-generated img, .das-detail img { width: 100%; height: 100%; object-fit: contain; }
.das-hint { opacity: 0.75; }
"""
PLOT = dict(x="rank", y="share %", color="effect", sort=None, height=220, label="Share of the influence (%)",
            y_title="share of the influence (%)", tooltip=["rank", "share %", "score", "effect"],
            color_map=EFFECT_COLOURS)
GENERATE_HINT = ("*Pick an example prompt (or type one) and click **Generate**: beside each generation appear the "
                 "training images that most influenced it, each with its share of the influence; click one to see "
                 "it large below.*")


# ---- the app -------------------------------------------------------------------------------------

def build_app(bench: Workbench) -> gr.Blocks:
    """The app's Blocks: Generate, Attribute an image, Inspect and Index tabs, wired to ``bench``.

    Args:
        bench: The engine every handler calls.

    Returns:
        The unlaunched ``gr.Blocks``; its API endpoints are generate, attribute, rerank, inspect and
        build_store.
    """
    methods = list(METHOD_NAMES)

    def ensure_ready(progress: gr.Progress) -> None:
        """The demo builds its store on first use; other stores are built from the Index tab."""
        if bench.config.demo:
            progress(0, desc="checking the demo feature store (built on first launch)")
            bench.ensure_demo_store()

    def slot_updates(queries: list[Query], results: list[Attribution]) -> list:
        out = []
        for slot in range(MAX_IMAGES):
            if slot < len(queries):
                image = open_image(queries[slot].image_path)  # keeps the PNG text: downloads carry it
                out += [gr.update(value=image, visible=True), gr.update(value=captioned(results[slot]), visible=True),
                        gr.update(value=score_plot(results[slot]), visible=True)]
            else:
                out += [gr.update(value=None, visible=False), gr.update(value=[], visible=False),
                        gr.update(value=None, visible=False)]
        return out

    examples = example_prompts(bench.config.store, bench.dataset_root())

    def check_prompt(prompt_, *_):
        """Before any model runs: an empty prompt gets one message at the prompt box, no error badges."""
        return [gr.validate(bool(prompt_ and prompt_.strip()), "Type a prompt first, or click an example prompt."),
                *[gr.validate(True, "")] * 9]

    with gr.Blocks(title="das-sd: which training images made this?") as app:
        session = gr.State({})
        gr.Markdown("## das-sd — which training images made this?\n"
                    "Generate with the LoRA; beside each image are the LoRA training images that most "
                    "influenced it (Diffusion Attribution Score), each with its **share of the influence**: "
                    "of all the training images' positive influence on that image, the part that image had "
                    "(the shares of all training images sum to 100 %). Click a training image to see it large.")
        with gr.Row():
            method = gr.Dropdown(methods, value=DEFAULT_METHOD, label="Attribution method", scale=2)
            top_k = gr.Slider(1, MAX_TOP_K, value=8, step=1, label="Top-k training images", scale=3)

        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", value=examples[0] if examples else "",
                                        placeholder="Describe the image; the LoRA knows the words of its training "
                                                    "captions (see the examples)")
                    if examples:
                        gr.Examples([[e] for e in examples], inputs=[prompt], elem_id="examples",
                                    label="Example prompts: training captions of the LoRA (click one)")
                    negative = gr.Textbox(label="Negative prompt", lines=1)
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, scale=3)
                        dice = gr.Button("Random", scale=1, min_width=40, elem_id="random-seed")
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 15.0, value=4.0, step=0.5, label="Guidance (CFG scale)")
                    lora_scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA scale")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=3):
                    generate_hint = gr.Markdown(GENERATE_HINT, elem_id="generate-hint", elem_classes="das-hint")
                    slots = []
                    for i in range(MAX_IMAGES):
                        with gr.Row():  # a generation, its top-k training images, their shares
                            image = gr.Image(label=f"Generation {i + 1}", type="pil", format="png", interactive=False,
                                             height=256, scale=1, elem_classes="das-generated", visible=i == 0,
                                             placeholder="The generated image appears here")
                            gallery = gr.Gallery(label="Most influential training images · share of the influence",
                                                 columns=4, height=256, scale=2, elem_id=f"attribution-{i}",
                                                 elem_classes="das-thumbs", allow_preview=False, visible=i == 0)
                            plot = gr.BarPlot(**PLOT, scale=1, visible=i == 0, elem_id=f"shares-{i}")
                        slots.append((image, gallery, plot))

        with gr.Tab("Attribute an image"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    upload = gr.File(label=f"Image (PNG with das-sd / A1111 metadata, or any image; ≤ {MAX_UPLOAD})",
                                     file_types=["image"], type="filepath")
                    upload_prompt = gr.Textbox(label="Prompt (used when the image carries none)", lines=2)
                    attribute_button = gr.Button("Attribute", variant="primary")
                    upload_info = gr.Markdown(latex_delimiters=[])
                with gr.Column(scale=3):
                    with gr.Row():
                        upload_preview = gr.Image(label="Query", type="pil", interactive=False, height=256,
                                                  elem_classes="das-generated",
                                                  placeholder="Upload an image and click Attribute: it appears here")
                        upload_gallery = gr.Gallery(label="Most influential training images · share of the influence",
                                                    columns=4, height=256, scale=2, elem_classes="das-thumbs",
                                                    allow_preview=False)
                        upload_plot = gr.BarPlot(**PLOT)

        inspect_tab = InspectTab(bench, examples)

        with gr.Tab("Index"):
            status_md = gr.Markdown(latex_delimiters=[])
            build_button = gr.Button("Build / extend the store")
            refresh_button = gr.Button("Refresh", size="sm")

        with gr.Row():
            detail_image = gr.Image(label="Training image", interactive=False, height=256, elem_classes="das-detail",
                                    placeholder="Click a training image to see it large here", elem_id="detail-image")
            detail_md = gr.Markdown(f"*Click a training image: its caption, file and share of the influence appear "
                                    f"here ({md_text(SHARE_EXPLAINED)}).*", elem_id="detail", latex_delimiters=[])
        with gr.Accordion("Attribution as JSON", open=False):
            results_json = gr.JSON(label="Attribution (JSON)")

        slot_outputs = [c for s in slots for c in s]

        # ---- handlers ----------------------------------------------------------------------------

        @guarded
        def on_generate(prompt_, negative_, seed_, steps_, guidance_, lora_scale_, n_, method_, k_, state,
                        progress=gr.Progress(track_tqdm=True)):
            if not prompt_ or not prompt_.strip():
                raise AppError("type a prompt first")
            ensure_ready(progress)
            settings = GenerationSettings(prompt=prompt_.strip(), negative_prompt=negative_ or "", seed=int(seed_ or 0),
                                          steps=int(steps_), guidance=float(guidance_), num_images=int(n_),
                                          lora_scale=float(lora_scale_))
            queries = bench.generate(settings)
            warn(bench.prompt_note(settings.prompt))
            results = [bench.rank(q, method_, k_) for q in queries]
            warn(" ".join(bench.attributor.notes))
            state = {**state, "generated": queries, "generated_results": [r.to_json() for r in results]}
            return [*slot_updates(queries, results), [api_json(r.to_json()) for r in results], state]

        @guarded
        def on_attribute(path, fallback, method_, k_, state, progress=gr.Progress(track_tqdm=True)):
            if not path:
                raise AppError("upload an image first")
            ensure_ready(progress)
            query = bench.image_query(path, fallback)
            result = bench.rank(query, method_, k_)
            image = open_image(path, name=Path(path).name)
            state = {**state, "upload": query, "upload_result": result.to_json()}
            note = upload_note(query)
            if query.info.get("prompt_note"):
                warn(query.info["prompt_note"])
            warn(" ".join(result.notes))
            return image, captioned(result), score_plot(result), note, api_json(result.to_json()), state

        @guarded
        def on_rerank(method_, k_, state):
            queries = state.get("generated", [])
            results = [bench.rank(q, method_, k_) for q in queries]
            out = slot_updates(queries, results) if queries else [gr.update()] * len(slot_outputs)
            state = {**state, "generated_results": [r.to_json() for r in results]}
            if state.get("upload") is not None:
                upload_result = bench.rank(state["upload"], method_, k_)
                state["upload_result"] = upload_result.to_json()
                out += [captioned(upload_result), score_plot(upload_result)]
            else:
                out += [gr.update(), gr.update()]
            shown = [api_json(r) for r in state["generated_results"]] or \
                (api_json(state["upload_result"]) if state.get("upload_result") else None)
            return [*out, shown, state]

        @guarded
        def on_build(progress=gr.Progress(track_tqdm=True)):
            progress(0, desc="featurizing the dataset")
            return status_markdown(bench.build_store(notify=lambda stage: progress(0, desc=stage)))

        def on_status():
            return status_markdown(bench.store_status())

        def select_generated(slot):
            def handler(state, evt: gr.SelectData):
                results = state.get("generated_results", [])
                return detail_of(results[slot] if slot < len(results) else None, evt.index)
            return handler

        def select_upload(state, evt: gr.SelectData):
            return detail_of(state.get("upload_result"), evt.index)

        # ---- wiring ------------------------------------------------------------------------------

        dice.click(lambda: random.randrange(2**32), outputs=seed, queue=False, api_visibility="private")
        generate_inputs = [prompt, negative, seed, steps, guidance, lora_scale, num_images, method, top_k, session]
        for event, api in ((generate_button.click, dict(api_name="generate")),
                           (prompt.submit, dict(api_visibility="private"))):
            event(on_generate, generate_inputs, [*slot_outputs, results_json, session], validator=check_prompt,
                  **api, **HEAVY).success(lambda: gr.update(visible=False), None, generate_hint, queue=False,
                                          api_visibility="private")
        attribute_button.click(on_attribute, [upload, upload_prompt, method, top_k, session],
                               [upload_preview, upload_gallery, upload_plot, upload_info, results_json, session],
                               api_name="attribute", **HEAVY)
        rerank_outputs = [*slot_outputs, upload_gallery, upload_plot, results_json, session]
        method.change(on_rerank, [method, top_k, session], rerank_outputs, api_name="rerank")
        top_k.release(on_rerank, [method, top_k, session], rerank_outputs, api_visibility="private")
        for i, (_, gallery, _) in enumerate(slots):
            gallery.select(select_generated(i), [session], [detail_image, detail_md], api_visibility="private")
        upload_gallery.select(select_upload, [session], [detail_image, detail_md], api_visibility="private")
        inspect_tab.wire(method, top_k, session, ensure_ready)
        build_button.click(on_build, None, status_md, api_name="build_store", **HEAVY)
        refresh_button.click(on_status, None, status_md, api_visibility="private")
        app.load(on_status, None, status_md, api_visibility="private")
    return app


def launch_options(bench: Workbench) -> dict:
    """Launch settings: only the dataset's images and the inspection reports are reachable by URL.

    Args:
        bench: The engine whose dataset folder and inspection folder are served.

    Returns:
        Keyword arguments for ``gr.Blocks.launch``: allowed paths, upload size cap, CSS and, with a
        dataset folder, the ``DatasetImagesOnly`` middleware.
    """
    root = bench.dataset_root()
    allowed = ([str(root)] if root else []) + [str(bench.inspect_root.expanduser().resolve())]
    guard = {"app_kwargs": {"middleware": [Middleware(DatasetImagesOnly, root=root)]}} if root else {}
    return dict(allowed_paths=allowed, max_file_size=MAX_UPLOAD, css=CSS, show_error=True, ssr_mode=False, **guard)


def launch(bench: Workbench, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> gr.Blocks:
    """Build the app and serve it (heavy events queued one at a time, at most 64 waiting).

    Args:
        bench: The engine to serve.
        host: Address to listen on (default: this machine only).
        port: Port to listen on; None: 7860 or the next free one.
        **kwargs: Further ``gr.Blocks.launch`` arguments (``prevent_thread_lock``, ``share``, ...).

    Returns:
        The launched app (``launch`` blocks unless ``prevent_thread_lock`` is passed).
    """
    app = build_app(bench)
    app.queue(default_concurrency_limit=1, max_size=64)
    app.launch(server_name=host, server_port=port, **launch_options(bench), **kwargs)
    return app
