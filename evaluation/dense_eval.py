"""Collect embeddings batch by batch, then search and score a task: shared by test and validation.

Only ``(index, embedding)`` pairs are kept; ids come from the task, so nothing but tensors has to
cross process boundaries under DDP. Each rank encodes a shard of the corpus and keeps it: the search is
sharded (:func:`owned_documents`, :func:`score_task`), so no rank holds the whole corpus; queries
are few and are gathered (:func:`collect_rows`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from search_r3.datamodules.beir import RetrievalTask
from search_r3.evaluation.metrics import Run, build_run, evaluate_run
from search_r3.common.distributed import gather_objects, sharded_topk, world_and_rank
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
    """Merge every rank's ``(indices, embeddings)``; a row two ranks encoded is kept once.

    ``all_gather`` is ``LightningModule.all_gather``; ranks may hold different row counts, so rows are
    padded to the largest count first and the padding (index -1) removed afterwards. Every rank holds rows:
    the evaluation loaders give each rank at least one batch (``dealt_batches``).
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




def owned_documents(store: EmbeddingStore, key: tuple, expected: int, what: str) -> tuple[Tensor, Tensor]:
    """This rank's document rows ``(indices, embeddings)``, sorted by index, for a sharded search.

    A document two ranks encoded (the distributed sampler pads the last batches by repeating) belongs to
    the lowest of them, the copy :func:`collect_rows` would keep. Only indices cross ranks (8 bytes a
    document), and the ranks together must cover ``0..expected-1``."""
    idx, emb = store.stacked(key)
    uniq, first = _unique_first(idx)
    idx, emb = uniq, emb[first]
    world, rank = world_and_rank()
    covered = idx
    if world > 1:
        held = gather_objects((idx, emb.shape[1]))
        if not idx.numel():  # a rank without documents (corpus < world): empty rows of the others' width
            emb = emb.new_zeros((0, max(width for _, width in held)))
        if rank:
            keep = ~torch.isin(idx, torch.cat([h[0] for h in held[:rank]]))
            idx, emb = idx[keep], emb[keep]
        covered = torch.cat([h[0] for h in held]).unique()
    if covered.numel() != expected or (expected and (covered[0] != 0 or covered[-1] != expected - 1)):
        raise RuntimeError(f"{what}: encoded {covered.numel()} distinct rows, expected {expected}")
    return idx, emb


def score_task(
    task: RetrievalTask, doc_embeddings: Tensor, query_embeddings: Tensor, top_k: int, measures: list[str],
    device: torch.device | str | None = None, doc_indices: Tensor | None = None,
) -> tuple[dict[str, float], Run]:
    """Exact search of every query against the task's corpus (on ``device``), scored with ir-measures.

    ``doc_indices``: the corpus rows ``doc_embeddings`` are, sorted, when the corpus is split across ranks
    (:func:`owned_documents`). The search is then sharded, a collective: each rank searches a share of the
    queries against every rank's rows (:func:`~search_r3.common.distributed.sharded_topk`) and the top-k
    rows are gathered, so every rank builds the same run, the one a search of the gathered corpus gives
    (ties are ordered by position in both). ``None``: ``doc_embeddings`` is the whole corpus."""
    k = top_k + 1  # room for an identical id
    if doc_indices is None:
        scores, idx = exact_topk(query_embeddings, doc_embeddings, k=k, device=device)
    else:
        world, rank = world_and_rank()
        n = query_embeddings.shape[0]

        def search_local(queries: Tensor, k_: int) -> tuple[Tensor, Tensor]:
            found, rows = exact_topk(queries, doc_embeddings, k_, device=device)
            return found, doc_indices[rows]

        scores, idx = sharded_topk(query_embeddings[rank * n // world : (rank + 1) * n // world], k, search_local,
                                   task.num_docs)
        if world > 1:
            parts = gather_objects((scores, idx))
            scores, idx = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    run = build_run(list(task.queries), task.doc_ids, scores, idx)
    run = {q: dict(list(docs.items())[:top_k]) for q, docs in run.items()}
    return score_run(task, run, measures), run


def score_run(task: RetrievalTask, run: Run, measures: list[str]) -> dict[str, float]:
    return evaluate_run(task.qrels, run, measures)
