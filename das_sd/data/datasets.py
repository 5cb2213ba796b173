"""Fine-tuning datasets: Hugging Face imagefolder (metadata.jsonl / .csv) and kohya sd-scripts folders.

Every sample gets a stable key from its image bytes and caption, never from its position, so a key
names the same training example across runs, orderings and dataset edits. Exact duplicates (same
bytes, same caption) stay distinct samples: the second occurrence gets the suffix ``~2``, and so on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from ..io import json_error

from .images import ImageError, load_image, verify_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """A problem with a dataset; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Sample:
    """One training example: an image file and its caption.

    Attributes:
        key: Stable key from the image bytes and caption (``sample_key``), with ``~2``, ``~3``, ...
            appended for repeated pairs.
        path: The image file, absolute.
        relpath: The image path relative to the dataset root, with forward slashes.
        caption: The caption, stripped.
        repeats: kohya repeat count of its folder (1 for imagefolder).
        group: The kohya folder name, or "".
        metadata: The imagefolder metadata row's other columns; not part of equality or hash.
    """
    key: str
    path: Path  # absolute
    relpath: str  # relative to the dataset root, with forward slashes
    caption: str
    repeats: int = 1
    group: str = ""  # kohya folder name, or empty
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Skipped:
    """A sample left out by ``skip_bad``, and why; ``str()`` gives "path (line N): reason".

    Attributes:
        path: The file at fault (the metadata file, the image or its caption file).
        line: The metadata line number, or None.
        reason: What is wrong with it.
    """
    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}" + (f" (line {self.line})" if self.line else "")
        return f"{where}: {self.reason}"


@dataclass
class Dataset:
    """A fine-tuning dataset: its samples in order, iterable and sized like a list of ``Sample``.

    Attributes:
        root: The dataset folder, absolute.
        format: "imagefolder" or "kohya".
        samples: The usable samples, in dataset order.
        skipped: The samples left out by ``skip_bad``.
    """
    root: Path
    format: str
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def keys(self) -> list[str]:
        """The sample keys, in dataset order."""
        return [s.key for s in self.samples]

    def fingerprint(self) -> str:
        """Hash of the ordered sample keys: changes when any image or caption changes.

        Returns:
            "sha256:" followed by the hex digest.
        """
        digest = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()
        return f"sha256:{digest}"

    def by_key(self) -> dict[str, Sample]:
        """The samples by key.

        Returns:
            Key -> sample, in dataset order.
        """
        return {s.key: s for s in self.samples}

    def subset(self, keys: Iterable[str]) -> "Dataset":
        """The samples named by ``keys``, in dataset order. Unknown keys are an error.

        Args:
            keys: Sample keys; order and repeats do not matter.

        Returns:
            A dataset with the same root and format, those samples, and no skipped list.

        Raises:
            DatasetError: When some key is not in the dataset.
        """
        wanted = set(keys)
        unknown = wanted - set(self.keys)
        if unknown:
            raise DatasetError(f"{self.root}: {len(unknown)} subset key(s) not in the dataset, "
                               f"e.g. {sorted(unknown)[:3]}")
        return Dataset(self.root, self.format, [s for s in self.samples if s.key in wanted], [])

    def load_image(self, sample: Sample) -> Image.Image:
        """A sample's image, EXIF-rotated, as RGB (see ``images.load_image``).

        Args:
            sample: One of the dataset's samples.

        Returns:
            The 8-bit RGB image at full size.
        """
        return load_image(sample.path)


def sample_key(image_bytes: bytes, caption: str) -> str:
    """A sample's stable key: sha256 of the image bytes, a zero byte and the caption (docs/method.md §4).

    Args:
        image_bytes: The image file's bytes, as stored.
        caption: The caption, as read.

    Returns:
        The first 20 hex characters of the digest.
    """
    h = hashlib.sha256(image_bytes)
    h.update(b"\0")
    h.update(caption.encode("utf-8"))
    return h.hexdigest()[:20]


def open_dataset(root: str | Path, format: str = "auto", caption_column: str = "text",
                 caption_extension: str | None = None, skip_bad: bool = False) -> Dataset:
    """Read a dataset folder. ``format``: auto, imagefolder or kohya.

    Args:
        root: The dataset folder.
        format: "auto" (detect), "imagefolder" or "kohya".
        caption_column: The imagefolder metadata column holding captions.
        caption_extension: The kohya caption file suffix; None tries ".caption", then ".txt".
        skip_bad: Leave out unreadable images and bad metadata rows (listed in ``skipped``)
            instead of raising.

    Returns:
        The dataset, its samples in dataset order.

    Raises:
        DatasetError: When the folder is missing, its format is unknown or undetectable, it has
            no usable sample, or (without ``skip_bad``) a sample is bad; the message names the file.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if format == "auto":
        format = detect_format(root)
    if format == "imagefolder":
        return read_imagefolder(root, caption_column=caption_column, skip_bad=skip_bad)
    if format == "kohya":
        return read_kohya(root, caption_extension=caption_extension, skip_bad=skip_bad)
    raise DatasetError(f"unknown dataset format {format!r}; expected auto, imagefolder or kohya")


def detect_format(root: Path) -> str:
    """The format of a dataset folder.

    Args:
        root: The dataset folder.

    Returns:
        "imagefolder" when it (or its ``train/``) has a metadata.jsonl / metadata.csv, else "kohya"
        when it has a subfolder named N_name.

    Raises:
        DatasetError: When it is neither.
    """
    if _metadata_file(root) is not None:
        return "imagefolder"
    if any(d.is_dir() and KOHYA_FOLDER.match(d.name) for d in root.iterdir()):
        return "kohya"
    raise DatasetError(f"{root}: neither an imagefolder (metadata.jsonl / metadata.csv) nor a kohya "
                       "folder (subfolders named N_name)")


def _metadata_file(root: Path) -> Path | None:
    for folder in (root, root / "train"):
        for name in ("metadata.jsonl", "metadata.csv"):
            if (folder / name).is_file():
                return folder / name
    return None


class _Collector:
    """Builds samples, assigning keys (with duplicate suffixes) and handling --skip-bad."""

    def __init__(self, root: Path, skip_bad: bool):
        self.root, self.skip_bad = root, skip_bad
        self.samples: list[Sample] = []
        self.skipped: list[Skipped] = []
        self._seen: Counter[str] = Counter()

    def fail(self, path: Path | str, line: int | None, reason: str) -> None:
        item = Skipped(str(path), line, reason)
        if not self.skip_bad:
            raise DatasetError(str(item))
        self.skipped.append(item)

    def add(self, path: Path, caption: str, line: int | None, source: Path | None = None, **extra) -> None:
        """Add one image; ``source`` (the metadata file) is named in errors when given, with ``line``."""
        rel = path.relative_to(self.root).as_posix()
        where = source or path
        try:
            data = path.read_bytes()
        except OSError as exc:
            return self.fail(where, line, f"{rel}: cannot read image ({exc.strerror or exc})")
        try:
            verify_image(data, rel)  # decoded once to find truncated files, no converted copy
        except ImageError as exc:
            return self.fail(where, line, str(exc))
        key = sample_key(data, caption)
        self._seen[key] += 1
        if self._seen[key] > 1:
            key = f"{key}~{self._seen[key]}"
        self.samples.append(Sample(key=key, path=path, relpath=rel, caption=caption, **extra))


def _caption_from(value, column: str) -> str:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"missing or empty caption column {column!r}")
    return value.strip()


def _metadata_rows(meta: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, row, error) for each row of metadata.jsonl / metadata.csv."""
    if meta.suffix == ".jsonl":
        with meta.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, None, f"malformed JSON ({json_error(exc)})"
                    continue
                yield (n, row, None) if isinstance(row, dict) else (n, None, "line is not a JSON object")
    else:
        with meta.open(encoding="utf-8", newline="") as fh:
            for n, row in enumerate(csv.DictReader(fh), 2):
                yield n, dict(row), None


def read_imagefolder(root: Path, caption_column: str = "text", skip_bad: bool = False) -> Dataset:
    """Hugging Face imagefolder layout: images listed with their captions in metadata.jsonl / .csv.

    The metadata file may sit in ``root`` or ``root/train``; each row names its image in
    ``file_name`` (relative to the metadata file, inside ``root``).

    Args:
        root: The dataset folder, absolute.
        caption_column: The column holding captions (a list column: its first non-empty string).
        skip_bad: Leave out bad rows and images (listed in ``skipped``) instead of raising.

    Returns:
        The dataset, its samples in metadata order; the other columns in ``Sample.metadata``.

    Raises:
        DatasetError: When there is no metadata file, no usable sample, or (without ``skip_bad``)
            a bad row or image; the message names the file and line.
    """
    meta = _metadata_file(root)
    if meta is None:
        raise DatasetError(f"{root}: no metadata.jsonl or metadata.csv")
    folder = meta.parent
    out = _Collector(root, skip_bad)
    for n, row, error in _metadata_rows(meta):
        if error:
            out.fail(meta, n, error)
            continue
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            out.fail(meta, n, "missing 'file_name'")
            continue
        path = (folder / name).resolve()
        if not path.is_relative_to(root):
            out.fail(meta, n, f"file_name {name!r} points outside the dataset folder")
            continue
        if not path.is_file():
            out.fail(meta, n, f"image {name!r} not found")
            continue
        try:
            caption = _caption_from(row.get(caption_column), caption_column)
        except ValueError as exc:
            out.fail(meta, n, f"{exc} for {name!r}")
            continue
        extra = {k: v for k, v in row.items() if k not in ("file_name", caption_column)}
        out.add(path, caption, n, source=meta, metadata=extra)
    if not out.samples:
        raise DatasetError(f"{meta}: no usable samples")
    return Dataset(root, "imagefolder", out.samples, out.skipped)


def read_kohya(root: Path, caption_extension: str | None = None, skip_bad: bool = False) -> Dataset:
    """kohya sd-scripts DreamBooth layout: ``N_name/img.png`` with ``img.caption`` or ``img.txt``.

    N is the folder's repeat count; an image without a caption file takes the folder's name (its
    underscores as spaces) as caption.

    Args:
        root: The dataset folder, absolute.
        caption_extension: The caption file suffix; None tries ".caption", then ".txt".
        skip_bad: Leave out bad images and caption files (listed in ``skipped``) instead of raising.

    Returns:
        The dataset, its samples by folder, then file name.

    Raises:
        DatasetError: When there is no N_name folder, a repeat count is below 1, no image is usable,
            or (without ``skip_bad``) an image or caption file is bad.
    """
    out = _Collector(root, skip_bad)
    extensions = [caption_extension] if caption_extension else [".caption", ".txt"]
    folders = sorted(d for d in root.iterdir() if d.is_dir() and KOHYA_FOLDER.match(d.name))
    if not folders:
        raise DatasetError(f"{root}: no kohya image folders (named N_name, e.g. 10_mystyle)")
    for folder in folders:
        repeats_text, name = KOHYA_FOLDER.match(folder.name).groups()
        repeats = int(repeats_text)
        if repeats < 1:
            raise DatasetError(f"{folder}: repeat count must be at least 1")
        fallback = " ".join(name.replace("_", " ").split())
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            caption = None
            for ext in extensions:
                cap_file = path.with_suffix(ext)
                if cap_file.is_file():
                    try:
                        caption = cap_file.read_text(encoding="utf-8").strip().splitlines()[0].strip()
                    except (UnicodeDecodeError, IndexError):
                        caption = ""
                    if not caption:
                        out.fail(cap_file, None, "caption file is empty or not UTF-8")
                    break
            else:
                caption = fallback
                if not caption:
                    out.fail(path, None, f"no caption file ({' or '.join(extensions)}) and folder "
                                         f"{folder.name!r} has no name to use as caption")
                    continue
            if caption:
                out.add(path.resolve(), caption, None, repeats=repeats, group=folder.name)
    if not out.samples:
        raise DatasetError(f"{root}: no usable images in the kohya folders")
    return Dataset(root, "kohya", out.samples, out.skipped)


def skipped_note(dataset: Dataset) -> str | None:
    """What to tell the user about the samples a ``skip_bad`` read left out, one per line, escaped.

    Args:
        dataset: a dataset as ``open_dataset`` returns it.

    Returns:
        The note, or None when nothing was skipped.
    """
    if not dataset.skipped:
        return None
    from ..io import printable

    return "\n".join([f"skipped {len(dataset.skipped)} bad sample(s):",
                      *(f"  {printable(item)}" for item in dataset.skipped)])
