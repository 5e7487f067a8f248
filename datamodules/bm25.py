"""A BM25 index of a task's corpus (pyserini/Lucene), shared by the BM25 baseline and hard-negative mining."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from search_r3.common.distributed import world_and_rank
from search_r3.datamodules.beir import RetrievalTask
from search_r3.datamodules.beir_files import iter_corpus
from search_r3.common.digests import hash_file

log = logging.getLogger(__name__)


def corpus_digest(task: RetrievalTask) -> str:
    """Content hash of the task's corpus file plus the document selection (capped runs)."""
    h = hashlib.sha256()
    hash_file(task.corpus_path, h)
    if task.keep_docs is not None:
        h.update("\n".join(task.doc_ids).encode())
    return h.hexdigest()[:16]


class BM25Index:
    """BM25 with pyserini/Lucene over "title text" (pyserini's BEIR "flat" setting: k1=0.9, b=0.4).

    The index is cached under ``index_dir`` by corpus content hash and rebuilt only when the corpus
    (or the document selection of a capped run) changes. It lives with the data, not with the
    evaluated retrievers, because both evaluation (the BM25 baseline) and the data modules (hard
    negatives mined for Stage 1) rank with it.
    """

    def __init__(self, k1: float = 0.9, b: float = 0.4, index_dir: str = ".cache/search_r3/bm25",
                 threads: int = 2) -> None:
        self.k1, self.b, self.threads = k1, b, threads
        self.index_dir = Path(index_dir)
        self.last_index_reused = False

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
            import torch

            torch.distributed.barrier()
        return target / "index"

    def _build(self, task: RetrievalTask, target: Path) -> None:
        from search_r3.datamodules.java import in_jvm

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            (tmp / "corpus").mkdir()
            keep = task.keep_docs
            with open(tmp / "corpus" / "docs.jsonl", "w", encoding="utf-8") as fh:
                for _, doc_id, text in iter_corpus(task.corpus_path, on_bad_row=task.on_bad_row):
                    if keep is None or doc_id in keep:
                        fh.write(json.dumps({"id": doc_id, "contents": text}, ensure_ascii=False) + "\n")
            log.info("building the BM25 index of %s (%d documents) in %s", task.name, task.num_docs, target)
            start = time.perf_counter()
            in_jvm(build_lucene_index, str(tmp / "corpus"), str(tmp / "index"), self.threads)
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
        from search_r3.datamodules.java import in_jvm

        index = self.index_for(task)
        qids, texts = list(task.queries), list(task.queries.values())
        hits = in_jvm(search_lucene_index, str(index), qids, texts, k + 1, self.k1, self.b, self.threads)
        run: dict[str, dict[str, float]] = {}
        for qid in qids:
            ranked = [(d, s) for d, s in hits.get(qid, []) if d != qid]  # BEIR: drop identical ids
            run[qid] = dict(ranked[:k]) or {}
        return run


def build_lucene_index(corpus_dir: str, index_dir: str, threads: int) -> None:
    """Anserini's indexer over a folder of ``{"id", "contents"}`` JSON lines (runs in the JVM helper)."""
    from jnius import autoclass

    autoclass("io.anserini.index.IndexCollection").main([
        "-collection", "JsonCollection", "-input", corpus_dir, "-index", index_dir,
        "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(threads), "-storeRaw",
    ])


def search_lucene_index(index_dir: str, qids: list[str], texts: list[str], k: int, k1: float, b: float,
                        threads: int) -> dict[str, list[tuple[str, float]]]:
    """BM25 top-``k`` ``(doc_id, score)`` per query id, best first (runs in the JVM helper)."""
    from pyserini.search.lucene import LuceneSearcher

    searcher = LuceneSearcher(index_dir)
    try:
        searcher.set_bm25(k1=k1, b=b)
        hits = searcher.batch_search(texts, qids, k=k, threads=threads)
        return {qid: [(h.docid, float(h.score)) for h in hits.get(qid, [])] for qid in qids}
    finally:
        searcher.close()
