"""``RetrievalEnvironment``: document embeddings that know how stale they are, refreshed where it matters.

During RL the same model embeds the corpus, so every optimizer step makes the stored document vectors
stale. Re-encoding the corpus each step costs O(N) encoder calls; this environment re-encodes only the
neighbourhood a step touches (our design; the paper gives no details, see ``docs/design.md``):
the union of the rollouts' retrieved top-L and the labelled positives, minus documents already
encoded at the current model version, optionally plus their nearest neighbours, with an optional full
refresh every N steps or when the drift measured on the refreshed documents passes a threshold.
Each document keeps the version (training step) it was encoded at.

Under DDP the environment is either replicated (default) or sharded (``shard=True``). Replicated: every
rank holds every vector; the documents any rank's rollouts touched are re-encoded once, split across
ranks, and every rank ends each step with identical vectors and versions. Sharded: rank r owns one
contiguous block of the corpus (its vectors, versions and index); a search is a local top-k on every
rank merged from k candidates per query and rank (:func:`~search_r3.common.distributed.sharded_topk`);
a refresh re-encodes each touched document on its owner; the vectors a reward needs are summed from
their owners. Both give the same rewards (the sharded path reads the same stored values and scores them
with the same operation); the sharded one holds 1/N of the vectors per rank. Under DDP every public
method except ``positions`` is a collective: all ranks call it, in the same order.

``storage_dtype`` (float32 default; bfloat16 / float16 halve the memory) is how vectors are stored;
scores are always computed in float32 from the stored values.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import kendalltau
from torch import Tensor

from search_r3.common.atomic_files import atomic_save
from search_r3.environment.index import ExactIndex, VectorIndex
from search_r3.environment.rewards import RewardKind, dcg_reward
from search_r3.common.distributed import (encode_sharded, gather_objects, gather_padded, own_rows, shard_range,
                                          sharded_topk, sum_over_ranks, sum_tensor_over_ranks, union_over_ranks,
                                          world_and_rank)
from search_r3.common.search import exact_topk

Encoder = Callable[[list[str]], Tensor]  # texts -> unit-norm embeddings (direct mode, no grad)


@dataclass
class RefreshPolicy:
    """What a step re-encodes.

    Args:
        top_l: retrieved documents per rollout embedding that are refreshed (and ranked for the reward).
        include_positives: also refresh the labelled positives, so the reward's relevant documents are
            always scored with current weights.
        neighbours: nearest documents (by the index) of each touched one to refresh as well (0 = none).
        settle_rounds: after the refresh, search again and re-encode stale documents that entered a
            rollout's top-L, up to this many times (0 = off). A refresh changes scores, so a stale document
            just below the old top-L can move into it; settling makes the top-L the reward ranks (nearly)
            all fresh for a few extra encodes instead of a larger L for every rollout.
        full_refresh_every: steps between full refreshes (None = never).
        drift_threshold: full refresh when the mean cosine distance between old and new vectors of the
            documents a step re-encoded exceeds this (None = never): the refreshed set is a free sample
            of how far the corpus has moved.
    """

    top_l: int = 20
    include_positives: bool = True
    neighbours: int = 0
    settle_rounds: int = 0
    full_refresh_every: int | None = None
    drift_threshold: float | None = None


@dataclass
class RefreshStats:
    """One refresh: what it cost and how stale the corpus is afterwards."""

    step: int
    reencoded: int
    fraction: float
    seconds: float
    full: bool = False
    drift: float | None = None  # mean 1 - cos(old, new) over the re-encoded documents that had a vector
    staleness: dict[int, int] = field(default_factory=dict)  # steps since encoding -> number of documents

    def metrics(self, prefix: str = "env/") -> dict[str, float]:
        """Flat scalars for a logger (``self.log_dict`` / MLflow)."""
        total = sum(self.staleness.values()) or 1
        ages = [age for age, n in self.staleness.items() for _ in range(n)]
        out = {
            "reencoded": float(self.reencoded), "reencoded_fraction": self.fraction,
            "refresh_seconds": self.seconds, "full_refresh": float(self.full),
            "staleness_mean": sum(ages) / total, "staleness_max": float(max(self.staleness, default=0)),
            "fresh_fraction": self.staleness.get(0, 0) / total,
        }
        if self.drift is not None:
            out["drift"] = self.drift
        return {prefix + k: v for k, v in out.items()}


@dataclass
class FidelityProbe:
    """How far the stale index's rankings are from a fully fresh one on held-out queries."""

    step: int
    top_overlap: float  # mean |stale top-k ∩ fresh top-k| / k
    kendall_tau: float  # mean over queries, fresh top-k documents scored with stale vs fresh vectors
    seconds: float

    def metrics(self, prefix: str = "env/probe_") -> dict[str, float]:
        return {prefix + "top_overlap": self.top_overlap, prefix + "kendall_tau": self.kendall_tau,
                prefix + "seconds": self.seconds}


class RetrievalEnvironment:
    """A versioned document index over ``texts``.

    Args:
        texts: document texts, position = document index.
        encoder: direct-mode document encoder (no grad, batched by the caller's encoder).
        policy: the refresh policy.
        index: search back end (exact by default; ``HNSWIndex`` for larger corpora).
        doc_ids: optional ids of the documents, for ``positions``.
        shard: under DDP, each rank keeps only its block of the corpus (see the module docstring); a corpus
            with fewer documents than ranks stays replicated.
        storage_dtype: dtype of the stored vectors (scores are float32 either way).

    ``vectors`` and ``versions`` hold this rank's block (positions ``owned``): the whole corpus unless
    sharded under DDP.
    """

    def __init__(self, texts: Sequence[str], encoder: Encoder, policy: RefreshPolicy | None = None,
                 index: VectorIndex | None = None, doc_ids: Sequence[str] | None = None, shard: bool = False,
                 storage_dtype: torch.dtype = torch.float32) -> None:
        if not texts:
            raise ValueError("the environment needs at least one document")
        if doc_ids is not None and len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc_ids for {len(texts)} texts")
        self.texts = list(texts)
        self.encoder = encoder
        self.policy = policy or RefreshPolicy()
        self.index = index or ExactIndex()
        self.doc_ids = list(doc_ids) if doc_ids is not None else None
        self._position = {d: i for i, d in enumerate(self.doc_ids)} if self.doc_ids else {}
        world = world_and_rank()[0]
        # Fewer documents than ranks would leave a rank an empty block: such a corpus is kept replicated.
        self.shard = shard and 1 < world <= len(self.texts)
        self.owned = shard_range(len(self.texts)) if self.shard else range(len(self.texts))
        self.storage_dtype = storage_dtype
        self.vectors: Tensor | None = None
        self.versions = torch.full((len(self.owned),), -1, dtype=torch.long)
        self.step = 0
        self.history: list[RefreshStats] = []
        self._digest: str | None = None
        self.probes: list[FidelityProbe] = []

    def __len__(self) -> int:
        return len(self.texts)

    def positions(self, doc_ids: Sequence[str]) -> list[int]:
        """Positions of known ``doc_ids``; unknown ids are left out (a qrel may name a capped-away document)."""
        return [self._position[d] for d in doc_ids if d in self._position]

    def set_step(self, step: int) -> None:
        """The model changed (an optimizer step): every stored vector is now older than ``step``."""
        if step < self.step:
            raise ValueError(f"model versions only move forward: {step} < {self.step}")
        self.step = step

    # ------------------------------------------------------------------ state (checkpoints)
    def corpus_digest(self) -> str:
        """Hash of the texts (and ids): a saved state only fits the corpus it was encoded from.
        Computed once: the texts never change, and every checkpoint save asks for it."""
        if self._digest is None:
            h = hashlib.sha256()
            for i, text in enumerate(self.texts):
                h.update(f"{self.doc_ids[i] if self.doc_ids else i}\t{text}\n".encode())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def state_dict(self, shard_folder: Path | None = None) -> dict[str, object]:
        """What a resumed run needs to see the same stale vectors: each document's vector and version.

        Re-encoding the corpus on resume would hand the resumed run *fresh* vectors where the
        uninterrupted one had stale ones, so rewards (and the training) would differ from there on.

        Sharded with ``shard_folder``: each rank writes its own block there
        (``step<S>-rank<r>-of<N>.pt``) and the state only names the blocks, so no rank ever holds the
        whole corpus, at a save or at a load. Otherwise the state holds the whole matrix (sharded without
        a folder: the blocks gathered, in corpus order).
        """
        vectors, versions = self._require().clone(), self.versions.clone()
        meta = {"step": self.step, "corpus": self.corpus_digest()}
        if self.shard and shard_folder is not None:
            world, rank = world_and_rank()
            name = f"step{self.step}-rank{rank}-of{world}.pt"
            atomic_save({"start": self.owned.start, "vectors": vectors, "versions": versions}, Path(shard_folder) / name)
            # a collective: when it returns on rank 0 (which writes the checkpoint), every block is on disk
            blocks = gather_objects((self.owned.start, self.owned.stop, name))
            return {**meta, "shard_folder": str(shard_folder), "blocks": blocks}
        if self.shard:  # one format for both layouts (and any world size): the blocks in corpus order
            parts = gather_objects((vectors, versions))
            vectors, versions = torch.cat([b[0] for b in parts]), torch.cat([b[1] for b in parts])
        return {**meta, "vectors": vectors, "versions": versions}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a :meth:`state_dict` (either form, written by any world size) and rebuild the index.

        Exact for :class:`ExactIndex`; an HNSW graph rebuilt in one go is linked differently from one
        grown by updates, so approximate search may differ in near-ties.
        """
        if state.get("corpus") != self.corpus_digest():
            raise ValueError("the saved environment was encoded from another corpus "
                             f"({state.get('corpus')} != {self.corpus_digest()}): it cannot be restored here")
        if "blocks" in state:
            vectors, versions = self._read_blocks(state)
        else:
            block = slice(self.owned.start, self.owned.stop)
            vectors = torch.as_tensor(state["vectors"])[block]
            versions = torch.as_tensor(state["versions"], dtype=torch.long)[block]
        self.vectors = vectors.to("cpu", self.storage_dtype).clone()
        self.versions = versions.to(torch.long).clone()
        self.step = int(state["step"])  # type: ignore[arg-type]
        self.index.reset(self.vectors)

    def _read_blocks(self, state: dict[str, object]) -> tuple[Tensor, Tensor]:
        """This rank's rows from the block files a sharded state names: only the files overlapping its
        rows are opened (memory-mapped), so another world size than the saving one works too."""
        folder, parts = Path(str(state["shard_folder"])), []
        for start, stop, name in state["blocks"]:  # type: ignore[union-attr]
            lo, hi = max(start, self.owned.start), min(stop, self.owned.stop)
            if lo >= hi:
                continue
            path = folder / name
            if not path.is_file():
                raise ValueError(f"the checkpoint's environment block {path} is missing (each rank writes its "
                                 "block there; copy the folder with the checkpoint)")
            saved = torch.load(path, weights_only=True, mmap=True)
            parts.append((saved["vectors"][lo - start : hi - start], saved["versions"][lo - start : hi - start]))
        if sum(len(p[1]) for p in parts) != len(self.owned):
            raise ValueError(f"the checkpoint's environment blocks in {folder} do not cover rows "
                             f"{self.owned.start}..{self.owned.stop - 1}")
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # ------------------------------------------------------------------ refresh
    def full_refresh(self) -> RefreshStats:
        """Encode every document with the current weights and rebuild the index."""
        start = time.perf_counter()
        self.vectors = self._encode(self.owned).to(self.storage_dtype)
        self.versions.fill_(self.step)
        self.index.reset(self.vectors)
        return self._record(len(self.texts), time.perf_counter() - start, full=True)

    def refresh(self, indices: Tensor | Sequence[int]) -> RefreshStats:
        """Re-encode ``indices`` with the current weights; those already at this version are skipped.
        Under DDP every rank passes the same ``indices``."""
        self._require()
        idx = torch.as_tensor(indices, dtype=torch.long).unique()
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self.texts)):
            raise IndexError(f"document positions must lie in [0, {len(self.texts)}), got {idx.min()}..{idx.max()}")
        n, seconds, drift_sum = self._reencode(idx)
        return self._record(n, seconds, drift=drift_sum / n if n else None)

    def step_refresh(self, queries: Tensor, positives: Sequence[Sequence[int]]) -> RefreshStats:
        """Selective refresh for one RL step: what these rollout embeddings touch, per the policy."""
        self._require()
        every = self.policy.full_refresh_every
        if every and self.step % every == 0 and self._oldest_version() < self.step:
            return self.full_refresh()
        _, top = self.search(queries, self.policy.top_l)
        touched = [top.flatten()]
        if self.policy.include_positives:
            touched += [torch.as_tensor(list(p), dtype=torch.long) for p in positives if len(p)]
        idx = union_over_ranks(torch.cat(touched))  # under DDP: what any rank's rollouts touched
        if self.policy.neighbours:  # ``idx`` is the same everywhere: each rank looks up a share's neighbours
            world, rank = world_and_rank()
            share = idx[rank::world]
            _, near = self.search(self.vectors_at(share[None])[0], self.policy.neighbours + 1)
            idx = torch.cat([idx, union_over_ranks(near.flatten())]).unique()
        n, seconds, drift_sum = self._reencode(idx)
        for _ in range(self.policy.settle_rounds):
            _, top = self.search(queries, self.policy.top_l)
            dn, ds, dd = self._reencode(union_over_ranks(top.flatten()))
            n, seconds, drift_sum = n + dn, seconds + ds, drift_sum + dd
            if not dn:
                break
        stats = self._record(n, seconds, drift=drift_sum / n if n else None)
        if self.policy.drift_threshold is not None and stats.drift is not None \
                and stats.drift > self.policy.drift_threshold:
            full = self.full_refresh()
            full.reencoded += stats.reencoded
            full.seconds += stats.seconds
            full.fraction = full.reencoded / len(self.texts)
            full.drift = stats.drift
            return full
        return stats

    # ------------------------------------------------------------------ search and reward
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, positions)`` of ``queries`` over the whole corpus (all blocks when sharded)."""
        self._require()
        return self._search(queries, k, self.index.search)

    def vectors_at(self, indices: Tensor) -> Tensor:
        """The stored vectors at ``indices`` ``[R, C]`` (global positions), as float32 ``[R, C, D]``.

        Sharded, each owner fills the entries it holds into every rank's rows and the rows are summed over
        ranks: a value plus zeros is that value, so the result equals the replicated lookup bit for bit."""
        vectors = self._require()
        if not self.shard:
            return vectors[indices].float()
        rows, sizes = gather_padded(indices, 0)
        local = rows - self.owned.start
        mine = (local >= 0) & (local < len(self.owned))
        out = torch.zeros((*rows.shape, vectors.shape[1]), dtype=torch.float32)
        out[mine] = vectors[local[mine]].float()
        return own_rows(sum_tensor_over_ranks(out), sizes)[:, : indices.shape[1]]

    def candidates(self, queries: Tensor, positives: Sequence[Sequence[int]], depth: int | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """Per query embedding: its top-``depth`` (default ``policy.top_l``) ∪ its positives.

        Returns ``(indices [R, C], valid [R, C], relevant [R, C])``; rows are padded to the widest set
        (padding has ``valid`` False and index 0).
        """
        self._require()
        if len(positives) != queries.shape[0]:
            raise ValueError(f"{len(positives)} positive lists for {queries.shape[0]} queries")
        _, top = self.search(queries, depth or self.policy.top_l)
        pos = [torch.as_tensor(list(p), dtype=torch.long) for p in positives]
        sets = [torch.cat([t, p]).unique() for t, p in zip(top, pos)]
        width = max(c.numel() for c in sets)
        indices = torch.zeros((len(sets), width), dtype=torch.long)
        valid = torch.zeros((len(sets), width), dtype=torch.bool)
        relevant = torch.zeros((len(sets), width), dtype=torch.bool)
        for r, (c, p) in enumerate(zip(sets, pos)):
            indices[r, : c.numel()] = c
            valid[r, : c.numel()] = True
            relevant[r, : c.numel()] = torch.isin(c, p)
        return indices, valid, relevant

    def reward(self, queries: Tensor, positives: Sequence[Sequence[int]], k: int = 10,
               kind: RewardKind = "ndcg", valid: Tensor | None = None, failure_reward: float = 0.0) -> Tensor:
        """Ranking reward per query embedding, over candidates = its top-L ∪ its positives.

        With ``top_l >= k`` this equals the reward over the whole (current) index: any document that
        outranks a positive inside the top-k is in the top-L. Rows with ``valid`` False (no embedding:
        a format failure) get ``failure_reward``.
        """
        indices, ok, relevant = self.candidates(queries, positives, max(self.policy.top_l, k))
        q = queries.detach().float().cpu()
        scores = torch.einsum("rcd,rd->rc", self.vectors_at(indices), q).masked_fill(~ok, float("-inf"))
        out = dcg_reward(scores, relevant & ok, k=k, kind=kind)
        if valid is not None:
            out = torch.where(valid.cpu().bool(), out, torch.full_like(out, failure_reward))
        return out

    # ------------------------------------------------------------------ telemetry
    def fidelity_probe(self, queries: Tensor, k: int = 10, fresh: Tensor | None = None) -> FidelityProbe:
        """Compare the stale index with a fully fresh encode on ``queries`` (held out from training).

        This encodes the whole corpus (unless the caller already has current vectors: ``fresh``), so
        run it every K steps, not every step; the fresh vectors are discarded so the probe does not
        change what training sees. ``fresh`` holds this rank's block (``owned``) of the current vectors.
        """
        self._require()
        start = time.perf_counter()
        fresh = self._encode(self.owned) if fresh is None else fresh.float().cpu()
        q = queries.detach().float().cpu()
        _, stale_top = self.search(q, k)
        fresh_scores, fresh_top = self._search(q, k, lambda qq, kk: exact_topk(qq, fresh, kk))
        stale_vectors = self.vectors_at(fresh_top)
        overlap = [len(set(a.tolist()) & set(b.tolist())) / fresh_top.shape[1] for a, b in zip(stale_top, fresh_top)]
        taus = []
        for r in range(q.shape[0]):
            stale_scores = stale_vectors[r] @ q[r]
            tau = kendalltau(stale_scores.numpy(), fresh_scores[r].numpy()).statistic
            if tau == tau:  # NaN when a score vector is constant
                taus.append(float(tau))
        probe = FidelityProbe(self.step, sum(overlap) / len(overlap), sum(taus) / len(taus) if taus else float("nan"),
                              time.perf_counter() - start)
        self.probes.append(probe)
        return probe

    def staleness(self) -> dict[int, int]:
        """Histogram over the whole corpus: steps since encoding -> number of documents."""
        counts = Counter((self.step - self.versions).tolist())
        if self.shard:
            counts = sum(gather_objects(counts), Counter())
        return dict(sorted(counts.items()))

    def vector_bytes(self) -> int:
        """Bytes this rank holds for document vectors and their versions (the exact index shares the store)."""
        return (self.vectors.nbytes if self.vectors is not None else 0) + self.versions.nbytes

    # ------------------------------------------------------------------ internals
    def _encode(self, positions: Sequence[int] | range) -> Tensor:
        """Float32 vectors of ``positions``. Replicated, every rank asks for the same positions (unions,
        whole corpus); each encodes a share and all end with the same vectors (:func:`encode_sharded`).
        Sharded, a rank asks only for positions it owns and encodes them itself."""
        def encode(share: Sequence[int]) -> Tensor:
            return self.encoder([self.texts[i] for i in share]).detach().float().cpu()

        return encode(list(positions)) if self.shard else encode_sharded(list(positions), encode)

    def _search(self, queries: Tensor, k: int, search_local) -> tuple[Tensor, Tensor]:
        if not self.shard:
            return search_local(queries, k)
        start = self.owned.start

        def search_block(q: Tensor, k_: int) -> tuple[Tensor, Tensor]:
            scores, local = search_local(q, k_)
            return scores, local + start

        return sharded_topk(queries, k, search_block, len(self.texts))

    def _oldest_version(self) -> int:
        oldest = int(self.versions.min()) if len(self.versions) else self.step
        if self.shard:
            oldest = min(gather_objects(oldest))
        return oldest

    def _reencode(self, idx: Tensor) -> tuple[int, float, float]:
        """Re-encode the stale ones among ``idx``; returns (count, seconds, summed cosine drift)."""
        vectors = self._require()
        start = time.perf_counter()
        if self.shard:  # ``idx`` is the same on every rank; each re-encodes what it owns
            idx = idx[(idx >= self.owned.start) & (idx < self.owned.stop)] - self.owned.start
        idx = idx[self.versions[idx] < self.step]
        n, drift_sum = int(idx.numel()), 0.0
        if n:
            fresh = self._encode([self.owned[i] for i in idx.tolist()])
            drift_sum = float((1 - (vectors[idx].float() * fresh).sum(-1)).sum())
            vectors[idx] = fresh.to(vectors.dtype)
            self.versions[idx] = self.step
            self.index.update(idx, vectors[idx])
        if self.shard:  # every rank decides the same (settling, drift threshold) from the corpus-wide counts
            n, drift_sum = int(sum_over_ranks(n)), sum_over_ranks(drift_sum)
        return n, time.perf_counter() - start if n else 0.0, drift_sum

    def _require(self) -> Tensor:
        if self.vectors is None:
            raise RuntimeError("the environment has no vectors yet: call full_refresh() first")
        return self.vectors

    def _record(self, n: int, seconds: float, full: bool = False, drift: float | None = None) -> RefreshStats:
        stats = RefreshStats(self.step, n, n / len(self.texts), seconds, full, drift, self.staleness())
        self.history.append(stats)
        return stats
