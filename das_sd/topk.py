"""Streamed scoring and top-k over a store of any size: memory bounded by one chunk of rows.

Scores are phi_q^T psi_i over a method's train-side vectors (the index files, or the feature shards
for methods without a kernel), read chunk by chunk through safetensors' lazy slices of the
memory-mapped files, widened to float32 (the files may hold float16), and merged into a running
top-k. Results equal in-memory scoring (``Attributor.scores`` + ``torch.topk``) up to the order of
exact ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .score import method, rank_scores, train_array
from .store import FeatureStore, StoreError


@dataclass
class TopK:
    scores: torch.Tensor  # (queries, top_k) ranking scores, best first
    signs: torch.Tensor  # (queries, top_k) sign of the raw score t
    indices: torch.Tensor  # (queries, top_k) row numbers in the store


def train_files(store: FeatureStore, name: str) -> tuple[list[Path], str]:
    """The files holding a method's train-side vectors, in row order, and the array's name."""
    where, array = train_array(name)
    if where == "features":
        return [store.root / s["file"] for s in store.manifest["shards"]], array
    return list(store.iter_index(method(name).feature_set)), array


def stream_topk(store: FeatureStore, name: str, query_features: torch.Tensor, top_k: int = 10,
                chunk_rows: int = 16384, device: str | torch.device = "cpu") -> TopK:
    """Top-k training rows of each query (``query_features`` (queries, k), one method's feature set)."""
    files, array = train_files(store, name)
    q = query_features.float().to(device)
    best = torch.empty(q.shape[0], 0, device=device)
    best_t = torch.empty_like(best)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
    offset = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                if array not in fh.keys():
                    raise StoreError(f"{path}: no array {array!r}")
                rows_of_file = fh.get_slice(array)
                rows = rows_of_file.get_shape()[0]
                for start in range(0, rows, chunk_rows):
                    block = rows_of_file[start:min(rows, start + chunk_rows)].to(device, torch.float32)
                    t = q @ block.T
                    score, _ = rank_scores(name, t)
                    index = torch.arange(offset + start, offset + start + block.shape[0], device=device)
                    best, best_t, best_i = _merge(best, best_t, best_i, score, t, index, top_k)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{path}: cannot read it ({exc})") from exc
        offset += rows
    if offset != len(store):
        raise StoreError(f"{store.root}: {array} holds {offset} rows for {len(store)} samples")
    return TopK(best, torch.sign(best_t), best_i)


def _merge(best, best_t, best_i, score, t, index, top_k: int):
    scores = torch.cat([best, score], dim=1)
    ts = torch.cat([best_t, t], dim=1)
    indices = torch.cat([best_i, index.expand(score.shape[0], -1)], dim=1)
    top = torch.topk(scores, min(top_k, scores.shape[1]), dim=1)
    return top.values, ts.gather(1, top.indices), indices.gather(1, top.indices)
