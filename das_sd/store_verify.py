"""`das-sd verify`: check a whole store against its manifest (schema, checksums, row counts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .store import MANIFEST, FeatureStore
from .store_integrity import StoreError, checksum_problem, damaged_message, require_identity


@dataclass
class Report:
    """What ``verify_store`` found in one store.

    Attributes:
        root: The store directory, resolved.
        problems: Damage, one line each naming the file; empty when the store is sound.
        notes: Worth knowing but not damage (out-of-date indexes, files the manifest does not list).
        files: How many files the manifest lists.
        checked: How many of them matched their checksum and row count.
        unverified: Files with no checksum recorded (written by an older das-sd).
        bytes_read: Bytes of the files read for checking.
    """

    root: Path
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    notes: list[str] = field(default_factory=list)  # worth knowing, not damage
    files: int = 0  # files the manifest lists
    checked: int = 0  # files whose checksum matched
    unverified: list[str] = field(default_factory=list)  # no checksum recorded (an older das-sd)
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        """Whether no problem was found (notes and unverified files do not count)."""
        return not self.problems

    def summary(self) -> str:
        """One line for the terminal: the store, files checked, unverified files and problem count.

        Returns:
            The line, starting with ``root``.
        """
        parts = [f"{self.checked} of {self.files} file(s) match their checksums"]
        if self.unverified:
            parts.append(f"{len(self.unverified)} unverified (no checksum recorded: written by an older das-sd; "
                         "reading them is not checked)")
        parts.append(f"{len(self.problems)} problem(s)" if self.problems else "no problems")
        return f"{self.root}: " + "; ".join(parts)


def verify_store(root: str | Path, progress: bool = True) -> Report:
    """Check a whole store: the manifest's schema, then every file it lists against its checksum
    and its row count; notes out-of-date indexes and files the manifest does not list.

    Args:
        root: The store directory (``~`` expanded).
        progress: Show a progress bar (only when the files total 256 MiB or more).

    Returns:
        The ``Report``; a store that cannot be opened is a report with that one problem, not an error.
    """
    from safetensors import safe_open
    from tqdm.auto import tqdm

    root = Path(root).expanduser().resolve()
    report = Report(root)
    try:
        store = FeatureStore.open(root, clean=False)
    except StoreError as exc:
        report.problems.append(str(exc))
        return report
    try:
        require_identity(root / MANIFEST, store.identity, needed_by="das-sd index and attribute")
    except StoreError as exc:
        report.problems.append(str(exc))
    shard_rows = [s["rows"] for s in store.manifest["shards"]]
    listed: list[tuple[str, int | None]] = [(s["file"], s["rows"]) for s in store.manifest["shards"]]
    for name in sorted(store.manifest["indexes"]):
        files = store.index_files(name)
        if not store.index_is_current(name):
            report.notes.append(f"index {name!r} is out of date (rows were added since); "
                                f"run `das-sd index --store {root}`")
            listed += [(file, None) for file in files]
        elif len(files) == len(shard_rows):
            listed += list(zip(files, shard_rows))
        elif len(files) == 1:  # one file for all rows, as the first das-sd wrote it
            listed.append((files[0], len(store)))
        else:
            report.problems.append(f"{root / MANIFEST}: index {name!r} lists {len(files)} file(s) for "
                                   f"{len(shard_rows)} shard(s); run `das-sd index --store {root}`")
            listed += [(file, None) for file in files]
    report.files = len(listed)
    sizes = {file: (root / file).stat().st_size for file, _ in listed if (root / file).is_file()}
    bar = tqdm(total=sum(sizes.values()), desc="verify", unit="B", unit_scale=True,
               disable=not progress or sum(sizes.values()) < (256 << 20))
    for file, rows in listed:
        path = root / file
        if file not in sizes:
            report.problems.append(f"{path}: missing (listed in the manifest)")
            continue
        expected = store.checksum(file)
        problem = checksum_problem(path, expected)
        if problem is None:
            problem = _rows_problem(safe_open, path, rows)
        if problem:
            report.problems.append(damaged_message(path, root, problem) if expected else f"{path}: {problem}")
        elif expected is None:
            report.unverified.append(file)
        else:
            report.checked += 1
        report.bytes_read += sizes[file]
        bar.update(sizes[file])
    bar.close()
    known = {file for file, _ in listed}
    stray = sorted(p.name for p in root.glob("*.safetensors") if p.name not in known)
    if stray:
        report.notes.append(f"{len(stray)} file(s) not listed in the manifest ({', '.join(stray[:3])}"
                            f"{', ...' if len(stray) > 3 else ''}): left by an interrupted run; "
                            "`das-sd index` removes unlisted index files, a featurize rerun overwrites shards")
    return report


def _rows_problem(safe_open, path: Path, rows: int | None) -> str | None:
    """A file that does not parse, or whose arrays do not have the manifest's row count."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            counts = {name: fh.get_slice(name).get_shape()[:1] for name in fh.keys()}
    except Exception as exc:
        return f"not a readable safetensors file ({exc})"
    wrong = sorted(name for name, count in counts.items() if rows is not None and count != [rows])
    return f"array(s) {wrong[:3]} do not have the {rows} rows the manifest lists" if wrong else None
