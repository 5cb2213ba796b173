"""A self-contained HTML report of an inspection: thumbnails inlined as data URIs, charts as inline
SVG, no scripts or external files, so it opens offline and can be mailed or archived as one file."""

from __future__ import annotations

import base64
import functools
import html
import io

import numpy as np

from ..data.images import ImageError, open_image

THUMB = 72
LISTED = 16  # images per leaderboard table

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{padding:4px 8px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:middle}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
img.t{width:72px;height:72px;image-rendering:pixelated;border-radius:4px;display:block}
.flag{display:inline-block;padding:1px 6px;border-radius:8px;font-size:11px;margin-right:3px}
.dup{background:#fff1c2}.out{background:#ffd8d3}.note{color:#59636e;font-size:13px}
.gens{display:flex;flex-wrap:wrap;gap:10px}.gen{width:160px;font-size:11px}
"""


@functools.lru_cache(maxsize=256)  # an image can appear in several tables of one report
def thumbnail(path: str) -> str:
    """A PNG thumbnail of an image (at most 144 px a side) as a data URI, for inlining in the report.

    Args:
        path: The image file.

    Returns:
        ``data:image/png;base64,...``; "" when the image cannot be read.
    """
    try:
        with open_image(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB * 2, THUMB * 2))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, ImageError):
        return ""
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(path: str, title: str = "") -> str:
    src = thumbnail(path)
    return f'<img class="t" src="{src}" alt="{html.escape(title)}" title="{html.escape(title)}">' if src else "(missing)"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def group_chart(groups: list[dict], width: int = 640) -> str:
    """Horizontal bars of group shares with their 95 % intervals, and a tick at the size share.

    Args:
        groups: Group records as in ``Inspection.to_json()["groups"]`` (``name``, ``mean_share``,
            ``ci_low``, ``ci_high``, ``size_share``), drawn in this order.
        width: Chart width in pixels.

    Returns:
        An inline SVG element; "" when there are no groups.
    """
    if not groups:
        return ""
    bar_h, left, top = 22, 170, 8
    scale = max(max(g["ci_high"] for g in groups), max(g["size_share"] for g in groups), 1e-9)
    plot = width - left - 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top * 2 + bar_h * len(groups)}" '
             'role="img" aria-label="group shares">']
    for n, g in enumerate(groups):
        y = top + n * bar_h
        x = lambda v: left + plot * v / scale  # noqa: E731
        parts.append(f'<text x="{left - 6}" y="{y + 15}" font-size="12" text-anchor="end">{html.escape(g["name"][:24])}</text>')
        parts.append(f'<rect class="bar" x="{left}" y="{y + 4}" width="{plot * g["mean_share"] / scale:.1f}" height="14" fill="#4e79a7"/>')
        parts.append(f'<line x1="{x(g["ci_low"]):.1f}" x2="{x(g["ci_high"]):.1f}" y1="{y + 11}" y2="{y + 11}" stroke="#1f2328"/>')
        parts.append(f'<line x1="{x(g["size_share"]):.1f}" x2="{x(g["size_share"]):.1f}" y1="{y + 2}" y2="{y + 20}" '
                     'stroke="#e15759" stroke-width="2"/>')
        parts.append(f'<text x="{x(g["ci_high"]) + 4:.1f}" y="{y + 15}" font-size="11">{_pct(g["mean_share"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(values: np.ndarray, bins: int = 30, width: int = 640, height: int = 160) -> str:
    """Histogram of per-image mean shares (log-spaced counts would hide the long tail: linear).

    Args:
        values: (N,) shares, as fractions (labelled as percentages).
        bins: Number of equal-width bins.
        width: Chart width in pixels.
        height: Plot height in pixels (the axis labels add 24).

    Returns:
        An inline SVG element.
    """
    counts, edges = np.histogram(values, bins=bins)
    peak = max(int(counts.max()), 1)
    bw = (width - 40) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 24}" role="img" '
             'aria-label="histogram of shares">']
    for n, c in enumerate(counts):
        h = (height - 10) * c / peak
        parts.append(f'<rect class="bin" x="{30 + n * bw:.1f}" y="{height - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}" '
                     f'fill="#59a14f"><title>{c} images, {_pct(edges[n])}-{_pct(edges[n + 1])}</title></rect>')
    parts.append(f'<text x="30" y="{height + 16}" font-size="11">{_pct(edges[0])}</text>')
    parts.append(f'<text x="{width - 10}" y="{height + 16}" font-size="11" text-anchor="end">{_pct(edges[-1])}</text>')
    parts.append(f'<text x="4" y="12" font-size="11">{peak}</text></svg>')
    return "".join(parts)


def _flags(row: dict) -> str:
    out = ""
    if row.get("duplicate"):
        out += f'<span class="flag dup">near-duplicate of {html.escape(str(row["nearest_key"])[:10])}</span>'
    if row.get("outlier"):
        out += f'<span class="flag out">outlier (z {row["outlier_z"]:.1f})</span>'
    return out


def _image_table(rows: list[dict], with_group: bool) -> str:
    head = "<tr><th></th><th>key</th><th>caption</th>" + ("<th>group</th>" if with_group else "") + \
        "<th>mean share</th><th>signed</th><th>in top-k</th><th>flags</th></tr>"
    body = "".join(
        f'<tr class="image-row"><td>{_img(r["path"], r["caption"])}</td><td><code>{html.escape(r["key"][:12])}</code></td>'
        f'<td>{html.escape(r["caption"])}</td>' + (f'<td>{html.escape(str(r["group"]))}</td>' if with_group else "") +
        f'<td class="n">{_pct(r["mean_share"])}</td><td class="n">{_pct(r["mean_signed_share"])}</td>'
        f'<td class="n">{r["top_k_count"]}</td><td>{_flags(r)}</td></tr>' for r in rows)
    return f"<table>{head}{body}</table>"


def html_report(data: dict) -> str:
    """The report of an inspection from its JSON record, which holds everything shown: the report
    can be rebuilt from inspection.json.

    Args:
        data: The record (``Inspection.to_json()``, as saved in inspection.json).

    Returns:
        A complete HTML document with no scripts or external files.
    """
    rows, settings = data["images"], data["settings"]
    with_group = bool(data["group_by"])  # an inspection has groups exactly when it was given a group_by
    n, q = len(rows), data["num_generations"]
    flagged = [r for r in rows if r.get("duplicate") or r.get("outlier")]
    never = sum(1 for r in rows if r["top_k_count"] == 0)
    groups = data["groups"]
    group_rows = "".join(
        f'<tr><td>{html.escape(g["name"])}</td><td class="n">{g["size"]}</td><td class="n">{_pct(g["size_share"])}</td>'
        f'<td class="n">{_pct(g["mean_share"])}</td><td class="n">{_pct(g["ci_low"])} – {_pct(g["ci_high"])}</td></tr>'
        for g in groups)
    generations = "".join(
        f'<div class="gen">{_img(g["image"], g["prompt"])}<div>{html.escape(g["id"])}: {html.escape(g["prompt"][:60])}</div>'
        f'<div>top: {", ".join(html.escape(t["key"][:8]) for t in g["top"][:3])}</div></div>'
        for g in data["generations"][:48])
    sections = [
        f"<h1>das-sd inspection: {n} training images, {q} generations</h1>",
        f'<p class="note">Method <b>{html.escape(data["method"])}</b>, store <code>{html.escape(data["store_id"])}</code>. '
        f'Share: {html.escape(data["normalisation"])}; signed: {html.escape(data["signed_normalisation"])}. '
        f'{never} of {n} images are in no generation\'s top-{settings["top_k"]}.</p>',
    ]
    if groups:
        sections += [f"<h2>Credit by group ({html.escape(str(data['group_by']))})</h2>",
                     '<p class="note">Bars: mean share over generations, with a bootstrap 95 % interval; red tick: '
                     "the group's share of the training set.</p>", group_chart(groups),
                     f"<table><tr><th>group</th><th>images</th><th>of the set</th><th>mean share</th>"
                     f"<th>95 % interval</th></tr>{group_rows}</table>"]
    sections += [
        "<h2>Most influential training images</h2>", _image_table(rows[:LISTED], with_group),
        "<h2>Least influential training images</h2>", _image_table(rows[-LISTED:][::-1], with_group),
        "<h2>Distribution of mean shares</h2>", histogram(np.array([r["mean_share"] for r in rows])),
        f"<h2>Near-duplicates and outliers ({len(flagged)})</h2>",
        '<p class="note">Near-duplicate: cosine of the stored latents to another training image at least '
        f'{settings["duplicate_threshold"]}; outlier: robust z-score of self-influence above '
        f'{settings["outlier_threshold"]}.</p>',
        _image_table(flagged, with_group) if flagged else "<p>None flagged.</p>",
        "<h2>Generations</h2>", f'<div class="gens">{generations}</div>',
    ]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>das-sd inspection</title>'
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>")
