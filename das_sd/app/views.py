"""View helpers of the app: attributions, inspections and store status as the values Gradio
components display (gallery items, data frames, markdown). No Gradio objects, no model calls."""

from __future__ import annotations

import pandas as pd

from ..attribute import Attribution

EFFECT_COLOURS = {"t > 0": "#d9480f", "t < 0": "#1c7ed6"}  # sign of the signed leave-one-out effect t_i


def gallery_items(result: Attribution) -> list[tuple[str, str]]:
    return [(r.path, r.label()) for r in result.results]


def api_json(record: dict) -> dict:
    """An attribution for the JSON output: ``path`` is renamed ``file``, because Gradio takes any
    dict with a ``path`` key for a file to transfer and would replace the whole row by it."""
    return {**record, "results": [{("file" if k == "path" else k): v for k, v in r.items()} for r in record["results"]]}


def score_plot(result: Attribution) -> pd.DataFrame:
    return pd.DataFrame({"rank": [f"#{r.rank}" for r in result.results],
                         "score": [r.score for r in result.results],
                         "effect": ["t > 0" if r.sign >= 0 else "t < 0" for r in result.results]})


def detail_of(result: dict | None, index: int | None) -> tuple[str | None, str]:
    if not result or index is None or not 0 <= index < len(result["results"]):
        return None, ""
    r = result["results"][index]
    text = (f"**#{r['rank']}** · {result['method']} score **{r['score']:.4g}** "
            f"(signed effect t {'positive' if r['sign'] >= 0 else 'negative'})\n\n"
            f"**Caption:** {r['caption']}\n\n**Key:** `{r['key']}`\n\n**File:** `{r['path']}`")
    return r["path"], text


def leaderboard(rows: list[dict]) -> tuple[list[tuple[str, str]], pd.DataFrame]:
    """Gallery items and table of an inspection's most credited training images."""
    items = [(r["path"], f"#{n} {100 * r['mean_share']:.2f}% · top-k {r['top_k_count']}") for n, r in enumerate(rows, 1)]
    table = pd.DataFrame([{"rank": n, "caption": r["caption"], "group": r.get("group") or "",
                           "mean share %": round(100 * r["mean_share"], 3), "in top-k": r["top_k_count"],
                           "flags": ", ".join(f for f in ("duplicate", "outlier") if r.get(f))}
                          for n, r in enumerate(rows, 1)])
    return items, table


def groups_markdown(groups: list[dict], group_by: str | None) -> str:
    if not groups:
        return "No groups (set *Group by* to roll the credit up by folder, metadata column or mapping file)."
    lines = [f"**Credit by group** ({group_by}; mean share over generations, bootstrap 95 % interval)", "",
             "| group | images | of the set | mean share | 95 % interval |", "|---|---|---|---|---|"]
    lines += [f"| {g['name']} | {g['size']} | {100 * g['size_share']:.1f}% | {100 * g['mean_share']:.1f}% | "
              f"{100 * g['ci_low']:.1f}–{100 * g['ci_high']:.1f}% |" for g in groups]
    return "\n".join(lines)


def status_markdown(status: dict) -> str:
    if "samples" not in status:
        return f"**No feature store yet** at `{status['store']}`.\n\n{status['problem']}"
    lines = [f"**Store** `{status['store']}` — {status['samples']} training images, "
             f"{'complete' if status['complete'] else 'incomplete'}, {status['resolution']} px",
             f"- **Base model:** `{status['base']}` ({status['base_fingerprint']})",
             f"- **LoRA:** `{status['lora']}` ({status['lora_fingerprint']})",
             f"- **Dataset:** `{status['dataset']}`", "",
             "| feature set | f | K | k | normalise | residual | λ | index |", "|---|---|---|---|---|---|---|---|"]
    for name, s in status["feature_sets"].items():
        lam = f"{s['lambda']:.4g}" if s["lambda"] is not None else "—"
        lines.append(f"| {name} | {s['f']} | {s['K']} | {s['k']} | {s['normalize']} "
                     f"| {s['residual']} | {lam} | {'current' if s['index_current'] else 'out of date'} |")
    if status["problem"]:
        lines += ["", f"⚠ {status['problem']}"]
    return "\n".join(lines)
