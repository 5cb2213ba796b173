"""What a featurization is to do, decided before any model runs: the job, the rows of a dataset, the
checks a store must pass against it, and which blocks of the work a part (``--shard I/N``) takes.

The work of a featurization is the list of blocks ``store.plan(rows)``: the samples missing from the
store, cut into shard-sized blocks in dataset order. Part i of n takes blocks i, i + n, ... into its
own partial store ``STORE/parts/part-i-of-n/`` (see ``das_sd.featurize.parallel``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data.datasets import Dataset, open_dataset
from ..registry import AUTOCAST_DTYPES, DEFAULT_AUTOCAST, FEATURE_SETS, check_choice
from ..store import FeatureStore, StoreError
from ..store_manifest import MANIFEST, Row, blocks_of
from .settings import FeaturizerSettings

PARTS = "parts"


def default_feature_sets(base: FeaturizerSettings | None = None) -> dict[str, FeaturizerSettings]:
    """The das, dtrak and trak feature sets of one store (docs/method.md §8).

    Args:
        base: Settings of the das set; the dtrak (f = square) and trak (f = loss) sets share its
            timesteps, seeds and projector, without normalisation or residual. None: the defaults.

    Returns:
        Feature set name -> settings, in the order das, dtrak, trak.
    """
    base = base or FeaturizerSettings()
    return {
        "das": base,
        "dtrak": replace(base, output="square", normalize=False, residual="none"),
        "trak": replace(base, output="loss", normalize=False, residual="none"),
    }


@dataclass(frozen=True)
class FeaturizeJob:
    """One featurization as plain values: what `das-sd featurize` was asked, and everything a Ray
    worker needs to redo it in its own process (it opens the dataset and loads the model itself).

    Attributes:
        store: Folder of the feature store.
        data: Folder of the training dataset.
        base: Base pipeline folder; None for the embedded tiny SD.
        lora: LoRA file or folder; needed to compute features, not to merge parts.
        settings: Settings of the das feature set; the other sets derive from it.
        sets: Names of the feature sets to compute, some of "das", "dtrak", "trak".
        dataset_options: Keyword arguments of ``open_dataset`` (format, caption_column, ...).
        batch_size: Samples per forward / backward pass.
        shard_size: Samples per store shard (and per block of work).
        device: Torch device name; None for CUDA when available, else the CPU.
        autocast: The --autocast flag, a key of das_sd.registry.AUTOCAST_DTYPES ("fp32": none).
        allow_partial: Featurize a LoRA some of whose parameters das-sd cannot differentiate (see
            ``das_sd.featurize.lora_layers``), over the rest; what is left out is recorded.
        max_memory: Bytes one forward / backward pass may take (``--max-memory``); None: most of
            what the device has free.
        resolution: Image side in pixels; None: the LoRA's training resolution when its files
            record it, else the model's native one.
        buckets: Aspect-ratio buckets, "auto", "on" or "off" (``featurize.build.bucket_spec``).
    """
    store: str | Path
    data: str | Path
    base: str | Path | None = None  # None: the embedded tiny SD
    lora: str | Path | None = None  # needed to compute features; merging parts goes without
    settings: FeaturizerSettings = field(default_factory=FeaturizerSettings)  # of the das set; the others derive
    sets: tuple[str, ...] = FEATURE_SETS
    dataset_options: dict = field(default_factory=dict)  # open_dataset's format, caption_column, ...
    batch_size: int = 16
    shard_size: int = 256
    device: str | None = None
    autocast: str = DEFAULT_AUTOCAST  # a key of registry.AUTOCAST_DTYPES
    allow_partial: bool = False
    max_memory: int | None = None
    resolution: int | None = None
    buckets: str = "auto"

    def feature_sets(self) -> dict[str, FeaturizerSettings]:
        """The settings of the job's feature sets (``sets``), derived from ``settings``.

        Returns:
            Feature set name -> settings, in the order of ``sets``.

        Raises:
            ValueError: When ``sets`` is empty or names an unknown feature set.
        """
        every = default_feature_sets(self.settings)
        unknown = [s for s in self.sets if s not in every]
        if not self.sets:
            raise ValueError(f"--feature-sets: none given; expected some of {sorted(every)}")
        if unknown:
            raise ValueError(f"--feature-sets: unknown {unknown}; expected some of {sorted(every)}")
        return {name: every[name] for name in self.sets}

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``autocast``: None for fp32 (no autocast)."""
        return autocast_dtype(self.autocast)

    def open_dataset(self) -> Dataset:
        """Open the job's dataset with its ``dataset_options``.

        Returns:
            The dataset at ``data``.
        """
        return open_dataset(self.data, **self.dataset_options)


def autocast_dtype(name: str) -> torch.dtype | None:
    """The dtype of an --autocast flag.

    Args:
        name: "fp32", "fp16" or "bf16" (the keys of das_sd.registry.AUTOCAST_DTYPES).

    Returns:
        None for fp32 (no autocast), else torch.float16 or torch.bfloat16.

    Raises:
        ValueError: When ``name`` is not a known flag (raised by ``check_choice``).
    """
    check_choice("--autocast", name, AUTOCAST_DTYPES)
    return None if AUTOCAST_DTYPES[name] == "float32" else getattr(torch, AUTOCAST_DTYPES[name])


def feature_set_names(text: str) -> tuple[str, ...]:
    """Split a --feature-sets value: 'das, trak' -> ('das', 'trak').

    Args:
        text: Comma-separated feature set names; blanks around and between them are dropped.

    Returns:
        The names, in the order given (not checked here; see ``FeaturizeJob.feature_sets``).
    """
    return tuple(s.strip() for s in text.split(",") if s.strip())


def rows_of(dataset: Dataset) -> list[Row]:
    """The store rows of a dataset's samples.

    Args:
        dataset: The training dataset.

    Returns:
        One ``Row(key, relpath, caption)`` per sample, in dataset order.
    """
    return [Row(s.key, s.relpath, s.caption) for s in dataset]


def check_dataset(store: FeatureStore, dataset: Dataset) -> None:
    """Check that every stored row is still in the dataset (same image bytes and caption).

    Args:
        store: The feature store (or partial store) to be extended.
        dataset: The dataset being featurized into it.

    Raises:
        StoreError: When some stored sample's key is not in ``dataset`` (removed or changed).
    """
    have = set(dataset.keys)
    gone = [r for r in store.rows() if r.key not in have]
    if gone:
        examples = ", ".join(r.path for r in gone[:3])
        raise StoreError(f"{store.root}: {len(gone)} stored sample(s) are not in the dataset {dataset.root} "
                         f"(removed, or image / caption changed), e.g. {examples}. "
                         "Featurize into a new --store folder.")


def whole_work(store_dir: str | Path, identity: dict, info: dict, dataset: Dataset,
               shard_size: int) -> tuple[FeatureStore, list[tuple[int, list[Row]]]]:
    """The store (created, or resumed if its identity matches) and its blocks still to do.

    Args:
        store_dir: Folder of the feature store.
        identity: The store identity (``build.store_identity``) the store must have.
        info: Descriptive manifest fields (paths, versions) written into the store's ``info``.
        dataset: The dataset to featurize.
        shard_size: Samples per shard and per block.

    Returns:
        The store and its blocks as (block number, rows), the samples it lacks in dataset order.

    Raises:
        StoreError: When an existing store has another identity or holds samples no longer in
            ``dataset``.
    """
    store = FeatureStore.open_or_create(store_dir, identity, shard_size=shard_size, info=info)
    check_dataset(store, dataset)
    return store, list(enumerate(store.plan(rows_of(dataset))))


def parse_part(text: str) -> tuple[int, int]:
    """Parse a --shard value: 'I/N' (0 <= I < N) -> (I, N).

    Args:
        text: The value, e.g. "0/4"; blanks around the numbers are allowed.

    Returns:
        (I, N): this part's number and the number of parts.

    Raises:
        ValueError: When ``text`` is not of the form I/N with 0 <= I < N.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def part_dir(store_dir: str | Path, part: tuple[int, int]) -> Path:
    """The folder of a part's partial store.

    Args:
        store_dir: Folder of the (main) feature store.
        part: (I, N) as from ``parse_part``.

    Returns:
        ``STORE/parts/part-III-of-NNN`` (numbers zero-padded to 3 digits), absolute.
    """
    return Path(store_dir).expanduser().resolve() / PARTS / f"part-{part[0]:03d}-of-{part[1]:03d}"


def _main_store_rows(store_dir: Path, identity: dict) -> tuple[set[str], int]:
    if (store_dir / MANIFEST).is_file():
        store = FeatureStore.open(store_dir, identity)
        return set(store.keys()), len(store)
    return set(), 0


def part_work(store_dir: str | Path, identity: dict, info: dict, dataset: Dataset, shard_size: int,
              part: tuple[int, int]) -> tuple[FeatureStore, list[tuple[int, list[Row]]]]:
    """The partial store of ``part`` and its blocks still to do, as (block number, rows).

    Blocks are cut from the samples the main store lacks; part I of N takes blocks I, I + N, ...

    Args:
        store_dir: Folder of the main feature store (it need not exist yet).
        identity: The store identity the main store and the part must have.
        info: Descriptive manifest fields; the part adds ``part`` and ``base_rows``.
        dataset: The dataset to featurize.
        shard_size: Samples per shard and per block.
        part: (I, N) as from ``parse_part``.

    Returns:
        The partial store and its blocks not yet done, as (block number, rows).

    Raises:
        StoreError: When the main store or the part has another identity, the main store's row
            count changed since the part was planned, or the part holds samples no longer in ``dataset``.
    """
    store_dir = Path(store_dir).expanduser().resolve()
    have, base_rows = _main_store_rows(store_dir, identity)
    rows = [r for r in rows_of(dataset) if r.key not in have]
    mine = [(j, block) for j, block in enumerate(blocks_of(rows, shard_size)) if j % part[1] == part[0]]
    folder = part_dir(store_dir, part)
    if (folder / MANIFEST).is_file():  # read before open_or_create records today's count over it
        planned = FeatureStore.open(folder, identity).manifest["info"].get("base_rows")
        if planned != base_rows:
            raise StoreError(f"{folder}: this part was planned when {store_dir} held {planned} rows, it now "
                             f"holds {base_rows}; delete {folder.parent} and featurize the parts again")
    store = FeatureStore.open_or_create(folder, identity, shard_size=shard_size,
                                        info=info | {"part": list(part), "base_rows": base_rows})
    check_dataset(store, dataset)
    done = set(store.keys())
    return store, [(j, block) for j, block in mine if block[0].key not in done]
