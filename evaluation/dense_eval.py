"""Collect embeddings batch by batch, then search and score a task: shared by test and validation.

Only ``(index, embedding)`` pairs are kept; ids come from the task, so nothing but tensors has to
cross process boundaries under DDP (each rank encodes a shard; :func:`gather_rows` merges them).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from search_r3.datamodules.beir import RetrievalTask
from search_r3.evaluation.metrics import Run, build_run, evaluate_run
from search_r3.common.search import exact_topk


@dataclass
class EmbeddingStore:
    """Index and embedding chunks under a caller-chosen key (e.g. retriever, task, kind, mode)."""

    rows: dict[tuple, list[tuple[Tensor, Tensor]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, key: tuple, indices: list[int], embeddings: Tensor) -> None:
        self.rows[key].append((torch.as_tensor(indices, dtype=torch.long), embeddings.detach().float().cpu()))

    def stacked(self, key: tuple) -> tuple[Tensor, Tensor]:
        chunks = self.rows.get(key, [])
        if not chunks:
            return torch.empty(0, dtype=torch.long), torch.empty(0, 0)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def clear(self) -> None:
        self.rows.clear()


def gather_rows(indices: Tensor, embeddings: Tensor, all_gather) -> tuple[Tensor, Tensor]:
    """Merge every rank's ``(indices, embeddings)``; duplicates (DistributedSampler padding) dropped.

    ``all_gather`` is ``LightningModule.all_gather``; ranks may hold different row counts, so rows are
    padded to the largest count first and the padding (index -1) removed afterwards.
    """
    count = torch.tensor([indices.shape[0]], device=embeddings.device)
    width = int(all_gather(count).max())
    pad = width - indices.shape[0]
    idx = torch.cat([indices, torch.full((pad,), -1, dtype=torch.long)])
    emb = torch.cat([embeddings, embeddings.new_zeros((pad, embeddings.shape[1]))])
    idx, emb = all_gather(idx).flatten(0, 1).cpu(), all_gather(emb).flatten(0, 1).cpu()
    keep = idx >= 0
    return idx[keep], emb[keep]


def collect_rows(store: EmbeddingStore, key: tuple, expected: int, what: str, world_size: int = 1,
                 all_gather=None, device: torch.device | None = None) -> Tensor:
    """The rows stored under ``key`` by every rank (a sharded corpus), merged and ordered by index."""
    idx, emb = store.stacked(key)
    if world_size > 1:
        idx, emb = gather_rows(idx.to(device), emb.to(device), all_gather)
    return ordered(idx, emb, expected, what)


def ordered(indices: Tensor, embeddings: Tensor, expected: int, what: str) -> Tensor:
    """Rows sorted by index, checked to cover ``0..expected-1`` exactly once."""
    uniq, first = _unique_first(indices)
    if uniq.numel() != expected or (expected and (uniq[0] != 0 or uniq[-1] != expected - 1)):
        raise RuntimeError(f"{what}: encoded {uniq.numel()} distinct rows, expected {expected}")
    return embeddings[first]


def _unique_first(indices: Tensor) -> tuple[Tensor, Tensor]:
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    is_first = torch.ones_like(sorted_idx, dtype=torch.bool)
    is_first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return sorted_idx[is_first], order[is_first]




def score_task(
    task: RetrievalTask, doc_embeddings: Tensor, query_embeddings: Tensor, top_k: int, measures: list[str],
    device: torch.device | str | None = None,
) -> tuple[dict[str, float], Run]:
    """Exact search of every query against the task's corpus (on ``device``), scored with ir-measures."""
    # +1: room for an identical id
    scores, idx = exact_topk(query_embeddings, doc_embeddings, k=top_k + 1, device=device)
    run = build_run(list(task.queries), task.doc_ids, scores, idx)
    run = {q: dict(list(docs.items())[:top_k]) for q, docs in run.items()}
    return score_run(task, run, measures), run


def score_run(task: RetrievalTask, run: Run, measures: list[str]) -> dict[str, float]:
    return evaluate_run(task.qrels, run, measures)
