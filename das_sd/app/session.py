"""The app's engine, free of any UI: one model + store shared by every browser session.

A ``Workbench`` owns the pipeline (base + LoRA), the feature store and its ``Attributor``. The UI
calls it with plain values and gets plain results back, so the same code serves the Gradio app, its
API and the tests. One lock serialises everything that runs the model: Gradio's queue already runs
heavy events one at a time, the lock makes that true for any other caller too.

Queries keep their latents and projected features (``Query``), so switching the method or top-k
re-ranks from the cache without generating or featurizing again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..attribute import Attributor
from ..attribute_queries import MissingPromptError, QueryError
from ..attribute_results import Attribution
from ..data.images import ImageError
from ..generation import GenerationSettings, generate, save_png, shorten, truncation_note
from ..models.fingerprint import das_sd_home, provenance, short
from ..store import FeatureStore, StoreError

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import StableDiffusionPipeline

    from ..inspect.inspection import Inspection, Progress

class AppError(ValueError):
    """A request the app cannot serve; the message is shown to the user as is."""


@dataclass
class AppConfig:
    """What the app serves: which store, model and dataset, and where its outputs go.

    Attributes:
        store: Feature store folder; built from ``data`` when missing.
        base: Base model folder; None: the base the store's manifest names.
        lora: LoRA file or folder; None: the LoRA the store's manifest names.
        data: Dataset to build or extend the store from; None: the one the manifest names.
        device: Torch device ("cpu", "cuda", "cuda:1", ...); None: cuda when available.
        outdir: Where generated PNGs (one folder per day) and inspection reports are saved
            (default: ``outputs`` under ``$DAS_SD_HOME``, else ``~/.cache/das-sd``).
        demo: The embedded demo: base, LoRA and data come from ``prepare_demo`` and the store is a
            cache, rebuilt when the demo LoRA was retrained.
    """

    store: Path  # feature store folder (built from ``data`` when missing)
    base: Path | None = None  # None: the base the store's manifest names
    lora: Path | None = None  # None: the LoRA the store's manifest names
    data: Path | None = None  # dataset to build or extend the store from; None: the manifest's
    device: str | None = None
    outdir: Path = field(default_factory=lambda: das_sd_home() / "outputs")
    demo: bool = False  # the embedded demo: base, LoRA and data come from ``prepare_demo``


@dataclass
class Query:
    """One attributed image: what is needed to re-rank it without running the model again.

    Attributes:
        latents: (1, 4, h, w) float latents of the image.
        prompt: The prompt it is attributed with.
        features: Projected query features per feature set name, each (1, k).
        image_path: The saved PNG (generations) or the uploaded file.
        info: Query metadata shown with the attribution ("seed", "source", "prompt_from", "prompt_note").
    """
    latents: torch.Tensor  # (1, 4, h, w)
    prompt: str
    features: dict[str, torch.Tensor]
    image_path: str  # the saved PNG (generations) or the upload
    info: dict = field(default_factory=dict)


class Workbench:
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

    def _output_path(self, seed: int) -> Path:
        # A1111's layout: one folder per day, a running number, the seed
        day = self.config.outdir / time.strftime("%Y-%m-%d")
        self._counter += 1
        return day / f"{time.strftime('%H%M%S')}-{self._counter:05d}-{seed}.png"
