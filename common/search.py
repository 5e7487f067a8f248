"""Exact cosine top-k over a dense corpus, in chunks so that 100k+ documents fit in memory.

Embeddings are unit-norm, so cosine is a dot product. The score matrix is never materialised for
the whole corpus: queries and documents are both chunked and a running top-k is merged per chunk.
The search runs on ``device`` (the accelerator that computed the embeddings, in evaluation): one
document chunk at a time is moved there, so device memory stays bounded by the chunk sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    corpus size. ``device``: where the dot products and top-k run (default: where ``queries`` are)."""
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
            s = q @ d.T
            top = min(k, s.shape[1])
            s, i = s.topk(top, dim=1)
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, i + d0], dim=1)
            best_s, order = best_s.topk(min(k, best_s.shape[1]), dim=1)
            best_i = best_i.gather(1, order)
        all_scores.append(best_s.cpu())
        all_idx.append(best_i.cpu())
    return torch.cat(all_scores), torch.cat(all_idx)
