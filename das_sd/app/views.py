"""View helpers of the app: attributions, inspections and store status as the values Gradio
components display (gallery items, data frames, markdown). No Gradio objects, no model calls."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pandas as pd

from ..attribute_results import Attribution
from ..generation import shorten
from ..shares import share_text

if TYPE_CHECKING:
    from .values import Query

EFFECT_COLOURS = {"t > 0": "#d9480f", "t < 0": "#1c7ed6"}  # sign of the signed leave-one-out effect t_i
SHOWN_PROMPT = 300  # characters of a prompt echoed back (CLIP reads 77 tokens of it anyway)

# Text of users (prompts, captions, group names, file names) is shown literally: HTML's specials as
# entities, Markdown's (and GFM autolinks', and the "$$" of Gradio's LaTeX) backslash-escaped, line
# breaks as spaces, so that "<img onerror=...>", "[x](javascript:...)" or "**bold**" stay text.
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:/@$^=])")
_HTML_SPECIALS = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(text: object) -> str:
    """``text`` for a Markdown string, shown as it is.

    Args:
        text: Any value; shown as ``str(text)`` with line breaks as spaces.

    Returns:
        The text with Markdown's specials backslash-escaped and ``&``, ``<``, ``>`` as HTML entities.
    """
    text = " ".join(str(text).splitlines())
    text = _MARKDOWN_SPECIALS.sub(r"\\\1", text)
    return re.sub(r"[&<>]", lambda m: _HTML_SPECIALS[m[0]], text)


def api_json(record: dict) -> dict:
    """An attribution for the JSON output: ``path`` is renamed ``file``, because Gradio takes any
    dict with a ``path`` key for a file to transfer and would replace the whole row by it.

    Args:
        record: ``Attribution.to_json()``.

    Returns:
        A copy of ``record`` whose result rows have ``file`` instead of ``path``.
    """
    return {**record, "results": [{("file" if k == "path" else k): v for k, v in r.items()} for r in record["results"]]}


SHARE_EXPLAINED = ("share: of the positive influence of all the LoRA's training images on this image "
                   "(all shares sum to 100 %; `das-sd inspect` uses the same definition)")


def score_plot(result: Attribution) -> pd.DataFrame:
    """The data of an attribution's bar plot: each top-k image's share of the influence, coloured by
    the sign of the effect, the raw score in the tooltip.

    Args:
        result: The attribution.

    Returns:
        One row per result: "rank" ("#1", ...), "share %" (100 x ``AttributionRow.share``; 0 when not
        known), "score" (the raw ranking key, t^2 for das) and "effect" ("t > 0" or "t < 0", the sign
        of the signed effect t; docs/method.md §11).
    """
    return pd.DataFrame({"rank": [f"#{r.rank}" for r in result.results],
                         "share %": [round(100 * (r.share or 0.0), 3) for r in result.results],
                         "score": [float(f"{r.score:.4g}") for r in result.results],
                         "effect": ["t > 0" if r.sign >= 0 else "t < 0" for r in result.results]})


def detail_of(result: dict | None, index: int | None) -> tuple[str | None, str]:
    """The large view of a training image clicked in an attribution's gallery.

    Args:
        result: ``Attribution.to_json()`` of the gallery, or None when there is none.
        index: The clicked gallery position (0-based), or None.

    Returns:
        (image path, Markdown with rank, share of the influence (explained), raw score and sign,
        caption, key and file); (None, "") when ``result`` or ``index`` does not name a result.
    """
    if not result or index is None or not 0 <= index < len(result["results"]):
        return None, ""
    r = result["results"][index]
    share = share_text(r.get("share"), r["score"], r["sign"])
    text = (f"**#{r['rank']} · {share}** of the influence on this image\n\n"
            f"{SHARE_EXPLAINED[0].upper()}{SHARE_EXPLAINED[1:]}. Raw {result['method']} score {r['score']:.4g} (the ranking key), signed effect t "
            f"{'positive' if r['sign'] >= 0 else 'negative'} (docs/method.md §11)."
            f"\n\n**Caption:** {md_text(r['caption'])}\n\n**Key:** {md_text(r['key'])}\n\n"
            f"**File:** {md_text(r['path'])}")
    return r["path"], text


def upload_note(query: Query) -> str:
    """The Attribute tab's Markdown under the upload: the prompt used (shown as typed), and any warning.

    Args:
        query: The upload's query from ``Workbench.image_query``.

    Returns:
        Markdown: where the prompt came from, the prompt (shortened, escaped) and its ``prompt_note``.
    """
    note = f"Prompt ({query.info['prompt_from']}): *{md_text(shorten(query.prompt.strip(), SHOWN_PROMPT))}*"
    if query.info.get("prompt_note"):
        text = query.info["prompt_note"]
        note += f"\n\n**Note:** {md_text(text[0].upper() + text[1:])}"
    return note


LEADERBOARD_COLUMNS = ["rank", "caption", "group", "mean share %", "in top-k", "flags"]


def leaderboard(rows: list[dict]) -> tuple[list[tuple[str, str]], pd.DataFrame]:
    """Gallery items and table of an inspection's most credited training images.

    Args:
        rows: The first rows of ``Inspection.to_json()["images"]``, most credited first.

    Returns:
        (image path, caption) gallery items, and a table with rank, caption, group, mean share %,
        top-k count and duplicate / outlier flags.
    """
    items = [(r["path"], f"#{n} {100 * r['mean_share']:.2f}% · top-k {r['top_k_count']}") for n, r in enumerate(rows, 1)]
    table = pd.DataFrame([dict(zip(LEADERBOARD_COLUMNS, (n, r["caption"], r.get("group") or "",
                                                      round(100 * r["mean_share"], 3), r["top_k_count"],
                                                      ", ".join(f for f in ("duplicate", "outlier") if r.get(f)))))
                          for n, r in enumerate(rows, 1)], columns=LEADERBOARD_COLUMNS)
    return items, table


def groups_markdown(groups: list[dict], group_by: str | None, coverage: str | None = None) -> str:
    """The credit per group as a Markdown table (docs/method.md §13).

    Args:
        groups: ``Inspection.to_json()["groups"]``.
        group_by: The grouping, shown in the heading.
        coverage: What a mapping covered (das_sd.inspect's line); None: not shown.

    Returns:
        Markdown: size, share of the set, mean share and its bootstrap 95 % interval per group, or a
        hint on grouping when there are no groups.
    """
    if not groups:
        return "No groups (set *Group by* to roll the credit up by folder, metadata column or mapping file)."
    lines = [f"**Credit by group** ({md_text(group_by)}; mean share over generations, bootstrap 95 % interval)", "",
             *([f"Mapping {md_text(coverage)}", ""] if coverage else []),
             "| group | images | of the set | mean share | 95 % interval |", "|---|---|---|---|---|"]
    lines += [f"| {md_text(g['name'])} | {g['size']} | {100 * g['size_share']:.1f}% | {100 * g['mean_share']:.1f}% | "
              f"{100 * g['ci_low']:.1f}–{100 * g['ci_high']:.1f}% |" for g in groups]
    return "\n".join(lines)


def status_markdown(status: dict) -> str:
    """The Index tab's Markdown for a store status.

    Args:
        status: ``Workbench.store_status()``.

    Returns:
        Markdown: the store, model, LoRA and dataset, a table of the feature sets and their index, and
        the problem when attribution cannot run; only the problem when the store does not open.
    """
    if "samples" not in status:
        return f"**No feature store yet** at {md_text(status['store'])}.\n\n{md_text(status['problem'])}"
    lines = [f"**Store** {md_text(status['store'])} — {status['samples']} training images, "
             f"{'complete' if status['complete'] else 'incomplete'}, {status['resolution']} px",
             f"- **Base model:** {md_text(status['base'])} ({md_text(status['base_fingerprint'])})",
             f"- **LoRA:** {md_text(status['lora'])} ({md_text(status['lora_fingerprint'])})",
             f"- **Dataset:** {md_text(status['dataset'])}", "",
             "| feature set | f | K | k | normalise | residual | λ | index |", "|---|---|---|---|---|---|---|---|"]
    for name, s in status["feature_sets"].items():
        lam = f"{s['lambda']:.4g}" if s["lambda"] is not None else "—"
        lines.append(f"| {md_text(name)} | {md_text(s['f'])} | {s['K']} | {s['k']} | {s['normalize']} "
                     f"| {s['residual']} | {lam} | {'current' if s['index_current'] else 'out of date'} |")
    accounting = status.get("lora_parameters") or {}
    if accounting:
        kinds = ", ".join(f"{md_text(kind)} {count:,}" for kind, count in accounting["differentiated"].items())
        lines.insert(3, f"- **LoRA parameters differentiated:** {accounting['differentiated_total']:,} ({kinds})")
    if accounting.get("left_out_total"):
        left = ", ".join(f"{md_text(kind)} {count:,}" for kind, count in accounting["left_out"].items())
        lines.insert(4, f"- **Partial attribution** (`--allow-partial`): left out {left}")
    if status["problem"]:
        lines += ["", f"**Problem:** {md_text(status['problem'])}"]
    return "\n".join(lines)
