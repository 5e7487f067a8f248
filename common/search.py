"""Exact cosine top-k over a dense corpus, in chunks so that 100k+ documents fit in memory.

Embeddings are unit-norm, so cosine is a dot product. The score matrix is never materialised for
the whole corpus: queries and documents are both chunked and a running top-k is merged per chunk.
The search runs on ``device`` (the accelerator that computed the embeddings, in evaluation): one
document chunk at a time is moved there, so device memory stays bounded by the chunk sizes.

Equal scores are ordered by position, lowest first, including at the k-th place: ``torch.topk`` picks
among ties arbitrarily (and differently for different matrix shapes), so without a rule the top-k of one
corpus would depend on how it is chunked or sharded across ranks. Duplicate documents tie exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ordered_topk(scores: Tensor, positions: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best ``(scores, positions)`` per row among candidates given as columns: highest score
    first, lowest position first among equal scores. For merging candidate lists (a few k wide)."""
    by_position = positions.argsort(dim=1)
    scores, positions = scores.gather(1, by_position), positions.gather(1, by_position)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), positions.gather(1, order)


def _chunk_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` columns of ``scores`` with ties at the k-th place resolved towards the lowest column."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
    columns = keep.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: every row keeps exactly k
    return ordered_topk(scores.gather(1, columns), columns, k)


@torch.no_grad()
def exact_topk(
    queries: Tensor,
    documents: Tensor,
    k: int,
    query_chunk: int = 1024,
    doc_chunk: int = 65536,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` ``(scores, doc_indices)`` per query, best first (on the CPU); ``k`` is clipped to the
    corpus size. ``device``: where the dot products and top-k run (default: where ``queries`` are).
    ``documents`` may be stored in a reduced dtype; each chunk is scored in float32."""
    if queries.ndim != 2 or documents.ndim != 2 or queries.shape[1] != documents.shape[1]:
        raise ValueError(f"shape mismatch: queries {tuple(queries.shape)}, documents {tuple(documents.shape)}")
    k = min(k, documents.shape[0])
    all_scores, all_idx = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device or queries.device, torch.float32)
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
        for d0 in range(0, documents.shape[0], doc_chunk):
            d = documents[d0 : d0 + doc_chunk].to(q.device, torch.float32)
            s, i = _chunk_topk(q @ d.T, min(k, d.shape[0]))
            best_s, best_i = ordered_topk(torch.cat([best_s, s], dim=1), torch.cat([best_i, i + d0], dim=1), k)
        all_scores.append(best_s.cpu())
        all_idx.append(best_i.cpu())
    return torch.cat(all_scores), torch.cat(all_idx)
