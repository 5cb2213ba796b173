"""The app's Inspect tab: prompts x seeds generated and attributed (``Workbench.inspect``), the most
credited training images, the credit per group and the report files to download."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from ..generation import shorten
from .events import HEAVY, guarded, warn
from .views import LEADERBOARD_COLUMNS, SHOWN_PROMPT, groups_markdown, leaderboard

if TYPE_CHECKING:
    from collections.abc import Callable

    from .session import Workbench

LEADERBOARD = 24  # training images shown in the Inspect tab
INSPECT_HINT = ("*Click **Inspect**: each prompt is generated with several seeds, every generation attributed, and the "
                "training images ranked here by their mean share of the influence (with the credit per group when "
                "*Group by* is set). Click a training image to see the generations it influenced most.*")


class InspectTab:
    """The Inspect tab's components, laid out where the tab is created (inside the app's Blocks).

    Its events are wired apart, by ``wire``, in turn with the app's other events: the order in which
    they are wired is the order of the app's API endpoints.

    Args:
        bench: The engine its handlers call.
        examples: Example prompts (training captions of the LoRA); they fill the prompt box.
    """

    def __init__(self, bench: Workbench, examples: list[str]):
        self.bench = bench
        with gr.Tab("Inspect"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    self.prompts = gr.Textbox(
                        label="Prompts (one per line)", lines=6, elem_id="inspect-prompts", value="\n".join(examples),
                        placeholder="One prompt per line, e.g. the LoRA's training captions")
                    if examples:
                        gr.Examples([["\n".join(examples)]], inputs=[self.prompts], elem_id="inspect-examples",
                                    example_labels=[f"The {len(examples)} example prompts"],
                                    label="Example prompts (training captions of the LoRA)")
                    self.seeds = gr.Slider(1, 8, value=2, step=1, label="Seeds per prompt")
                    self.group = gr.Textbox(label="Group by: folder, column:NAME or file:PATH in the dataset "
                                                  "folder (optional)",
                                            value="column:concept" if bench.config.demo else "")
                    self.mapping = gr.File(label="…or a group mapping (JSON object or CSV: key or file, group; "
                                                 "≤ 1 MB)", file_types=[".json", ".csv"], type="filepath")
                    self.button = gr.Button("Inspect", variant="primary", elem_id="inspect")
                    self.files = gr.File(label="Reports (HTML, JSON, CSV)", file_count="multiple", interactive=False)
                with gr.Column(scale=3):
                    self.groups = gr.Markdown(INSPECT_HINT, latex_delimiters=[], elem_id="inspect-groups")
                    self.leader_gallery = gr.Gallery(label="Most credited training images · mean share (click one)",
                                                     columns=8, height=260, elem_id="leaderboard",
                                                     elem_classes="das-thumbs", allow_preview=False)
                    self.leader_table = gr.Dataframe(value=None, headers=LEADERBOARD_COLUMNS, label="Leaderboard",
                                                     interactive=False, max_height=300, elem_id="leader-table")
                    self.influenced = gr.Gallery(label="Generations the selected training image influenced most",
                                                 columns=6, height=200, elem_id="influenced", elem_classes="das-thumbs",
                                                 allow_preview=False)

    def wire(self, method: gr.Dropdown, top_k: gr.Slider, session: gr.State,
             ensure_ready: Callable[[gr.Progress], None]) -> None:
        """Wire the Inspect button (API endpoint ``inspect``) and the leaderboard's selection.

        Args:
            method: The app's attribution method dropdown.
            top_k: The app's top-k slider.
            session: The browser session's state (the leaderboard rows and generations are kept there).
            ensure_ready: Called with the event's progress before the model runs (the demo builds its
                store on first use).
        """
        bench = self.bench

        @guarded
        def on_inspect(prompts_, seeds_, group_, mapping_, method_, k_, state, progress=gr.Progress()):
            group_by, mapping = bench.groups(group_, mapping_)  # a bad grouping is refused before the store is checked
            ensure_ready(progress)
            inspection, files = bench.inspect(
                (prompts_ or "").splitlines(), int(seeds_), method_, int(k_), (group_ or "").strip() or None,
                progress=lambda done, total, what: progress((done, total), desc=f"generating and attributing {what}"),
                mapping_file=mapping_)
            long = sum(1 for p in {g.prompt for g in inspection.generations} if bench.prompt_note(p))
            if long:
                warn(f"{long} prompt(s) are longer than the text encoder reads: their ends had no effect")
            data = inspection.to_json()
            rows = data["images"][:LEADERBOARD]
            generations = {g["id"]: g for g in data["generations"]}
            state = {**state, "inspect_rows": rows, "inspect_generations": generations}
            items, table = leaderboard(rows)
            coverage = bench.mapping_coverage(group_by, mapping) if mapping is not None else None
            if coverage and '"(none)"' in coverage:
                warn(f"the group mapping {coverage}")
            return (groups_markdown(data["groups"], data["group_by"], coverage), items, table, [],
                    [str(files[k]) for k in ("html", "json", "images_csv", "groups_csv")], state)

        def select_leader(state, evt: gr.SelectData):
            rows = state.get("inspect_rows", [])
            if evt.index is None or evt.index >= len(rows):
                return []
            generations = state.get("inspect_generations", {})
            return [(generations[t["generation"]]["image"],
                     f"{100 * t['share']:.2f}% · {shorten(generations[t['generation']]['prompt'], SHOWN_PROMPT)}")
                    for t in rows[evt.index]["top_generations"] if t["generation"] in generations]

        self.button.click(on_inspect, [self.prompts, self.seeds, self.group, self.mapping, method, top_k, session],
                          [self.groups, self.leader_gallery, self.leader_table, self.influenced, self.files, session],
                          api_name="inspect", **HEAVY)
        self.leader_gallery.select(select_leader, [session], self.influenced, api_visibility="private")
