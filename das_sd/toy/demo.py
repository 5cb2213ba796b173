"""The embedded demo: base model + demo dataset + demo LoRA, ready with one call.

The demo LoRA ships inside the package (trained by ``make demo-lora`` with the default recipe). It
is used only if its record matches the demo data written on this machine and the embedded base;
otherwise a fresh one is trained into the demo folder with the same recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..data.datasets import open_dataset
from .demo_data import make_demo_data
from ..lora_record import LORA_WEIGHT_NAME, LoraRecipe, read_record
from ..models.fingerprint import das_sd_home, model_fingerprint
from ..models.loading import embedded_base_path, embedded_demo_lora_path
from ..train import train_lora

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import StableDiffusionPipeline

    from ..data.datasets import Dataset

DEMO_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background, striped style",
    "a white triangle on a green background, checkered style",
    "a blue circle on a yellow background, dotted style",
    "zorblat, a green square on a orange background",
    "quimvex, a orange circle on a purple background",
)


def demo_home(workdir: str | Path | None = None) -> Path:
    """The demo's working folder (data, retrained LoRA, store, samples).

    Args:
        workdir: The folder to use; None: ``demo`` under das-sd's home (``$DAS_SD_HOME``, default
            ``~/.cache/das-sd``).

    Returns:
        The folder (``workdir`` expanded and resolved); it is not created here.
    """
    return Path(workdir).expanduser().resolve() if workdir else das_sd_home() / "demo"


def _record_matches(lora_dir: Path, base_fp: str, data_fp: str) -> bool:
    record = read_record(lora_dir)
    return bool(record and (lora_dir / LORA_WEIGHT_NAME).is_file()
                and record.get("base_fingerprint") == base_fp and record.get("dataset_fingerprint") == data_fp)


def family_suffix(family: str) -> str:
    """The suffix of a family's folders in the demo home: the tiny SD's keep the plain names.

    Args:
        family: "sd" or "sdxl".

    Returns:
        "" for "sd", "-sdxl" for "sdxl".
    """
    return "" if family == "sd" else f"-{family}"


def prepare_demo(workdir: str | Path | None = None, progress: bool = True, with_store: bool = True,
                 family: str = "sd") -> dict:
    """Write the demo data if missing, find (or train) the matching demo LoRA and build the demo
    feature store and its index (resuming or skipping what is already there).

    Both families share the demo data; each has its own LoRA and store folders in the demo home
    (``lora`` / ``store`` for the tiny SD, ``lora-sdxl`` / ``store-sdxl`` for the tiny SDXL).

    Args:
        workdir: The demo's working folder; None: ``demo_home()``'s default.
        progress: Show progress bars (LoRA training, featurizing).
        with_store: Also build the store; False leaves it to first use (the app does).
        family: "sd": on the embedded tiny SD; "sdxl": on the embedded tiny SDXL.

    Returns:
        Paths as strings: "base", "lora" (the weights file), "data", "ground_truth", "workdir" and,
        with ``with_store``, "store"; and "family".

    Raises:
        ValueError: When ``family`` is neither "sd" nor "sdxl".
    """
    base = embedded_base_path(family)  # checks the family first
    suffix = family_suffix(family)
    home = demo_home(workdir)
    data = home / "data"
    if not (data / "metadata.jsonl").is_file():
        make_demo_data(data, overwrite=True)
    dataset = open_dataset(data)
    base_fp, data_fp = model_fingerprint(base), dataset.fingerprint()
    lora_dir = embedded_demo_lora_path(family)
    if not _record_matches(lora_dir, base_fp, data_fp):
        lora_dir = home / f"lora{suffix}"
        if not _record_matches(lora_dir, base_fp, data_fp):
            train_lora(base, dataset, lora_dir, LoraRecipe(), progress=progress)
    paths = {
        "base": str(base),
        "lora": str(lora_dir / LORA_WEIGHT_NAME),
        "data": str(data),
        "ground_truth": str(data / "ground_truth.json"),
        "workdir": str(home),
        "family": family,
    }
    if with_store:
        paths["store"] = str(build_demo_store(dataset, base, lora_dir / LORA_WEIGHT_NAME, home / f"store{suffix}",
                                                progress))
    return paths


def _default_settings() -> dict:
    from ..featurize.plan import default_feature_sets

    return {name: {k: v for k, v in s.to_dict().items() if k != "timesteps"}
            for name, s in default_feature_sets().items()}


def _stored_settings(store) -> dict:
    """The stored settings without the resolved timestep list (the defaults leave it to K)."""
    return {name: {k: v for k, v in s.items() if k != "timesteps"}
            for name, s in store.identity.get("feature_sets", {}).items()}


def build_demo_store(dataset: Dataset, base: Path, lora: Path, store_dir: Path, progress: bool = True,
                     pipe: StableDiffusionPipeline | None = None,
                     notify: Callable[[str], None] | None = None) -> Path:
    """Featurize the demo set with the default settings (resuming a partial store) and index it.

    The demo store is a cache: one built for another LoRA (the demo LoRA was retrained) or with other
    feature settings (a newer das-sd's defaults), or one that does not open, is deleted and rebuilt;
    a complete one is only re-indexed where its index is stale.

    Args:
        dataset: The demo dataset.
        base: The embedded base model folder.
        lora: The demo LoRA weights file.
        store_dir: The store folder.
        progress: Show progress bars.
        pipe: The base + LoRA pipeline when the caller has it loaded; None: loaded if needed.
        notify: Called with each stage's description and warnings; None drops them.

    Returns:
        The store's folder.
    """
    import shutil

    from ..featurize.service import build_store
    from ..models.fingerprint import lora_fingerprint
    from ..store import FeatureStore, StoreError

    if (store_dir / "manifest.json").is_file():
        try:
            store = FeatureStore.open(store_dir)
        except StoreError:
            store = None
        if store is None or store.identity.get("lora_fingerprint") != lora_fingerprint(lora) \
                or _stored_settings(store) != _default_settings():
            shutil.rmtree(store_dir)  # another LoRA, or the defaults changed since (a new das-sd)
    return build_store(dataset, store_dir, base, lora, pipe=pipe, reuse_complete=True, progress=progress,
                       notify=notify).root
