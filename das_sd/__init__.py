"""das-sd: which training images made this? Diffusion Attribution Score for Stable Diffusion LoRA fine-tunes.

The public API is importable from the package root; submodules load lazily so that
``import das_sd`` stays cheap (torch and diffusers load on first use).
"""

from __future__ import annotations

import importlib

from .quiet import silence_known_warnings

__version__ = "0.1.0"

silence_known_warnings()  # before diffusers is imported anywhere (it triggers them)

_API = {
    "open_dataset": "das_sd.data.datasets",
    "Dataset": "das_sd.data.datasets",
    "Sample": "das_sd.data.datasets",
    "DatasetError": "das_sd.data.datasets",
    "make_demo_data": "das_sd.toy.demo_data",
    "load_ground_truth": "das_sd.data.ground_truth",
    "load_pipeline": "das_sd.models.loading",
    "load_lora": "das_sd.models.loading",
    "embedded_base_path": "das_sd.models.loading",
    "ModelError": "das_sd.models.loading",
    "LoraRecipe": "das_sd.lora_record",
    "train_lora": "das_sd.train",
    "GenerationSettings": "das_sd.generation",
    "GenerationResult": "das_sd.generation",
    "generate": "das_sd.generation",
    "save_png": "das_sd.png_metadata",
    "read_png_metadata": "das_sd.png_metadata",
    "prepare_demo": "das_sd.toy.demo",
    # dataset -> store -> scores: the attribution API
    "FeaturizerSettings": "das_sd.featurize.settings",
    "featurize_dataset": "das_sd.featurize.build",
    "build_store": "das_sd.featurize.service",
    "index_store": "das_sd.featurize.service",
    "FeatureStore": "das_sd.store",
    "StoreError": "das_sd.store",
    "LambdaRule": "das_sd.ridge",
    "build_indexes": "das_sd.score",
    "METHODS": "das_sd.registry",
    "Attributor": "das_sd.attribute",
    "Attribution": "das_sd.attribute_results",
    "AttributionRow": "das_sd.attribute_results",
    "attribute_file": "das_sd.attribute",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'das_sd' has no attribute {name!r}")
