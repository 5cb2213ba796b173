"""The engine's dataset-level inspection (das_sd.inspect, docs/method.md §13): prompts x seeds
generated and attributed, the credit rolled up per training image and group, and the group mapping
checked before any model runs.

``InspectRequests`` is a mixin of ``Workbench``: it runs on the Workbench's lock, store and
``Attributor``, and the UI calls it as ``bench.inspect``, ``bench.groups``, ...
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..generation import shorten
from ..store import FeatureStore, StoreError
from .values import AppError

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from ..attribute import Attributor
    from ..inspect.inspection import Inspection, Progress
    from .values import AppConfig


class InspectRequests:
    """Inspection requests of ``Workbench``: the reports, their groups and the mappings behind them."""

    # provided by Workbench
    config: AppConfig
    lock: threading.RLock
    attributor: Attributor
    dataset_root: Callable[[], Path | None]

    @property
    def inspect_root(self) -> Path:
        """The folder under ``config.outdir`` that holds the inspection reports."""
        return Path(self.config.outdir) / "inspect"

    def inspect(self, prompts: list[str], seeds: int, method: str, top_k: int, group_by: str | None = None,
                progress: Progress | None = None,
                mapping_file: str | Path | None = None) -> tuple[Inspection, dict[str, Path]]:
        """Generate prompts x seeds, attribute them in batches and roll the credit up (das_sd.inspect,
        docs/method.md §13); the report files go to a new timestamped folder under ``inspect_root``.

        Args:
            prompts: One prompt per item; blank items and items starting with "#" are skipped.
            seeds: Seeds per prompt (0, 1, ..., seeds - 1).
            method: An attribution method name (das_sd.registry's ``METHOD_NAMES``).
            top_k: Training images credited per generation.
            group_by: "folder", "column:NAME" or "file:PATH" (a mapping inside the dataset folder);
                None: no groups.
            progress: Called with (done, total, generation id) as batches finish.
            mapping_file: An uploaded group mapping (JSON or CSV); it replaces ``group_by``.

        Returns:
            The ``Inspection`` and its report files by kind ("html", "json", "images_csv", "groups_csv", ...).

        Raises:
            AppError: When no prompt is left, the grouping is refused (see ``groups``) or the store is
                not ready.
        """
        from ..inspect import InspectSettings, generate_queries, inspect_generations

        prompts = [p.strip() for p in prompts if p.strip() and not p.strip().startswith("#")]
        if not prompts:
            raise AppError("type one or more prompts, one per line")
        group_by, mapping = self.groups(group_by, mapping_file)  # before minutes of generating
        with self.lock:
            attributor = self.attributor
            out = self.inspect_root / time.strftime("%Y-%m-%d-%H%M%S")
            settings = InspectSettings(method=method, top_k=int(top_k))
            queries = generate_queries(attributor, prompts, int(seeds), out / "generations", settings)
            inspection = inspect_generations(attributor, queries, len(prompts) * int(seeds), settings,
                                             group_by or None, progress, mapping)
            return inspection, inspection.save(out)

    def groups(self, group_by: str | None, mapping_file: str | Path | None = None) -> tuple[str | None, dict | None]:
        """(group_by, mapping) for the inspection, checked before any generating.

        Requests never name a server path: a mapping is an upload (size-capped) or, as ``file:PATH``,
        a file of the dataset folder.

        Args:
            group_by: "folder", "column:NAME" or "file:PATH" (relative to the dataset folder); None or
                blank: no groups.
            mapping_file: An uploaded mapping file (JSON object or CSV); it replaces ``group_by``.

        Returns:
            The grouping (``file:NAME`` for an upload, None for none) and the mapping read (training
            key or file -> group), or None when the grouping needs none.

        Raises:
            AppError: When the mapping cannot be read, lies outside the dataset folder, is too large
                or matches no training image, when there is no dataset folder for ``file:PATH``, or
                when ``group_by`` is none of the accepted forms.
        """
        from ..inspect import MAX_MAPPING_BYTES, read_group_mapping, read_mapping_inside

        group_by = (group_by or "").strip() or None
        try:
            if mapping_file:
                name = Path(mapping_file).name
                group_by = f"file:{name}"
                mapping = read_group_mapping(Path(mapping_file), MAX_MAPPING_BYTES, name=f"the uploaded mapping {name}")
            elif group_by and group_by.startswith("file:"):
                root = self.dataset_root()
                if root is None:
                    raise AppError("there is no dataset folder to read file:PATH from: upload the mapping instead")
                mapping = read_mapping_inside(root, group_by.split(":", 1)[1].strip())
            else:
                mapping = None
            if mapping is not None:
                self.mapping_coverage(group_by, mapping)  # a mapping that matches nothing: refused now
                return group_by, mapping
        except AppError:
            raise
        except ValueError as exc:
            raise AppError(str(exc)) from None
        if group_by and group_by != "folder" and not group_by.startswith("column:"):
            raise AppError(f"Group by {shorten(group_by, 60)!r}: expected folder, column:NAME or file:PATH "
                           "(a mapping inside the dataset folder), or upload a mapping")
        return group_by, None

    def mapping_coverage(self, group_by: str, mapping: dict) -> str | None:
        """How much of the store's training images a group mapping covers (das_sd.inspect's line).

        Args:
            group_by: The grouping's name, used in messages ("file:NAME").
            mapping: Training key or file -> group.

        Returns:
            A line for the user, or None while there is no store (or no training image) to compare with.

        Raises:
            ValueError: When the mapping gives no training image a group.
        """
        from ..inspect.groups import mapping_coverage

        try:
            rows = FeatureStore.open(self.config.store).rows()
        except StoreError:
            return None
        return mapping_coverage(rows, mapping, group_by) if rows else None
