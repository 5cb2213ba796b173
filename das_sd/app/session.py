"""The app's engine, free of any UI: one model + store shared by every browser session.

A ``Workbench`` owns the pipeline (base + LoRA), the feature store and its ``Attributor``. The UI
calls it with plain values and gets plain results back, so the same code serves the Gradio app, its
API and the tests. One lock serialises everything that runs the model: Gradio's queue already runs
heavy events one at a time, the lock makes that true for any other caller too.

Queries keep their latents and projected features (``Query``), so switching the method or top-k
re-ranks from the cache without generating or featurizing again. The dataset-level inspection
(``inspect``, ``groups``) is the ``InspectRequests`` mixin (inspect_session.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..attribute import Attributor
from ..attribute_queries import MissingPromptError, QueryError
from ..attribute_results import Attribution
from ..data.images import ImageError
from ..generation import GenerationSettings, generate, truncation_note
from ..models.fingerprint import provenance, short
from ..png_metadata import save_png
from ..store import FeatureStore, StoreError
from .inspect_session import InspectRequests
from .values import AppConfig, AppError, Query

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import StableDiffusionPipeline

# AppConfig, AppError and Query are imported from here too (they lived here before values.py)
__all__ = ["AppConfig", "AppError", "Query", "Workbench"]


class Workbench(InspectRequests):
    """The app's engine: one pipeline (base + LoRA), feature store and ``Attributor`` for every session.

    Everything is loaded lazily, on first use; ``lock`` serialises every call that runs the model.

    Args:
        config: What to serve (store, model, dataset, output folder).
    """

    def __init__(self, config: AppConfig):
        self.config = config
        self.lock = threading.RLock()
        self._pipe = None
        self._attributor: Attributor | None = None
        self._counter = 0
        self._demo_checked = False
        self._provenance: dict = {}

    def ensure_demo_store(self) -> bool:
        """Demo only: build (or refresh) the demo store, once per Workbench.

        Returns:
            True when it ran now; False for a non-demo store or when it ran already.
        """
        with self.lock:
            if not self.config.demo or self._demo_checked:
                return False
            self.build_store()
            return True

    # ---- configuration -------------------------------------------------------------------------

    def _manifest_info(self) -> dict:
        try:
            return FeatureStore.open(self.config.store).manifest.get("info", {})
        except StoreError:
            return {}

    def _paths(self) -> tuple[Path, Path, Path | None]:
        """(base, LoRA, dataset) from the flags, else from the store's manifest."""
        info = self._manifest_info()
        base = self.config.base or (Path(info["base_path"]) if info.get("base_path") else None)
        lora = self.config.lora or (Path(info["lora_path"]) if info.get("lora_path") else None)
        data = self.config.data or (Path(info["dataset_root"]) if info.get("dataset_root") else None)
        if base is None or lora is None:
            missing = " and ".join(f for f, v in (("--base", base), ("--lora", lora)) if v is None)
            raise AppError(f"no feature store at {self.config.store} to take the model from: pass {missing}")
        return Path(base), Path(lora), data

    def dataset_root(self) -> Path | None:
        """The only folder whose images the app serves.

        Returns:
            The dataset folder (from ``--data``, else the store's manifest), resolved; None when neither
            names one.
        """
        try:
            data = self._paths()[2]
        except AppError:
            data = self.config.data
        return Path(data).resolve() if data else None

    # ---- model and store -----------------------------------------------------------------------

    @property
    def pipe(self) -> StableDiffusionPipeline:
        """The base pipeline with the LoRA loaded, loaded on first use.

        Raises ``AppError`` when neither the flags nor the store name the base and the LoRA."""
        with self.lock:
            if self._pipe is None:
                from ..models.loading import load_lora, load_pipeline

                base, lora, _ = self._paths()
                pipe = load_pipeline(base, device=self.config.device)
                load_lora(pipe, lora)
                self._pipe = pipe
            return self._pipe

    def store_status(self) -> dict:
        """What the store holds, for the Index tab; ``ready`` says whether attribution can run.

        Returns:
            A dict with "ready", "problem" (a sentence, or None when ready) and "store". For a store
            that opens, also "samples", "complete", "base", "lora", "dataset" (paths), their fingerprints,
            "resolution" and "feature_sets": per set its output function "f", "K" timesteps, projection
            dim "k", "normalize", "residual", the index's "lambda" and "index_current"; and
            "lora_parameters", the manifest's parameter accounting (None for older stores).
        """
        try:
            store = FeatureStore.open(self.config.store)
        except StoreError as exc:
            return {"ready": False, "store": str(self.config.store), "problem": str(exc)}
        info, identity = store.manifest.get("info", {}), store.identity
        sets = {}
        for name, s in identity["feature_sets"].items():
            index = store.index_info(name) or {}
            sets[name] = {"f": s["output"], "K": s["num_timesteps"], "k": s["projection_dim"],
                          "normalize": s["normalize"], "residual": s["residual"],
                          "lambda": index.get("lambda"), "index_current": store.index_is_current(name)}
        complete = bool(store.manifest.get("complete"))
        ready = complete and len(store) > 0 and all(v["index_current"] for v in sets.values())
        problem = None if ready else ("the store is incomplete or its index is out of date: "
                                      "build it in the Index tab (or run `das-sd featurize` and `das-sd index`)")
        return {"ready": ready, "problem": problem, "store": str(store.root), "samples": len(store),
                "complete": complete, "base": info.get("base_path"), "base_fingerprint": short(identity["base_fingerprint"]),
                "lora": info.get("lora_path"), "lora_fingerprint": short(identity["lora_fingerprint"]),
                "dataset": info.get("dataset_root"), "resolution": identity["resolution"], "feature_sets": sets,
                "lora_parameters": info.get("lora_parameters")}

    def build_store(self, progress: bool = True, notify: Callable[[str], None] | None = None) -> dict:
        """Featurize what the store lacks (all of it for a new store) and refresh the index.

        For the demo the store is a cache: one built for another LoRA or other settings is rebuilt.

        Args:
            progress: Show tqdm progress bars (the app's ``gr.Progress`` tracks them).
            notify: Called with each stage's description and warnings (das_sd.featurize.service);
                None drops them.

        Returns:
            The new ``store_status()``.

        Raises:
            AppError: When there is no dataset to build from (no --data and no store naming one), or
                no base or LoRA is known.
        """
        from ..data.datasets import open_dataset
        from ..featurize.service import build_store
        from ..toy.demo import build_demo_store

        with self.lock:
            base, lora, data = self._paths()
            if data is None:
                raise AppError(f"no dataset to build the store at {self.config.store} from: pass --data")
            dataset = open_dataset(data)
            if self.config.demo:  # a cache: rebuilt when the demo LoRA was retrained
                build_demo_store(dataset, base, lora, self.config.store, progress, pipe=self.pipe, notify=notify)
            else:
                build_store(dataset, self.config.store, base, lora, pipe=self.pipe, progress=progress, notify=notify)
            self._attributor = None
            self._demo_checked = True
            return self.store_status()

    @property
    def attributor(self) -> Attributor:
        """The store's ``Attributor`` on ``pipe``, created on first use.

        Raises ``AppError`` when the store is missing, incomplete or its index is out of date."""
        with self.lock:
            if self._attributor is None:
                status = self.store_status()
                if not status["ready"]:
                    raise AppError(f"{status['store']}: {status['problem']}")
                base, lora, _ = self._paths()
                self._attributor = Attributor(self.config.store, pipe=self.pipe, base=base, lora=lora)
                self._provenance = provenance(base, lora)  # PNG metadata of every generation
            return self._attributor

    # ---- requests ------------------------------------------------------------------------------

    def generate(self, settings: GenerationSettings) -> list[Query]:
        """Generate, save each image as a PNG with its parameters, and featurize it as a query.

        Args:
            settings: Prompt, seed, steps, guidance, LoRA scale and number of images.

        Returns:
            One ``Query`` per generated image, in seed order; ``info`` holds its "seed" and "source" PNG.

        Raises:
            AppError: When the store is not ready for attribution.
        """
        with self.lock:
            attributor = self.attributor
            result = generate(self.pipe, settings, self._provenance)
            features = attributor.query_features(result.latents, [settings.prompt] * len(result.images))
            queries = []
            for i, image in enumerate(result.images):
                meta = result.metadata(i) | {"width": image.width, "height": image.height}
                path = save_png(image, self._output_path(result.seeds[i]), meta)
                queries.append(Query(latents=result.latents[i:i + 1], prompt=settings.prompt,
                                     features={n: f[i:i + 1] for n, f in features.items()},
                                     image_path=str(path), info={"seed": result.seeds[i], "source": str(path)}))
            return queries

    def image_query(self, path: str | Path, fallback_prompt: str | None = None) -> Query:
        """A query from an image file: its metadata prompt if it has one, else ``fallback_prompt``.

        Args:
            path: The image file (an upload); messages name only its file name.
            fallback_prompt: Prompt used when the image carries none in its metadata; blank: none.

        Returns:
            The ``Query``; ``info`` says where the prompt came from and holds any ``prompt_note``.

        Raises:
            AppError: When the image has no prompt and none is given, cannot be read or does not fit
                the store (size), or the store is not ready.
        """
        fallback = fallback_prompt.strip() if fallback_prompt else None
        name = Path(path).name  # messages name the upload, not where the server keeps it
        with self.lock:
            attributor = self.attributor
            try:
                latents, prompt, source = attributor.image_query(path, fallback_prompt=fallback or None)
            except MissingPromptError:
                raise AppError(f"{name}: the image carries no prompt in its metadata: type the prompt it was "
                               "generated with into the Prompt box") from None
            except (QueryError, ImageError) as exc:
                raise AppError(str(exc).replace(str(path), name)) from None
            features = attributor.query_features(latents, [prompt])
            from_box = fallback is not None and prompt == fallback
            info = {"source": Path(source).name, "prompt_from": "prompt box" if from_box else "metadata"}
            note = self.prompt_note(prompt)
            if note:
                info["prompt_note"] = note
            return Query(latents=latents.cpu(), prompt=prompt, features=features, image_path=str(path), info=info)

    def prompt_note(self, prompt: str) -> str | None:
        """What the user should know about ``prompt``: that the text encoder ignored its end, say.

        Args:
            prompt: The prompt as typed.

        Returns:
            A sentence (lower-case start) for the user, or None when there is nothing to say.
        """
        return truncation_note(self.pipe.tokenizer, prompt)

    def rank(self, query: Query, method: str, top_k: int) -> Attribution:
        """Rank the training images for a query from its cached features (no generation, no featurizing).

        Args:
            query: A query from ``generate`` or ``image_query``.
            method: An attribution method name (das_sd.registry's ``METHOD_NAMES``).
            top_k: How many training images to return.

        Returns:
            The query's top-``top_k`` training images with their scores (docs/method.md §11).
        """
        with self.lock:
            return self.attributor.attribute_latents(query.latents, [query.prompt], method, int(top_k),
                                                     [query.info], features=query.features)[0]

    def _output_path(self, seed: int) -> Path:
        # A1111's layout: one folder per day, a running number, the seed
        day = self.config.outdir / time.strftime("%Y-%m-%d")
        self._counter += 1
        return day / f"{time.strftime('%H%M%S')}-{self._counter:05d}-{seed}.png"
