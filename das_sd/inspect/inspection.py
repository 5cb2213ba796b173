"""Inspect a LoRA's training data over many generations: which images drive it, which never matter,
which are duplicates or outliers, and how much credit each group (contributor, source) gets.

Generations come from prompts x seeds (generated here) or from a folder of generated PNGs with their
prompts in the metadata; query features are computed in batches and scored as one matrix product.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..attribute import Attributor, QueryError
from ..data.datasets import open_dataset
from ..io import json_error
from ..generation import GenerationSettings, generate, save_png
from ..models.fingerprint import provenance
from ..registry import DEFAULT_METHOD, METHOD_NAMES, check_choice
from ..score import ranking
from .rollup import (NORMALISATION, SIGNED_NORMALISATION, GroupCredit, ImageCredit, credit_shares,
                     group_credits, image_credits, signed_shares)
from .signals import DUPLICATE_SIMILARITY, OUTLIER_Z, ImageSignals, image_signals

if TYPE_CHECKING:
    from ..store_manifest import Row

Progress = Callable[[int, int, str], None]  # (done, total, what)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class InspectSettings:
    """Settings of an inspection (docs/method.md §13).

    Attributes:
        method: The attribution method scored with (a name of ``das_sd.registry.METHOD_NAMES``).
        top_k: k of each training image's top-k count.
        batch_size: Generations featurized together.
        bootstrap: Resamples of the generations for the group intervals.
        seed: Seed of the bootstrap.
        per_image_generations: Largest-share generations listed per training image.
        duplicate_threshold: Cosine of the stored latents from which an image is a near-duplicate.
        outlier_threshold: Robust z-score of self-influence above which an image is an outlier.
        steps: Denoising steps of the generations made here.
        guidance: Classifier-free guidance scale of the generations made here.

    Raises:
        ValueError: When ``method`` is not a known method.
    """
    method: str = DEFAULT_METHOD
    top_k: int = 10  # for the top-k counts
    batch_size: int = 8  # generations featurized together
    bootstrap: int = 1000  # resamples of the generations for the group intervals
    seed: int = 0  # bootstrap seed
    per_image_generations: int = 5  # generations listed per training image
    duplicate_threshold: float = DUPLICATE_SIMILARITY
    outlier_threshold: float = OUTLIER_Z
    steps: int = GenerationSettings.steps
    guidance: float = GenerationSettings.guidance

    def __post_init__(self):
        check_choice("method", self.method, METHOD_NAMES)


@dataclass
class Generation:
    """One inspected generation.

    Attributes:
        id: Its id in the reports (``p<prompt>-s<seed>`` for generations made here, else the file stem).
        prompt: Its prompt.
        seed: Its seed; None for an image read from a folder.
        image: Path of its image file.
    """
    id: str
    prompt: str
    seed: int | None
    image: str  # PNG path


@dataclass
class Inspection:
    """The result of an inspection: scores, shares and credits of every training image over Q generations.

    Attributes:
        settings: The settings it ran with.
        store_id: Id of the feature store scored against.
        group_by: The grouping (``folder``, ``column:NAME``, ``file:PATH``), or None.
        generations: The Q generations, in scoring order.
        keys: The N training keys, in store row order.
        paths: The training images' paths.
        captions: The training captions.
        groups: The group of each training image, or None without ``group_by``.
        scores: (Q, N) float64 ranking scores (t^2 for das).
        effects: (Q, N) float64 signed effects t.
        shares: (Q, N) credit shares (``credit_shares``); each row sums to 1 or is all 0.
        signed: (Q, N) signed shares (``signed_shares``).
        credits: Per training image, its credit over the generations (``image_credits``).
        group_credits: Per group, its credit, largest mean share first; empty without groups.
        signals: Per-image leverage, self-influence and near-duplicate signals; None for methods
            without a feature set.
    """
    settings: InspectSettings
    store_id: str
    group_by: str | None
    generations: list[Generation]
    keys: list[str]
    paths: list[str]
    captions: list[str]
    groups: list[str] | None
    scores: np.ndarray  # (Q, N) ranking scores
    effects: np.ndarray  # (Q, N) signed effects t
    shares: np.ndarray  # (Q, N)
    signed: np.ndarray  # (Q, N)
    credits: list[ImageCredit]
    group_credits: list[GroupCredit] = field(default_factory=list)
    signals: ImageSignals | None = None

    def image_rows(self) -> list[dict]:
        """One record per training image, most credited first.

        Returns:
            Per image, ``{"key", "path", "caption", "group", "total_share", "mean_share",
            "mean_signed_share", "top_k_count", "top_generations"}``, plus with signals "leverage",
            "self_influence", "outlier_z", "outlier", "nearest_key", "nearest_similarity", "duplicate".
        """
        rows = []
        for c in sorted(self.credits, key=lambda c: -c.total_share):
            i = c.index
            row = {"key": self.keys[i], "path": self.paths[i], "caption": self.captions[i],
                   "group": self.groups[i] if self.groups else None,
                   "total_share": c.total_share, "mean_share": c.mean_share, "mean_signed_share": c.mean_signed_share,
                   "top_k_count": c.top_k_count,
                   "top_generations": [{"generation": self.generations[g].id, "share": s} for g, s in c.top_generations]}
            if self.signals is not None:
                s = self.signals
                row.update(leverage=float(s.leverage[i]), self_influence=float(s.self_influence[i]),
                           outlier_z=float(s.outlier_z[i]), outlier=s.is_outlier(i),
                           nearest_key=self.keys[int(s.nn_index[i])] if s.nn_index[i] >= 0 else None,
                           nearest_similarity=float(s.nn_similarity[i]), duplicate=s.is_duplicate(i))
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        """The inspection as a JSON-ready record (what inspection.json holds and ``html_report`` reads).

        Returns:
            Store id, method, settings, normalisations, every generation with its top-k images by share,
            group credits and ``image_rows``.
        """
        top = np.argsort(-self.shares, axis=1)[:, :self.settings.top_k]
        return {
            "store_id": self.store_id, "method": self.settings.method, "settings": asdict(self.settings),
            "normalisation": NORMALISATION, "signed_normalisation": SIGNED_NORMALISATION,
            "group_by": self.group_by, "num_generations": len(self.generations), "num_training_images": len(self.keys),
            "generations": [{**asdict(g), "top": [{"key": self.keys[i], "share": float(self.shares[q, i])} for i in top[q]]}
                            for q, g in enumerate(self.generations)],
            "groups": [asdict(g) for g in self.group_credits],
            "images": self.image_rows(),
        }

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write inspection.json, images.csv, groups.csv, generations.csv and report.html under ``out``.

        Args:
            out: Output folder; created when missing, files in it replaced.

        Returns:
            The written paths by kind: "json", "images_csv", "groups_csv", "generations_csv", "html".
        """
        from ..io import atomic_write_text
        from .report import html_report

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        files = {"json": out / "inspection.json", "images_csv": out / "images.csv",
                 "groups_csv": out / "groups.csv", "generations_csv": out / "generations.csv",
                 "html": out / "report.html"}
        atomic_write_text(files["json"], json.dumps(data, indent=1))
        image_columns = ["key", "path", "caption", "group", "total_share", "mean_share", "mean_signed_share",
                         "top_k_count", "leverage", "self_influence", "outlier_z", "outlier", "nearest_key",
                         "nearest_similarity", "duplicate"]
        atomic_write_text(files["images_csv"], _csv(image_columns, data["images"]))
        atomic_write_text(files["groups_csv"], _csv(["name", "size", "size_share", "mean_share", "ci_low", "ci_high"],
                                                    data["groups"]))
        generation_rows = [{**g, "top_keys": " ".join(t["key"] for t in g["top"])} for g in data["generations"]]
        atomic_write_text(files["generations_csv"], _csv(["id", "prompt", "seed", "image", "top_keys"], generation_rows))
        atomic_write_text(files["html"], html_report(data))
        return files


def _csv(columns: list[str], rows: list[dict]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Generations

def generate_queries(attributor: Attributor, prompts: list[str], seeds: int, out: Path,
                     settings: InspectSettings) -> Iterator[tuple[Generation, torch.Tensor]]:
    """Generate prompts x seeds 0..seeds-1 with the store's pipeline and save them as PNGs under ``out``.

    Args:
        attributor: The attributor whose pipeline generates.
        prompts: The prompts.
        seeds: Generations per prompt.
        out: Folder for the PNGs (``p<prompt>-s<seed>.png``, with generation metadata); created when missing.
        settings: Gives the generations' ``steps`` and ``guidance``.

    Yields:
        ``(generation, latents)`` one at a time; latents are the final latents, (1, 4, h/8, w/8).
    """
    out.mkdir(parents=True, exist_ok=True)
    info = provenance(attributor.base_path, attributor.lora_path)
    for p, prompt in enumerate(prompts):
        for seed in range(seeds):
            result = generate(attributor.pipe, GenerationSettings(prompt=prompt, seed=seed, steps=settings.steps,
                                                                  guidance=settings.guidance), info)
            gid = f"p{p:03d}-s{seed}"
            path = out / f"{gid}.png"
            image = result.images[0]
            save_png(image, path, result.metadata(0) | {"width": image.width, "height": image.height})
            yield Generation(gid, prompt, seed, str(path)), result.latents


def image_queries(attributor: Attributor, folder: str | Path) -> Iterator[tuple[Generation, torch.Tensor]]:
    """Every image of ``folder`` (sorted), with the prompt from its PNG metadata.

    Args:
        attributor: The attributor that reads and encodes the images.
        folder: Folder of generated images (.png, .jpg, .jpeg, .webp; not searched recursively).

    Yields:
        ``(generation, latents)`` per image; the generation's id is the file stem, its seed None.

    Raises:
        QueryError: When the folder holds no such image (or is not a folder), or (from
            ``Attributor.image_query``) when an image cannot be a query.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise QueryError(f"{folder}: no generated images (.png, .jpg, .webp) to inspect")
    for path in files:
        latents, prompt, _ = attributor.image_query(path)
        yield Generation(path.stem, prompt, None, str(path)), latents


# ---------------------------------------------------------------------------------------------
# Groups

def training_groups(attributor: Attributor, group_by: str, mapping: dict[str, str] | None = None) -> list[str]:
    """A group name per training row (docs/method.md §13).

    Args:
        attributor: The attributor of the store whose rows are grouped.
        group_by: ``folder`` (kohya folder / parent folder; "(root)" for top-level images), ``column:NAME``
            (a metadata.jsonl / .csv column) or ``file:PATH`` (JSON object or two-column CSV mapping keys,
            relative paths or file names to groups). Rows a column or mapping does not cover go to "(none)".
        mapping: The ``file:`` mapping already read (the app reads uploads itself and never opens a
            path a request names); None reads PATH.

    Returns:
        One group name per training row, in store row order.

    Raises:
        ValueError: When ``group_by`` has another form, the dataset has no column NAME, or the mapping
            cannot be read or gives no training image a group.
    """
    rows = attributor.rows
    if group_by == "folder":
        return [str(Path(r.path).parent.as_posix()) if Path(r.path).parent.as_posix() != "." else "(root)" for r in rows]
    if group_by.startswith("column:"):
        column = group_by.split(":", 1)[1]
        info = attributor.store.manifest.get("info", {})
        dataset = open_dataset(info.get("dataset_root", "."), info.get("dataset_format", "auto"),
                               caption_column=info.get("caption_column", "text"))
        by_key = dataset.by_key()
        if not any(column in s.metadata for s in dataset.samples):
            raise ValueError(f"group by {group_by}: no metadata column {column!r} in {dataset.root}")
        return [str(by_key[r.key].metadata.get(column, "(none)")) if r.key in by_key else "(none)" for r in rows]
    if group_by.startswith("file:"):
        if mapping is None:
            mapping = read_group_mapping(Path(group_by.split(":", 1)[1]))
        mapping_coverage(rows, mapping, group_by)  # refuses a mapping that matches no training image
        return [_mapped_group(r, mapping) or "(none)" for r in rows]
    raise ValueError(f"group by {group_by!r}: expected folder, column:NAME or file:PATH")


def _mapped_group(row, mapping: dict[str, str]) -> str | None:
    return mapping.get(row.key) or mapping.get(row.path) or mapping.get(Path(row.path).name)


def mapping_coverage(rows: list[Row], mapping: dict[str, str], group_by: str) -> str:
    """How much of the store a ``file:`` group mapping covers, as a line for the user.

    Args:
        rows: The store's training rows.
        mapping: Key, relative path or file name -> group.
        group_by: How the user named the mapping (``file:PATH``); errors and the line start with it.

    Returns:
        A line saying how many mapping entries name a training image and how many images get a group.

    Raises:
        ValueError: When the mapping gives no training image a group (another file, a metadata.jsonl
            read as CSV), rather than putting every image in "(none)".
    """
    names = set()
    grouped = 0
    for r in rows:
        names.update((r.key, r.path, Path(r.path).name))
        grouped += bool(_mapped_group(r, mapping))
    named = sum(1 for k in mapping if k in names)
    if not grouped:
        raise ValueError(f"group by {group_by}: the mapping gives no training image of the store a group: none of "
                         f"its {len(mapping)} entries is a key, relative path or file name of the store's {len(rows)} "
                         "images with a group name (is it the right file? a JSON object or CSV: key or file, group)")
    return (f"{group_by}: {named} of its {len(mapping)} entries name a training image; {grouped} of the "
            f"{len(rows)} training images have a group" + (f", {len(rows) - grouped} in \"(none)\""
                                                           if grouped < len(rows) else ""))


MAX_MAPPING_BYTES = 1 << 20  # what the app reads of a mapping (an upload or a file in the dataset folder)


def read_group_mapping(path: Path, max_bytes: int | None = None, name: str | None = None) -> dict[str, str]:
    """The group mapping in a JSON or CSV file.

    Only a regular file is read, and opening never waits (a FIFO would block forever).

    Args:
        path: The file; a ``.json`` suffix is read as JSON, anything else as CSV.
        max_bytes: Larger files are refused before reading past the limit; None reads any size.
        name: What errors call the file; None uses its path.

    Returns:
        Key, relative path or file name -> group.

    Raises:
        ValueError: When the file cannot be opened, is not a regular file, is larger than ``max_bytes``,
            is not UTF-8, or does not parse (``parse_group_mapping``).
    """
    label = name or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ValueError(f"{label}: cannot read the group mapping ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{label}: the group mapping is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{label}: the group mapping is larger than {max_bytes // 1024} KB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{label}: the group mapping is not UTF-8 text (a JSON object or a CSV file)") from None
    return parse_group_mapping(text, label, as_json=path.suffix.lower() == ".json")


def parse_group_mapping(text: str, label: str, as_json: bool) -> dict[str, str]:
    """Parse a group mapping: a JSON object, or CSV rows (key or file, group; a header row is skipped).

    Args:
        text: The file's text.
        label: What errors call the file; errors say where, never quote the text.
        as_json: Parse as JSON; False parses CSV.

    Returns:
        Key, relative path or file name -> group (CSV cells stripped of spaces).

    Raises:
        ValueError: When the JSON is invalid or not an object, or the CSV is unreadable or has a
            row with fewer than two columns.
    """
    if as_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{label}: not valid JSON ({json_error(exc)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{label}: expected a JSON object mapping keys or file names to groups")
        return {str(k): str(v) for k, v in data.items()}
    try:
        rows = [r for r in csv.reader(text.splitlines()) if r]
    except csv.Error as exc:
        raise ValueError(f"{label}: not a readable CSV file ({exc})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["key", "group"], ["file", "group"], ["path", "group"]):
        rows = rows[1:]
    bad = [n for n, r in enumerate(rows, 1) if len(r) < 2]
    if bad:
        raise ValueError(f"{label}: line {bad[0]}: expected two columns (key or file, group)")
    return {r[0].strip(): r[1].strip() for r in rows}


def read_mapping_inside(root: Path, relpath: str, max_bytes: int = MAX_MAPPING_BYTES) -> dict[str, str]:
    """``file:PATH`` for a caller who may only name files of the dataset folder (the app's users):
    a relative path without "..", resolving (symlinks too) inside ``root``. The refusal is the same
    whether or not the path exists outside, so it tells nothing about the server's files.

    Args:
        root: The dataset folder.
        relpath: The mapping's path relative to ``root``.
        max_bytes: Larger files are refused.

    Returns:
        Key, relative path or file name -> group.

    Raises:
        ValueError: When ``relpath`` is empty, absolute, has "..", a backslash, a NUL or a leading "~",
            or resolves outside ``root``; or when the file cannot be read (``read_group_mapping``).
    """
    shown = relpath if len(relpath) <= 80 else relpath[:79] + "…"
    refusal = ValueError(f"file:{shown}: a group mapping must be a file inside the dataset folder, named by "
                         "its relative path (or upload the mapping)")
    parts = Path(relpath).parts
    if not relpath or Path(relpath).is_absolute() or ".." in parts or "\\" in relpath or "\0" in relpath \
            or relpath.startswith("~"):
        raise refusal
    root = Path(root).resolve()
    target = (root / relpath).resolve()
    if not target.is_relative_to(root) or target == root:
        raise refusal
    return read_group_mapping(target, max_bytes, name=f"file:{shown}")


# ---------------------------------------------------------------------------------------------
# The run

def inspect_generations(attributor: Attributor, queries: Iterator[tuple[Generation, torch.Tensor]], total: int,
                        settings: InspectSettings | None = None, group_by: str | None = None,
                        progress: Progress | None = None, mapping: dict[str, str] | None = None) -> Inspection:
    """Attribute every generation (batched) and roll the credit up per training image and group.

    Args:
        attributor: The attributor of the store inspected.
        queries: ``(generation, latents)`` pairs (``generate_queries``, ``image_queries``).
        total: Number of queries, for progress reports.
        settings: The settings; None uses the defaults.
        group_by: The grouping (see ``training_groups``); None: no groups.
        progress: Called as ``progress(done, total, generation id)`` for each query; None: silent.
        mapping: A ``file:`` group mapping the caller has read (see ``training_groups``).

    Returns:
        The inspection.

    Raises:
        QueryError: When ``queries`` yields nothing (or a query cannot be attributed).
        ValueError: When the store lacks the method's feature set or ``group_by`` is refused
            (``training_groups``).
    """
    settings = settings or InspectSettings()
    m = attributor.require_method(settings.method)
    groups = training_groups(attributor, group_by, mapping) if group_by else None
    generations, score_rows, effect_rows = [], [], []
    batch: list[tuple[Generation, torch.Tensor]] = []

    def flush():
        latents = torch.cat([lat for _, lat in batch])
        prompts = [g.prompt for g, _ in batch]
        t = attributor.scores(latents, prompts, settings.method)
        score_rows.append(ranking(settings.method, t).double().cpu().numpy())
        effect_rows.append(t.double().cpu().numpy())
        generations.extend(g for g, _ in batch)
        batch.clear()

    for item in queries:
        batch.append(item)
        if progress:
            progress(len(generations) + len(batch), total, item[0].id)
        if len(batch) == settings.batch_size:
            flush()
    if batch:
        flush()
    if not generations:
        raise QueryError("no generations to inspect")
    scores, effects = np.concatenate(score_rows), np.concatenate(effect_rows)
    shares, signed = credit_shares(scores), signed_shares(effects)
    rows = attributor.rows
    signals = image_signals(attributor.store, m.feature_set, settings.duplicate_threshold,
                            settings.outlier_threshold) if m.feature_set else None
    return Inspection(
        settings=settings, store_id=attributor.store.store_id, group_by=group_by, generations=generations,
        keys=[r.key for r in rows], paths=list(attributor.paths), captions=[r.caption for r in rows], groups=groups,
        scores=scores, effects=effects, shares=shares, signed=signed,
        credits=image_credits(shares, signed, settings.top_k, settings.per_image_generations),
        group_credits=group_credits(shares, groups, settings.bootstrap, settings.seed) if groups else [],
        signals=signals)
