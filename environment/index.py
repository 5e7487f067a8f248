"""Index back ends for the RL environment: one interface, exact (reference) and HNSW (usearch).

Both hold unit-norm vectors addressed by document position and score by inner product
(= cosine). The environment writes refreshed vectors through ``update``, so an index must accept
in-place replacement of a few vectors without a rebuild; ``reset`` loads a whole corpus.

The ANN back end is usearch's HNSW: it has CPU wheels for every platform we run on (hnswlib is
source-only on PyPI and faiss' HNSW cannot remove or replace a vector), and ``remove`` + ``add``
replaces a vector *and* re-links it in the graph, so the graph tracks the moving embeddings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from search_r3.common.search import exact_topk


class VectorIndex(ABC):
    """What the environment needs from an index; positions are document indices ``0..N-1``."""

    @abstractmethod
    def reset(self, vectors: Tensor) -> None:
        """Replace the whole content with ``vectors`` ``[N, D]``."""

    @abstractmethod
    def update(self, indices: Tensor, vectors: Tensor) -> None:
        """Replace the vectors at ``indices`` (in place: the other documents are untouched)."""

    @abstractmethod
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, indices)`` per query, best first."""


class ExactIndex(VectorIndex):
    """Chunked brute force over the stored matrix: the reference every other back end is measured against.

    It searches the matrix ``reset`` hands it in place, in its dtype (upcast to float32 a chunk at a time),
    without a copy: the environment and its exact index share one store, so the vectors are held once."""

    def __init__(self) -> None:
        self.matrix: Tensor | None = None

    def reset(self, vectors: Tensor) -> None:
        self.matrix = vectors.detach().cpu()

    def update(self, indices: Tensor, vectors: Tensor) -> None:
        matrix = self._require()
        matrix[indices] = vectors.to("cpu", matrix.dtype)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return exact_topk(queries.float().cpu(), self._require(), k)

    def _require(self) -> Tensor:
        if self.matrix is None:
            raise RuntimeError("the index is empty: reset() it with the corpus vectors first")
        return self.matrix


class HNSWIndex(VectorIndex):
    """usearch HNSW graph (inner product). Defaults favour recall over build speed: the environment's
    corpora are small next to what HNSW is built for, and a wrong top-L means a wrong reward.

    Args:
        connectivity: graph degree M.
        expansion_add: ef at construction.
        expansion_search: ef at query time (raised to ``k`` when smaller).
        threads: worker threads for add/search; 1 keeps the graph (and so every result) reproducible.
    """

    def __init__(self, connectivity: int = 32, expansion_add: int = 128, expansion_search: int = 128,
                 threads: int = 1) -> None:
        self.connectivity = connectivity
        self.expansion_add = expansion_add
        self.expansion_search = expansion_search
        self.threads = threads
        self._index = None
        self._size = 0

    def reset(self, vectors: Tensor) -> None:
        from usearch.index import Index

        array = _numpy(vectors)
        self._index = Index(ndim=array.shape[1], metric="ip", dtype="f32", connectivity=self.connectivity,
                            expansion_add=self.expansion_add, expansion_search=self.expansion_search)
        self._index.add(np.arange(len(array), dtype=np.uint64), array, threads=self.threads)
        self._size = len(array)

    def update(self, indices: Tensor, vectors: Tensor) -> None:
        index = self._require()
        keys = torch.as_tensor(indices, dtype=torch.long).numpy().astype(np.uint64)
        index.remove(keys)
        index.add(keys, _numpy(vectors), threads=self.threads)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        index = self._require()
        k = min(k, self._size)
        index.expansion_search = max(self.expansion_search, k)
        found = index.search(_numpy(queries), k, threads=self.threads)
        keys = np.asarray(found.keys, dtype=np.int64).reshape(-1, k)
        scores = 1.0 - np.asarray(found.distances, dtype=np.float32).reshape(-1, k)  # usearch "ip" distance = 1 - dot
        counts = np.asarray(found.counts).reshape(-1)
        idx, sc = torch.from_numpy(keys.copy()), torch.from_numpy(scores.copy())
        short = (counts < k).nonzero()[0]
        if len(short):  # the graph returned fewer than k (tiny or disconnected corpora): never hand back holes
            raise RuntimeError(f"HNSW returned fewer than k={k} results for {len(short)} queries; "
                               "use the exact index for corpora this small or raise expansion_search")
        return sc, idx

    def _require(self):
        if self._index is None:
            raise RuntimeError("the index is empty: reset() it with the corpus vectors first")
        return self._index


def _numpy(vectors: Tensor) -> np.ndarray:
    return np.ascontiguousarray(vectors.detach().float().cpu().numpy())
