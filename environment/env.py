"""``RetrievalEnvironment``: document embeddings that know how stale they are, refreshed where it matters.

During RL the same model embeds the corpus, so every optimizer step makes the stored document vectors
stale. Re-encoding the corpus each step costs O(N) encoder calls; this environment re-encodes only the
neighbourhood a step touches (our design; the paper gives no details, see ``docs/design.md``):
the union of the rollouts' retrieved top-L and the labelled positives, minus documents already
encoded at the current model version, optionally plus their nearest neighbours, with an optional
full refresh every N steps. Each document keeps the version (training step) it was encoded at.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evaluation.search import exact_topk

Encoder = Callable[[list[str]], Tensor]  # texts -> unit-norm embeddings (direct mode, no grad)


@dataclass
class RefreshPolicy:
    """What a step re-encodes. ``top_l``: retrieved documents per rollout; ``neighbours``: nearest
    documents of each refreshed one (0 = none); ``full_refresh_every``: steps between full refreshes
    (None = never)."""

    top_l: int = 20
    include_positives: bool = True
    neighbours: int = 0
    full_refresh_every: int | None = None


@dataclass
class RefreshStats:
    step: int
    reencoded: int
    fraction: float
    seconds: float
    staleness: dict[int, int] = field(default_factory=dict)  # steps since encoding -> number of documents


class RetrievalEnvironment:
    """Exact (matrix) index over ``texts`` with per-document versions.

    Args:
        texts: document texts, position = document index.
        encoder: direct-mode document encoder, called on lists of texts (batched by the caller's encoder).
        policy: the refresh policy.
    """

    def __init__(self, texts: Sequence[str], encoder: Encoder, policy: RefreshPolicy | None = None) -> None:
        self.texts = list(texts)
        self.encoder = encoder
        self.policy = policy or RefreshPolicy()
        self.vectors: Tensor | None = None
        self.versions = torch.full((len(self.texts),), -1, dtype=torch.long)
        self.step = 0
        self.history: list[RefreshStats] = []

    def __len__(self) -> int:
        return len(self.texts)

    def set_step(self, step: int) -> None:
        """The model changed (an optimizer step): every stored vector is now older than ``step``."""
        self.step = step

    def refresh(self, indices: Tensor | Sequence[int]) -> RefreshStats:
        """Re-encode ``indices`` with the current weights (those already at this version are skipped)."""
        idx = torch.as_tensor(indices, dtype=torch.long).unique()
        idx = idx[self.versions[idx] < self.step] if self.vectors is not None else torch.arange(len(self.texts))
        start = time.perf_counter()
        if idx.numel():
            fresh = self.encoder([self.texts[i] for i in idx.tolist()]).float().cpu()
            if self.vectors is None:
                self.vectors = torch.empty((len(self.texts), fresh.shape[1]))
            self.vectors[idx] = fresh
            self.versions[idx] = self.step
        ages = (self.step - self.versions).tolist()
        stats = RefreshStats(self.step, int(idx.numel()), idx.numel() / len(self.texts),
                             time.perf_counter() - start, dict(sorted(_count(ages).items())))
        self.history.append(stats)
        return stats

    def full_refresh(self) -> RefreshStats:
        self.versions.fill_(-1)
        return self.refresh(torch.arange(len(self.texts)))

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self.vectors is None:
            raise RuntimeError("the environment has no vectors yet: call full_refresh() first")
        return exact_topk(queries.float().cpu(), self.vectors, k)

    def step_refresh(self, queries: Tensor, positives: Sequence[Sequence[int]]) -> RefreshStats:
        """Selective refresh for one RL step: what these rollout embeddings touch, per the policy."""
        if self.policy.full_refresh_every and self.step % self.policy.full_refresh_every == 0:
            return self.full_refresh()
        _, top = self.search(queries, self.policy.top_l)
        touched = [top.flatten()]
        if self.policy.include_positives:
            touched += [torch.as_tensor(list(p), dtype=torch.long) for p in positives if len(p)]
        idx = torch.cat(touched).unique()
        if self.policy.neighbours:
            _, near = exact_topk(self.vectors[idx], self.vectors, self.policy.neighbours + 1)
            idx = torch.cat([idx, near.flatten()]).unique()
        return self.refresh(idx)


def _count(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
