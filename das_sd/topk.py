"""Streamed scoring and top-k over a store of any size: memory bounded by one chunk of rows.

Scores are phi_q^T psi_i over a method's train-side vectors (the index files, or the feature shards
for methods without a kernel), read chunk by chunk with plain sequential reads (the next chunk read
in a thread while this one is scored; memory: two chunk buffers), and merged into a running top-k.

float16 files on the CPU: widening every row to float32 costs more than reading it, so each chunk
is scored in float16 (a GEMV the CPU runs near memory speed), and only the rows that can still be
in the chunk's top-k are rescored in float32. With u = 2^-11 (float16 rounding of the query and of
the product) and float32 accumulation over k terms, |t_fp16 - t| <= delta_i = (2u + k 2^-24)
||q|| ||psi_i||, using the row norms stored with the index. A row of the exact top-k has
|t_fp16| >= (k-th best fp16 score) - 2 max(delta), so keeping those rows and rescoring them exactly
gives the exact top-k: results equal in-memory float32 scoring (``Attributor.scores`` +
``torch.topk``) up to the order of exact ties.

int8 files (a float32 scale per row) go the same way, with the query quantized to int8 as well and
exact int32 dot products (the bound is then the query's rounding; norms are those of the dequantized
rows): results equal in-memory scoring of the same int8 index, which approximates the float32 one
(README, Performance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import method
from .score import key_of_ranking, ranking, ranking_key, train_array
from .shares import positive_credit
from .store import FeatureStore, StoreError


@dataclass
class TopK:
    """The best training rows of each query, as ``stream_topk`` returns them.

    Attributes:
        scores: (queries, top_k) float32 ranking scores (t^2 or t by method), best first.
        signs: (queries, top_k) sign of each row's raw score t (-1, 0 or 1).
        indices: (queries, top_k) int64 row numbers in the store.
        credit_total: (queries,) float64 sum over all N rows of ``das_sd.shares.positive_credit`` of
            the ranking score: the denominator of the rows' shares. Rows that a low-precision file
            let the stream skip count with their approximate score (``stream_topk``).
    """

    scores: torch.Tensor  # (queries, top_k) ranking scores, best first
    signs: torch.Tensor  # (queries, top_k) sign of the raw score t
    indices: torch.Tensor  # (queries, top_k) row numbers in the store
    credit_total: torch.Tensor | None = None  # (queries,) sum of every row's positive credit


def _train_source(name: str) -> tuple[str | None, str]:
    """(index set, or None for the feature shards; array name) of a method's train-side vectors."""
    where, array = train_array(name)
    return (None if where == "features" else method(name).feature_set), array


CHUNK_BYTES = 8 << 20  # a chunk that stays in the CPU's caches while it is scored (measured best here)


def stream_topk(store: FeatureStore, name: str, query_features: torch.Tensor, top_k: int = 10,
                chunk_rows: int | None = None, device: str | torch.device = "cpu") -> TopK:
    """Top-k training rows of each query (``query_features`` (queries, k), one method's feature set).
    ``chunk_rows``: rows scored at a time (default: about ``CHUNK_BYTES`` of the file). Low-precision
    files on the CPU are prefiltered with an error bound, then rescored exactly (``docs/method.md §12``).

    Args:
        store: The store; indexed already for methods with a kernel.
        name: A gradient method (``das_sd.registry.GRADIENT_METHOD_NAMES``; not ``latent-sim``).
        query_features: (queries, k) query features of the method's feature set.
        top_k: Rows kept per query (fewer when the store has fewer rows).
        chunk_rows: Rows scored at a time; None (default): about ``CHUNK_BYTES`` of the file.
        device: Where the scoring runs; the results live there.

    Returns:
        A ``TopK`` of (queries, min(top_k, N)) tensors, equal to in-memory scoring up to the order of
        exact ties, and the credit total of all N rows. A low-precision file's rows that cannot be in
        the top-k count in the total with their approximate scores (within the prefilter's bound
        delta_i of t: credit off by at most delta_i (2 |t_i| + delta_i) for squared methods, delta_i
        otherwise; relative error about 2^-10 for float16 files).

    Raises:
        StoreError: A file cannot be read or is damaged, or the files' rows do not add up to the
            store's sample count.
        ValueError: ``name`` is not a gradient method.
    """
    index_set, array = _train_source(name)
    q = query_features.float().to(device)
    best = torch.empty(q.shape[0], 0, device=device)
    best_t = torch.empty_like(best)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
    total = torch.zeros(q.shape[0], dtype=torch.float64, device=device)
    offset = 0
    for reader in store.array_chunks(array, index_set, chunk_rows, CHUNK_BYTES):
        try:
            side = reader.side_arrays() if reader.dtype in (torch.float16, torch.int8) else {}
            scales = side["scale"].to(device) if reader.dtype == torch.int8 else None
            norms = side.get("norm") if torch.device(device).type == "cpu" else None
            for start, block in reader:
                block = block.to(device)
                rows = slice(start, start + block.shape[0])
                index = torch.arange(offset + start, offset + start + block.shape[0], device=device)
                if norms is not None:
                    score, t, index, credit = _exact_candidates(name, q, block, norms[rows], index, top_k,
                                                                _floor(name, best, top_k),
                                                                None if scales is None else scales[rows])
                else:
                    t = q @ block.float().T
                    if scales is not None:  # int8 rows: q . (scale_i * row_i)
                        t *= scales[rows]
                    score = ranking(name, t)
                    credit = positive_credit(score).double().sum(dim=1)
                total += credit
                best, best_t, best_i = _merge(best, best_t, best_i, score, t, index, top_k)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{reader.path}: cannot read it ({exc})") from exc
        offset += reader.rows
    if offset != len(store):
        raise StoreError(f"{store.root}: {array} holds {offset} rows for {len(store)} samples")
    return TopK(best, torch.sign(best_t), best_i, total)


def _floor(name: str, best: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """The k-th best exact key so far (``ranking_key``), per query: no row below it can enter the
    final top-k. None until k rows have been seen."""
    if best.shape[1] < top_k:
        return None
    return key_of_ranking(name, best[:, top_k - 1:top_k])


def _exact_candidates(name: str, q: torch.Tensor, block: torch.Tensor, norms: torch.Tensor, index: torch.Tensor,
                      top_k: int, floor: torch.Tensor | None = None,
                      scales: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exact scores, exact t, row numbers) of the rows of a low-precision block that can be in the
    top-k, each (queries, candidates), and the block's (queries,) positive credit (exact for the
    candidates, approximate for the rest); queries short of candidates are padded with -inf scores.
    Approximate scores come with a bound |t_approx - t| <= error * ||row|| = delta per query. A row of
    the block's exact top-k has key_approx >= (the block's k-th best approximate key) - 2 delta, and a
    row of the final top-k has key_approx >= ``floor`` (the running k-th best exact key) - delta."""
    approx_t, error = _approximate_int8(q, block, scales) if scales is not None else _approximate_float16(q, block)
    key = ranking_key(name, approx_t)
    delta = error * norms.float().max()
    threshold = torch.topk(key, min(top_k, key.shape[1]), dim=1).values[:, -1:] - 2 * delta
    if floor is not None:
        threshold = torch.maximum(threshold, floor - delta)
    keep = key >= threshold
    columns = keep.any(dim=0).nonzero().squeeze(1)  # rows some query needs
    t = q @ block[columns].float().T
    if scales is not None:
        t *= scales[columns]
    exact = ranking(name, t)
    approx_credit = positive_credit(ranking(name, approx_t)).double()
    credit = approx_credit.sum(dim=1) - approx_credit[:, columns].sum(dim=1) + positive_credit(exact).double().sum(dim=1)
    return exact.masked_fill(~keep[:, columns], float("-inf")), t, index[columns], credit


def _approximate_float16(q: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 GEMV: the query and the product rounded once each (u = 2^-11) over a float32
    accumulation of k terms: error (2u + k 2^-24) ||q||."""
    u = 2.0 ** -11
    return (q.half() @ block.T).float(), (2 * u + q.shape[1] * 2.0 ** -24) * q.norm(dim=1, keepdim=True)


def _approximate_int8(q: torch.Tensor, block: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows against the query quantized to int8 too (its own scale s_q): the int32 dot products
    are exact, so the error is the query's rounding, s_q sqrt(k) / 2, plus three float32 roundings.
    Falls back to bfloat16 (which holds int8 values exactly; u = 2^-8) where int8 GEMM is missing."""
    k = q.shape[1]
    q_scale = (q.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    try:
        dots = torch._int_mm(torch.round(q / q_scale).to(torch.int8), block.T)
    except (RuntimeError, AttributeError):
        u = 2.0 ** -8
        approx = (q.bfloat16() @ block.bfloat16().T).float() * scales
        return approx, (2 * u + k * 2.0 ** -24) * q.norm(dim=1, keepdim=True)
    rounding = q_scale * k ** 0.5 / 2
    return dots.float() * q_scale * scales, rounding + 2.0 ** -20 * (q.norm(dim=1, keepdim=True) + rounding)


def _merge(best, best_t, best_i, score, t, index, top_k: int):
    scores = torch.cat([best, score], dim=1)
    ts = torch.cat([best_t, t], dim=1)
    indices = torch.cat([best_i, index.expand(score.shape[0], -1)], dim=1)
    top = torch.topk(scores, min(top_k, scores.shape[1]), dim=1)
    return top.values, ts.gather(1, top.indices), indices.gather(1, top.indices)
