"""The public attribution API: open a store, featurize queries as training samples are (one fixed noise key
for every query, docs/method.md §4), score.

    attributor = Attributor("my-store")
    result = attributor.attribute_image("generated.png", method="das", top_k=10)
    for r in result.results: print(r.rank, r.score, r.sign, r.caption, r.path)

A query is a generated image (its prompt read from the PNG metadata, or given) or the pipeline's final
latents plus prompt, with no VAE round trip. Queries use fixed noise draws, so attributing the same
query twice gives the same scores.

Here: opening the store and its model, checking them, and scoring. Reading, checking and
featurizing a query is das_sd.attribute_queries (``Attributor``'s other part); the ranking it
returns is das_sd.attribute_results's ``Attribution``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .attribute_queries import AttributorQueries, QueryError
from .attribute_results import Attribution, AttributionRow
from .conditioning import Conditioning, model_family
from .featurize.featurizer import Featurizer, store_autocast
from .featurize.settings import FeaturizerSettings
from .models.fingerprint import lora_fingerprint, model_fingerprint
from .models.loading import load_lora, load_pipeline
from .models.probe import pipeline_probes, probe_differences
from .noising import prediction_type
from .registry import DEFAULT_METHOD, FAMILY_NAMES, METHODS, Method, method
from .score import latent_similarity, ranking, raw_scores, train_vectors
from .shares import credit_shares
from .store import FeatureStore, StoreError
from .store_manifest import identity_with_defaults
from .topk import TopK, stream_topk

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


class Attributor(AttributorQueries):
    """Scores a feature store's training samples for query images or latents.

    Args:
        store: A feature store, or the folder of one.
        pipe: The store's base pipeline with its LoRA loaded; None loads them from ``base`` and ``lora``.
        device: Where a pipeline loaded here runs; None: CUDA when available, else the CPU.
        base: The base model folder; None: the path the store recorded.
        lora: The LoRA file or folder; None: the path the store recorded.
        check_fingerprints: Refuse base / LoRA files, and a pipeline, other than those the store
            was built with. False skips these checks.
        max_in_memory_bytes: Train-side vectors larger than this are not loaded; attribution then
            streams over the store's files (das_sd.topk) with memory bounded by one chunk.

    Raises:
        StoreError: If the store is empty or cannot be opened, or (with ``check_fingerprints``) the
            model files are missing or are not the ones the store was built with.
    """

    def __init__(self, store: str | Path | FeatureStore, pipe: StableDiffusionPipeline | None = None,
                 device: str | torch.device | None = None,
                 base: str | Path | None = None, lora: str | Path | None = None, check_fingerprints: bool = True,
                 max_in_memory_bytes: int = 2 << 30):
        self.max_in_memory_bytes = max_in_memory_bytes
        self.store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        identity, info = self.store.identity, self.store.manifest.get("info", {})
        if len(self.store) == 0:
            raise StoreError(f"{self.store.root}: the store holds no features yet; run `das-sd featurize`")
        self.base_path = Path(base or info.get("base_path", ""))
        self.lora_path = Path(lora or info.get("lora_path", ""))
        if check_fingerprints:
            self._check(self.base_path, model_fingerprint, identity["base_fingerprint"], "base model", "--base")
            self._check(self.lora_path, lora_fingerprint, identity["lora_fingerprint"], "LoRA", "--lora")
        if pipe is None:
            # weights loaded under a caller's inference_mode (ComfyUI runs nodes so) could not take gradients
            with torch.inference_mode(False):
                pipe = load_pipeline(self.base_path, device=device)
                load_lora(pipe, self.lora_path)
        # first: another family's pipeline fails the weight probes too, but this names the real cause
        self._check_prediction_type(pipe)
        if check_fingerprints:
            # also for weights loaded here from the right files: another library release may read them differently
            self.check_pipeline(pipe)
        self.pipe = pipe
        self.resolution = int(identity["resolution"])
        autocast = store_autocast(identity.get("compute_dtype", "float32"), pipe.unet.device)
        fields = FeaturizerSettings.__dataclass_fields__
        self.featurizers = {
            name: Featurizer(pipe, FeaturizerSettings(**{k: v for k, v in s.items() if k in fields}), autocast)
            for name, s in identity["feature_sets"].items()
        }
        dataset_root = Path(info.get("dataset_root", "."))
        self.rows = self.store.rows()
        self.paths = [str(dataset_root / r.path) for r in self.rows]
        self._train: dict[str, torch.Tensor] = {}

    def _check(self, path: Path, fingerprint, expected: str, what: str, flag: str) -> None:
        if not path.exists():
            raise StoreError(f"{self.store.root}: the store's {what} {path} is not there; pass its location with {flag}")
        found = fingerprint(path)
        if found != expected:
            raise StoreError(f"{self.store.root}: the store was built for {what} {expected}, but {path} is {found}")

    def _check_prediction_type(self, pipe: StableDiffusionPipeline) -> None:
        # queries compared with another target than the training rows' would score f = loss and
        # the kernel against features of another function (docs/method.md §2); another family's
        # UNet has other LoRA layers and conditioning altogether
        identity = identity_with_defaults(self.store.identity)
        family = model_family(pipe)
        if family != identity["model_family"]:
            raise StoreError(f"{self.store.root}: the store was built for an {FAMILY_NAMES[identity['model_family']]} "
                             f"model, but the pipeline is {FAMILY_NAMES[family]}; attribute with the base and LoRA the "
                             "store was built with")
        stored = identity["prediction_type"]
        found = prediction_type(pipe)
        if found != stored:
            raise StoreError(f"{self.store.root}: the store was built for a {stored} model, but the pipeline's "
                             f"scheduler has prediction_type {found!r}; attribute with the scheduler config the "
                             "store was built with")

    def check_pipeline(self, pipe: StableDiffusionPipeline) -> None:
        """Refuse a pipeline whose base or LoRA weights are not the ones the store was built with.

        Compares weight probes recorded in the store with the pipeline's; a store from before
        probes is not checked.

        Args:
            pipe: The pipeline to check, LoRA loaded.

        Raises:
            StoreError: If the base or LoRA weights differ from the store's (the first differences named).
        """
        expected = self.store.manifest.get("probes")
        if not expected:
            return  # a store from before probes: the file fingerprints above are all there is
        found = pipeline_probes(pipe)
        info = self.store.manifest.get("info", {})
        for part, what, path in (("base", "base model", info.get("base_path")), ("lora", "LoRA", info.get("lora_path"))):
            diffs = probe_differences(expected[part], found[part])
            if diffs:
                more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
                raise StoreError(f"{self.store.root}: the pipeline's {what} is not the one this store was built "
                                 f"with ({path}): " + "; ".join(diffs[:3]) + more)

    @property
    def notes(self) -> list[str]:
        """What every attribution from this store must say beside its ranking.

        Returns:
            One sentence when the store was featurized with ``--allow-partial`` and left LoRA
            parameters out (their kinds and counts, from the manifest); otherwise empty.
        """
        record = self.store.manifest.get("info", {}).get("lora_parameters") or {}
        if not record.get("left_out_total"):
            return []
        kinds = ", ".join(f"{kind} ({count:,})" for kind, count in record.get("left_out", {}).items())
        return [f"partial attribution: the store differentiates {record.get('differentiated_total', 0):,} of the "
                f"LoRA's parameters; left out (--allow-partial): {kinds}"]

    @property
    def methods(self) -> list[str]:
        """The methods this store can score: those whose feature set it holds, and latent-sim."""
        sets = set(self.featurizers)
        return [name for name, m in METHODS.items() if m.feature_set is None or m.feature_set in sets]

    def require_method(self, name: str) -> Method:
        """The method ``name``, or ValueError when it is unknown or needs a feature set this store lacks.

        Args:
            name: A method name (``registry.METHODS``).

        Returns:
            Its registry entry.

        Raises:
            ValueError: If ``name`` is unknown or its feature set is not in this store.
        """
        m = method(name)
        if name not in self.methods:
            raise ValueError(f"method {name!r} needs feature set {m.feature_set!r}, which this store lacks "
                             f"(it supports {', '.join(self.methods)})")
        return m

    def _features_for(self, name: str, latents, prompts, features, cond) -> dict[str, torch.Tensor]:
        """``features`` completed with the feature set method ``name`` needs (only that one is computed)."""
        needed = method(name).feature_set
        if features is not None and needed in features:
            return features
        return {**(features or {}), **self.query_features(latents, prompts, cond, [needed])}

    def scores(self, latents: torch.Tensor, prompts: list[str], name: str,
               features: dict[str, torch.Tensor] | None = None,
               cond: torch.Tensor | Conditioning | None = None) -> torch.Tensor:
        """The signed effects t (queries, N) of method ``name``; rank by ``das_sd.score.ranking(name, t)``.

        Loads the method's train-side vectors whole (and keeps them); ``attribute_latents`` streams
        instead when they exceed ``max_in_memory_bytes``.

        Args:
            latents: (n, 4, h, w) query latents x_0.
            prompts: One prompt per latent.
            name: The method.
            features: Query features from ``query_features`` of the same queries, to skip
                featurizing them again; the method's feature set is computed when absent.
            cond: The prompt embeddings the pipeline used; None encodes ``prompts``.

        Returns:
            The (n, N) float32 signed effects, in store row order.

        Raises:
            ValueError: If the method is unknown or needs a feature set this store lacks.
        """
        m = self.require_method(name)
        if m.feature_set is None:
            if latents.shape[2] != latents.shape[3]:
                raise QueryError(f"{name} compares the store's square latents: attribute a "
                                 f"{self.resolution}x{self.resolution} query, or use a gradient method")
            t = latent_similarity(latents.cpu(), self._train_latents())
        else:
            features = self._features_for(name, latents, prompts, features, cond)
            if name not in self._train:
                self._train[name] = train_vectors(self.store, name)
            t = raw_scores(features[m.feature_set], self._train[name])
        return t

    def _train_latents(self) -> torch.Tensor:
        if "latents" not in self._train:
            self._train["latents"] = self.store.load("latents")
        return self._train["latents"]

    def attribute_latents(self, latents: torch.Tensor, prompts: str | list[str], method: str = DEFAULT_METHOD,
                          top_k: int = 10, query_info: list[dict] | None = None,
                          features: dict[str, torch.Tensor] | None = None,
                          cond: torch.Tensor | Conditioning | None = None) -> list[Attribution]:
        """Attribute final latents (n, 4, h, w) generated from ``prompts`` (one per latent).

        Args:
            latents: (n, 4, h, w) final latents x_0, or one (4, h, w) latent.
            prompts: One prompt per latent, or one prompt for all of them.
            method: The method that ranks (``registry.METHODS``).
            top_k: How many training images to return per query.
            query_info: Per-query dicts added to each ``Attribution.query`` beside its prompt.
            features: Query features from ``query_features`` of the same latents and prompts: lets a
                caller re-rank with another method or top-k without featurizing the queries again.
            cond: The prompt embeddings the pipeline used, instead of encoding ``prompts`` again.

        Returns:
            One ``Attribution`` per latent, its rows best first.

        Raises:
            QueryError: If the numbers of latents and prompts differ, or the latents' shape is not
                the store model's.
            ValueError: If the method is unknown or needs a feature set this store lacks.
        """
        latents = latents.float()
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        prompts = [prompts] * len(latents) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(latents):
            raise QueryError(f"{len(latents)} latents but {len(prompts)} prompts")
        factor, channels = self.pipe.vae_scale_factor, self.pipe.unet.config.in_channels
        shapes = [(channels, h // factor, w // factor) for w, h in self.query_sizes]
        if tuple(latents.shape[1:]) not in shapes:
            raise QueryError(f"latents of shape {tuple(latents.shape[1:])}; the store's model uses "
                             + ", ".join(map(str, shapes[:6])))
        if self.streams(method):
            features = self._features_for(method, latents, prompts, features, cond)
            top = stream_topk(self.store, method, features[self.require_method(method).feature_set], top_k)
        else:
            t = self.scores(latents, prompts, method, features, cond)
            score = ranking(method, t)
            best = torch.topk(score, min(top_k, score.shape[1]), dim=1)
            top = TopK(best.values, torch.sign(t).gather(1, best.indices), best.indices)
        if top.credit_total is not None:
            shares = credit_shares(top.scores.cpu().numpy(), top.credit_total.cpu().numpy())
        else:
            shares = np.take_along_axis(credit_shares(score.cpu().numpy()), top.indices.cpu().numpy(), axis=1)
        out = []
        for q in range(len(prompts)):
            info = {"prompt": prompts[q], **((query_info or [{}] * len(prompts))[q])}
            rows = [AttributionRow(rank=r + 1, key=self.rows[i].key, path=self.paths[i], caption=self.rows[i].caption,
                                   score=float(top.scores[q, r]), sign=int(top.signs[q, r]), share=float(shares[q, r]))
                    for r, i in enumerate(top.indices[q].tolist())]
            out.append(Attribution(method=method, query=info, results=rows, notes=self.notes))
        return out

    def streams(self, name: str) -> bool:
        """Whether ``name`` is scored by streaming over the files (its vectors exceed the memory cap).

        Args:
            name: The method.

        Returns:
            True when its N x k float32 vectors exceed ``max_in_memory_bytes`` and are not loaded yet.

        Raises:
            ValueError: If the method is unknown or needs a feature set this store lacks.
        """
        m = self.require_method(name)
        if m.feature_set is None or name in self._train:
            return False
        k = int(self.store.identity["feature_sets"][m.feature_set]["projection_dim"])
        return len(self.store) * k * 4 > self.max_in_memory_bytes

    def attribute_image(self, image: str | Path | Image.Image, prompt: str | None = None, method: str = DEFAULT_METHOD,
                        top_k: int = 10) -> Attribution:
        """Attribute one image; its prompt comes from ``prompt`` or else from its PNG metadata.

        Args:
            image: An image file or a PIL image, at the store's resolution.
            prompt: Its prompt; None reads it from the image's metadata.
            method: The method that ranks (``registry.METHODS``).
            top_k: How many training images to return.

        Returns:
            The attribution; its ``query`` holds the prompt and the source.

        Raises:
            QueryError: As ``image_query`` (``MissingPromptError`` without a prompt).
            ValueError: If the method is unknown or needs a feature set this store lacks.
        """
        latents, prompt, source = self.image_query(image, prompt)
        return self.attribute_latents(latents, [prompt], method, top_k, [{"source": source}])[0]


def attribute_file(store: str | Path, image: str | Path, prompt: str | None = None, method: str = "das",
                   top_k: int = 10, device: str | None = None, base: str | Path | None = None,
                   lora: str | Path | None = None) -> Attribution:
    """`das-sd attribute`: the store's model attributes one image file (its prompt from ``prompt`` or
    its PNG metadata). A manifest without what attribution needs is refused before any model loads;
    a prompt longer than the text encoder reads is warned about on stderr.

    Args:
        store: The feature store's folder.
        image: The image file.
        prompt: Its prompt; None reads it from the image's metadata.
        method: The method that ranks (``registry.METHODS``).
        top_k: How many training images to return.
        device: Where the model runs; None: CUDA when available, else the CPU.
        base: The base model folder; None: the path the store recorded.
        lora: The LoRA file or folder; None: the path the store recorded.

    Returns:
        The attribution of the image.

    Raises:
        StoreError: If the store cannot be opened, its manifest lacks what attribution needs, or the
            model is not the store's.
        QueryError: As ``Attributor.image_query``.
        ValueError: If the method is unknown or needs a feature set this store lacks.
    """
    from . import generation
    from .store_manifest import MANIFEST
    from .store_integrity import require_identity

    opened = FeatureStore.open(store)
    require_identity(opened.root / MANIFEST, opened.identity, needed_by="das-sd attribute")
    attributor = Attributor(opened, device=device, base=base, lora=lora)
    result = attributor.attribute_image(image, prompt=prompt, method=method, top_k=top_k)
    generation.warn_truncated_prompts(attributor.pipe.tokenizer, [result.query["prompt"]])
    return result
