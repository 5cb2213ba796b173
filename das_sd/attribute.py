"""The public attribution API: open a store, featurize queries as training samples are (one fixed noise key
for every query, docs/method.md §4), score.

    attributor = Attributor("my-store")
    result = attributor.attribute_image("generated.png", method="das", top_k=10)
    for r in result.results: print(r.rank, r.score, r.sign, r.caption, r.path)

A query is a generated image (its prompt read from the PNG metadata, or given) or the pipeline's final
latents plus prompt, with no VAE round trip. Queries use fixed noise draws, so attributing the same
query twice gives the same scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .data.buckets import BucketSpec
from .data.images import ImageError, image_size, is_fully_transparent, open_image, to_rgb
from .featurize.featurizer import Featurizer, features_together, store_autocast
from .featurize.settings import FeaturizerSettings
from .generation import image_metadata
from .conditioning import Conditioning, model_family
from .latents import encode_prompts, native_time_ids

from .models.fingerprint import lora_fingerprint, model_fingerprint
from .models.loading import load_lora, load_pipeline
from .models.probe import pipeline_probes, probe_differences
from .noising import prediction_type
from .registry import DEFAULT_METHOD, FAMILY_NAMES, METHODS, Method, method
from .score import latent_similarity, ranking, raw_scores, train_vectors
from .shares import credit_shares, share_text
from .topk import TopK, stream_topk
from .store import FeatureStore, StoreError
from .store_manifest import identity_with_defaults

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


class QueryError(ValueError):
    """A query that cannot be attributed; the message says why."""


class MissingPromptError(QueryError):
    """An image query without a prompt (the app says where to type one, the CLI which flag)."""


@dataclass
class AttributionRow:
    """One training image in a query's ranking.

    Attributes:
        rank: 1 for the most influential image.
        key: The training sample's key in the store.
        path: Absolute path of the training image.
        caption: The training caption.
        score: The method's ranking score (``das_sd.score.ranking``: t^2 for das, t for signed methods).
        sign: Sign of the signed effect t: +1, -1, or 0.
        share: The image's share of the query's positive influence over all N training images
            (``das_sd.shares``, as ``das-sd inspect`` defines it): the number to read; None when
            not known (a record of an older das-sd).
    """
    rank: int
    key: str
    path: str  # absolute path of the training image
    caption: str
    score: float  # the method's ranking score (das_sd.score.ranking: t^2 for das)
    sign: int  # sign of the signed effect t (+1 / -1 / 0)
    share: float | None = None  # share of the positive influence (das_sd.shares)

    def label(self) -> str:
        """Caption for galleries: rank, share of the influence and the training caption.

        Returns:
            E.g. ``"#1 · 23.4% · a photo of ..."``; the raw score and sign instead of the share when
            the share is not known.
        """
        return f"#{self.rank} · {share_text(self.share, self.score, self.sign)} · {self.caption}"


@dataclass
class Attribution:
    """The ranked training images of one query.

    Attributes:
        method: The method that ranked them (``registry.METHODS``).
        query: What was attributed: its ``prompt``, and e.g. its ``source`` file or the caller's info.
        results: The top-k rows, best first.
        notes: What the user must know to read the ranking, e.g. that the store differentiates only
            part of the LoRA (``--allow-partial``); empty when nothing.
    """
    method: str
    query: dict
    results: list[AttributionRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The attribution as JSON-ready data (what ``das-sd attribute --json`` prints).

        Returns:
            ``{"method": ..., "query": ..., "results": [row as a dict, ...], "notes": [...]}``.
        """
        return {"method": self.method, "query": self.query, "results": [asdict(r) for r in self.results],
                "notes": list(self.notes)}

    def provenance(self, store_id: str) -> dict:
        """The compact record written into an attributed image's metadata.

        Args:
            store_id: The store's id (``FeatureStore.store_id``), to tell which store ranked them.

        Returns:
            ``{"method", "store_id", "top_k": [{"rank", "key", "share" (6 decimals: the number to
            read, ``das_sd.shares``), "score" (6 significant digits), "sign"}, ...]}``.
        """
        return {"method": self.method, "store_id": store_id,
                "top_k": [{"rank": r.rank, "key": r.key,
                           "share": None if r.share is None else round(r.share, 6),
                           "score": float(f"{r.score:.6g}"), "sign": r.sign}
                          for r in self.results]}


# Every query is featurized with the same noise draws (those of this key): its features then depend
# only on its latent and conditioning, so the same generation reached by different routes (the
# pipeline's own latents, a PNG, another host) ranks the same even when the latents differ by float
# rounding. Training samples keep per-sample noise, which the kernel averages over.
QUERY_NOISE_KEY = "das-sd-query"


class Attributor:
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

    # ---- queries -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: Image.Image, source: str = "image") -> torch.Tensor:
        """The latent x_0 of an image: the VAE's mode times its scaling factor (docs/method.md §2).

        Args:
            image: An image at one of the store's ``query_sizes`` (converted to RGB).
            source: What error messages call the image.

        Returns:
            The (1, 4, h/8, w/8) float32 latent, on the VAE's device.

        Raises:
            QueryError: If the image is not at one of the store's ``query_sizes``.
        """
        self._check_size(image.size, source)
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(self.pipe.vae.device, self.pipe.vae.dtype)
        vae = self.pipe.vae
        return (vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float()

    def _check_size(self, size: tuple[int, int], source: str) -> None:
        if tuple(size) not in self.query_sizes:
            sizes = ", ".join(f"{w}x{h}" for w, h in self.query_sizes[:6]) + (", ..." if len(self.query_sizes) > 6 else "")
            raise QueryError(f"{source}: image is {size[0]}x{size[1]}; this store's model works at {sizes} "
                             "(attribute the generation at its native size)")

    @property
    def query_sizes(self) -> list[tuple[int, int]]:
        """The image sizes a query may have: the store's square, and for a bucketed store every bucket.

        Returns:
            (width, height) pairs, the square first.
        """
        square = (self.resolution, self.resolution)
        buckets = identity_with_defaults(self.store.identity)["buckets"]
        return [square] + [s for s in (BucketSpec(**buckets).sizes() if buckets else []) if s != square]

    def query_features(self, latents: torch.Tensor, prompts: list[str], cond: torch.Tensor | Conditioning | None = None,
                       feature_sets: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Projected features of each query, per feature set (docs/method.md §4, §8). Every query
        uses the noise draws of ``QUERY_NOISE_KEY``.

        Args:
            latents: (n, 4, h, w) query latents x_0.
            prompts: One prompt per latent.
            cond: The prompts' conditioning the pipeline used ((n, tokens, d) text states, or an SDXL
                ``Conditioning``); None encodes ``prompts``
                with the pipeline's text encoder.
            feature_sets: Which sets to compute; None: all of the store's, so that a caller can rank
                with every method.

        Returns:
            ``{feature_set: (n, k) features phi_q}``, on the CPU.
        """
        if cond is None:
            size = (latents.shape[-1] * self.pipe.vae_scale_factor, latents.shape[-2] * self.pipe.vae_scale_factor)
            cond = encode_prompts(self.pipe, prompts, time_ids=native_time_ids(self.pipe, size))
        keys = [QUERY_NOISE_KEY] * len(prompts)
        names = feature_sets or list(self.featurizers)
        features = features_together([self.featurizers[name] for name in names], latents, cond, keys)
        return {name: phi.cpu() for name, phi in zip(names, features)}

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

    def image_query(self, image: str | Path | Image.Image, prompt: str | None = None,
                    fallback_prompt: str | None = None) -> tuple[torch.Tensor, str, str]:
        """(latent, prompt, source) of an image query; the prompt is ``prompt``, else the image's PNG
        metadata prompt, else ``fallback_prompt``.

        Args:
            image: An image file or a PIL image, at the store's resolution.
            prompt: The prompt it was generated from; None reads it from the image's metadata.
            fallback_prompt: The prompt when neither ``prompt`` nor the metadata gives one.

        Returns:
            The (1, 4, h/8, w/8) float32 latent, the prompt, and the source (the path, or ``"image"``).

        Raises:
            QueryError: If the file cannot be read, is not at the store's resolution, or is fully
                transparent.
            MissingPromptError: If no prompt is given or found.
        """
        source = str(image) if not isinstance(image, Image.Image) else "image"
        if not isinstance(image, Image.Image):
            try:
                # a query has the store's resolution: any other size is refused from the header,
                # before a (possibly 64-megapixel) image is decoded
                self._check_size(image_size(Path(image)), source)
                image = open_image(Path(image))
            except ImageError as exc:
                raise QueryError(str(exc)) from None
        if is_fully_transparent(image):
            raise QueryError(f"{source}: the image is fully transparent (alpha 0 everywhere): there is nothing "
                             "in it to attribute")
        meta = image_metadata(image)
        image = to_rgb(image)
        prompt = prompt if prompt is not None else (meta.get("prompt") or fallback_prompt)
        if not prompt:
            raise MissingPromptError(f"{source}: no prompt given and none found in the image metadata; pass --prompt")
        return self.encode_image(image, source), prompt, source

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
