"""Per-training-image signals read from a feature store alone (no generations needed).

- leverage h_i and self-influence s_i = phi_i^T psi_i = h_i e_i / (1 - h_i): DAS's linearised effect
  of removing z_i on z_i itself. An image unlike the rest of the set has high self-influence; the
  outlier flag uses a robust z-score, (s_i - median) / (1.4826 MAD) > 3.5 (Iglewicz and Hoaglin).
- nearest-neighbour similarity: the largest cosine between the image's stored latent (VAE mode x
  scaling) and another training image's. Copies sit at 1, re-encoded or slightly edited copies just
  below; distinct images of the demo set reach 0.974 at most, so the duplicate flag is >= 0.99.
  Gradient features are no duplicate signal: each sample's noise draws depend on its key, so two
  copies of an image get features as different as two unrelated images (cosine 0.70-0.89 measured
  against 0.87 between distinct demo images).
Similarities are computed in blocks, so memory stays at one block x N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..store import FeatureStore

OUTLIER_Z = 3.5
DUPLICATE_SIMILARITY = 0.99


@dataclass
class ImageSignals:
    """Per-training-image signals of a store (docs/method.md §13).

    Attributes:
        leverage: (N,) leverage h_i.
        self_influence: (N,) self-influence s_i = h_i e_i / (1 - h_i).
        outlier_z: (N,) robust z-score of self-influence (``robust_z``).
        nn_similarity: (N,) cosine of the stored latent to the nearest other training image's.
        nn_index: (N,) row of that neighbour (-1 when there is none).
        duplicate_threshold: Similarity from which an image is a near-duplicate.
        outlier_threshold: z-score above which an image is an outlier.
    """
    leverage: np.ndarray  # (N,)
    self_influence: np.ndarray  # (N,)
    outlier_z: np.ndarray  # (N,) robust z-score of self-influence
    nn_similarity: np.ndarray  # (N,) cosine to the nearest other training image (stored latents)
    nn_index: np.ndarray  # (N,) row of that neighbour
    duplicate_threshold: float
    outlier_threshold: float

    def is_duplicate(self, i: int) -> bool:
        """Whether training image ``i`` is a near-duplicate of another.

        Args:
            i: Row of the image.

        Returns:
            True when its nearest-neighbour similarity is at least ``duplicate_threshold``.
        """
        return bool(self.nn_similarity[i] >= self.duplicate_threshold)

    def is_outlier(self, i: int) -> bool:
        """Whether training image ``i`` is a self-influence outlier.

        Args:
            i: Row of the image.

        Returns:
            True when its robust z-score is above ``outlier_threshold``.
        """
        return bool(self.outlier_z[i] > self.outlier_threshold)


def robust_z(values: np.ndarray) -> np.ndarray:
    """Robust z-scores (Iglewicz and Hoaglin): ``(v - median) / (1.4826 MAD)``.

    Args:
        values: (N,) values.

    Returns:
        (N,) z-scores; all 0 when the MAD is 0.
    """
    median = np.median(values)
    mad = np.median(np.abs(values - median)) * 1.4826
    return (values - median) / mad if mad > 0 else np.zeros_like(values)


def nearest_neighbours(features: torch.Tensor, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The nearest other row of every row by cosine similarity, computed block by block.

    Args:
        features: (N, d) rows (any float dtype; compared in float32).
        block: Rows compared against all N at once (memory is block x N).

    Returns:
        ``(similarity, index)``: (N,) float64 cosine to the nearest other row and (N,) int64 its row;
        -1 and -1 when N is 1.
    """
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    n = unit.shape[0]
    best = np.full(n, -1.0)
    where = np.full(n, -1, dtype=np.int64)
    for start in range(0, n, block):
        sims = unit[start:start + block] @ unit.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -2.0  # not itself
        value, index = sims.max(dim=1) if n > 1 else (torch.full((sims.shape[0],), -1.0), rows * 0 - 1)
        best[start:start + block] = value.numpy()
        where[start:start + block] = index.numpy()
    return best, where


def image_signals(store: FeatureStore, feature_set: str = "das", duplicate_threshold: float = DUPLICATE_SIMILARITY,
                  outlier_threshold: float = OUTLIER_Z) -> ImageSignals:
    """Leverage, self-influence, outlier and near-duplicate signals of every training image of a store.

    Args:
        store: The feature store; its index of ``feature_set`` must be built.
        feature_set: Feature set whose index gives leverage and residuals (that of the inspected method).
        duplicate_threshold: Latent cosine from which an image is a near-duplicate.
        outlier_threshold: Robust z-score of self-influence above which an image is an outlier.

    Returns:
        The signals, in store row order.
    """
    index = store.load_index(feature_set)
    leverage = index["leverage"].double().numpy()
    residual = index["residual"].double().numpy()
    self_influence = leverage * residual / (1.0 - leverage)
    similarity, neighbour = nearest_neighbours(store.load("latents").flatten(1))
    return ImageSignals(leverage, self_influence, robust_z(self_influence), similarity, neighbour,
                        duplicate_threshold, outlier_threshold)
