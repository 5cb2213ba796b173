"""Training groups of an inspection (docs/method.md §13): the group of every training image, by
folder, by a metadata column or by a mapping file, and the mapping files read safely (regular files
only, size-capped, and for the app's users only inside the dataset folder).
"""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.datasets import open_dataset
from ..io import json_error

if TYPE_CHECKING:
    from ..attribute import Attributor
    from ..store_manifest import Row


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
