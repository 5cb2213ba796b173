"""Inspect a LoRA's training data over many generations: which images drive it, which never matter,
which are duplicates or outliers, and how much credit each group (contributor, source) gets.

Generations come from prompts x seeds (generated here) or from a folder of generated PNGs with their
prompts in the metadata (das_sd.inspect.generations); query features are computed in batches and
scored as one matrix product; training images are grouped by das_sd.inspect.groups.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..attribute import Attributor
from ..attribute_queries import QueryError
from ..generation import GenerationSettings
from ..registry import DEFAULT_METHOD, METHOD_NAMES, check_choice
from ..score import ranking
from .groups import training_groups
from .rollup import (NORMALISATION, SIGNED_NORMALISATION, GroupCredit, ImageCredit, credit_shares,
                     group_credits, image_credits, signed_shares)
from .signals import DUPLICATE_SIMILARITY, OUTLIER_Z, ImageSignals, image_signals

Progress = Callable[[int, int, str], None]  # (done, total, what)


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
