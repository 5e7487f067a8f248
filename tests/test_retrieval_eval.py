"""RetrievalEvalModule through a real Trainer on the tiny LM: rows, artifacts, and the document-embedding cache."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from search_r3.datamodules.beir import BEIRDataModule
from search_r3.evaluation.retrievers import EmbeddingLMRetriever
from search_r3.model.embedding_lm import EmbeddingLM
from search_r3.lightning_modules.retrieval_eval import RetrievalEvalModule
from search_r3.common.progress import EvaluationProgress, ProgressLine

REPO = Path(__file__).resolve().parents[1]


class _Killed(Exception):
    """Stands in for a crash or a killed job in the middle of encoding the corpus."""


def _run(tiny_lm_dir: Path, root: Path, tmp_path: Path, fail_after: int | None = None, cache: str = "cache",
         partial_save_s: float | None = 120.0, batch_size: int = 16, query_calls: list[int] | None = None,
         fail_queries_after: int | None = None, **encoder_kw) -> tuple[RetrievalEvalModule, list[int]]:
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, **encoder_kw)
    calls: list[int] = []
    original = encoder.encode_documents

    def counted(texts, batch_size=None):
        if fail_after is not None and len(calls) == fail_after:
            raise _Killed
        calls.append(len(texts))
        return original(texts, batch_size)

    encoder.encode_documents = counted
    retriever = EmbeddingLMRetriever(encoder, name="tiny", modes=["direct", "reasoning"])
    encode_queries = retriever.encode_queries_with_records
    query_calls = [] if query_calls is None else query_calls

    def counted_queries(texts, mode):
        if fail_queries_after is not None and len(query_calls) == fail_queries_after:
            raise _Killed
        query_calls.append(len(texts))
        return encode_queries(texts, mode)

    retriever.encode_queries_with_records = counted_queries
    module = RetrievalEvalModule([retriever],
                                 output_dir=str(tmp_path / "out"), embedding_cache_dir=str(tmp_path / cache),
                                 partial_save_s=partial_save_s)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=BEIRDataModule(data_root=str(root), datasets=["scifact"], batch_size=batch_size))
    return module, calls


def test_second_run_reuses_document_embeddings_until_the_model_changes(tiny_lm_dir: Path, mini_scifact: Path,
                                                                        tmp_path: Path) -> None:
    first, calls = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, max_reasoning_tokens=4)
    assert sum(calls) == first.rows[0].num_docs  # every document encoded once, shared by both modes
    assert [(r.label, r.dataset) for r in first.rows] == [("tiny.direct", "scifact"), ("tiny.reasoning", "scifact")]
    second, calls = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, max_reasoning_tokens=4)
    assert calls == []  # served from the cache
    assert second.rows[0].metrics == first.rows[0].metrics
    assert second.rows[0].documents_from_cache and not first.rows[0].documents_from_cache
    _, calls = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, max_reasoning_tokens=4, max_document_tokens=32)
    assert sum(calls) == first.rows[0].num_docs  # another truncation: another representation, re-encoded
    out = sorted(p.name for p in next((tmp_path / "out").iterdir()).iterdir())
    assert {"metrics.json", "results.md", "nDCG_at_10.png", "run.scifact.tiny.direct.trec"} <= set(out)


def test_an_interrupted_run_resumes_the_corpus_where_it_stopped(tiny_lm_dir: Path, mini_scifact: Path,
                                                                 tmp_path: Path) -> None:
    straight, _ = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, cache="straight", max_reasoning_tokens=4)
    num_docs = straight.rows[0].num_docs  # 48 documents, batches of 16: killed after two of three
    with pytest.raises(_Killed):
        _run(tiny_lm_dir, mini_scifact.parent, tmp_path, fail_after=2, partial_save_s=0, max_reasoning_tokens=4)
    assert len(list((tmp_path / "cache").glob("*.partial-rank0.pt"))) == 1
    resumed, calls = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, partial_save_s=0, max_reasoning_tokens=4)
    assert sum(calls) == num_docs - 32  # only the batch the killed run had not reached
    progress = next(c for c in resumed.trainer.callbacks if isinstance(c, EvaluationProgress))
    assert progress.skipped == 2  # the two batches it already had cost nothing and stay out of the ETA
    assert [r.metrics for r in resumed.rows] == [r.metrics for r in straight.rows]
    assert list((tmp_path / "cache").glob("*.partial*")) == []  # the finished cache replaces the partial file
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_an_interrupted_run_resumes_the_queries_with_what_the_model_wrote(tiny_lm_dir: Path, mini_scifact: Path,
                                                                           tmp_path: Path) -> None:
    straight, _ = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, cache="straight", max_reasoning_tokens=4,
                       batch_size=4)
    # 8 queries in batches of 4, each encoded in both modes: killed at the second batch's reasoning mode.
    with pytest.raises(_Killed):
        _run(tiny_lm_dir, mini_scifact.parent, tmp_path, fail_queries_after=3, partial_save_s=0,
             max_reasoning_tokens=4, batch_size=4)
    assert len(list((tmp_path / "cache").glob("*.queries.partial-rank0.pt"))) == 1
    calls: list[int] = []
    resumed, doc_calls = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, partial_save_s=0, max_reasoning_tokens=4,
                              batch_size=4, query_calls=calls)
    assert doc_calls == []  # the corpus was done before the queries: all of it from its partial file
    assert calls == [4, 4]  # only the second batch, in both modes (its direct rows were not saved yet)
    assert [r.metrics for r in resumed.rows] == [r.metrics for r in straight.rows]
    assert [r.reasoning for r in resumed.rows] == [r.reasoning for r in straight.rows]  # the analyses came back
    assert resumed._samples == straight._samples
    assert list((tmp_path / "cache").glob("*.partial*")) == []


def test_the_eta_leaves_out_work_a_resumed_run_already_had() -> None:
    line = ProgressLine("evaluate", total=10)
    line.start -= 100.0  # 100 s in: five batches came from a partial file, one was encoded
    line.skip(5)
    assert line.line(6).endswith("ETA 6m40s")  # 4 left at 100 s each, not at 100/6 s


def test_retriever_names_must_be_unique(tiny_lm_dir: Path) -> None:
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False)
    with pytest.raises(ValueError, match="unique"):
        RetrievalEvalModule([EmbeddingLMRetriever(encoder, name="a"), EmbeddingLMRetriever(encoder, name="a")])


class _RecordsHeldDocuments(RetrievalEvalModule):  # module level: ddp_spawn pickles it by reference
    """Writes how many document rows each rank holds when it searches."""

    def _documents(self, i, retriever, task):
        idx, emb = super()._documents(i, retriever, task)
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.output_dir) / f"held-rank{self.global_rank}.txt").write_text(f"{idx.numel()} {emb.shape[0]}")
        return idx, emb


@pytest.mark.e2e
def test_two_process_ddp_gives_the_single_process_numbers(tiny_lm_dir: Path, mini_scifact: Path, tmp_path: Path) -> None:
    import json

    from search_r3.evaluation.retrievers import BM25Retriever

    results = {}
    for name, strategy, devices in [("single", "auto", 1), ("ddp", "ddp_spawn", 2)]:
        encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                              max_reasoning_tokens=4)
        bm25 = BM25Retriever(index_dir=str(tmp_path / f"bm25-{name}"), threads=1)
        module = _RecordsHeldDocuments([EmbeddingLMRetriever(encoder, name="tiny", modes=["direct", "reasoning"]), bm25],
                                       output_dir=str(tmp_path / name), embedding_cache_dir=None)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        # batch 5: neither the 48 documents nor the 8 queries split evenly, so padding and sharding both matter
        trainer.test(module, datamodule=BEIRDataModule(data_root=str(mini_scifact.parent), datasets=["scifact"],
                                                       batch_size=5))
        results[name] = json.loads(next((tmp_path / name).rglob("metrics.json")).read_text())
        # BM25: one index, built by one process (rank 0), renamed into place: no temporary folder left.
        folders = [p for p in (tmp_path / f"bm25-{name}").iterdir() if p.is_dir()]
        builds = (tmp_path / f"bm25-{name}" / "builds.jsonl").read_text().splitlines()
        assert len(folders) == 1 and len(builds) == 1 and json.loads(builds[0])["rank"] == 0
    for row in (0, 1, 2):
        for key in ("nDCG@10", "R@100", "RR@10"):
            assert results["ddp"][row][key] == pytest.approx(results["single"][row][key], abs=1e-4)
    # The reasoning row's length statistics cover every rank's queries, each once.
    reasoning = [r for r in results["ddp"] if r["mode"] == "reasoning"][0]
    single = [r for r in results["single"] if r["mode"] == "reasoning"][0]
    for key in ("reasoning_queries", "reasoning_tokens_mean", "empty_reasoning_rate", "missing_embed_token_rate"):
        assert reasoning[key] == single[key], key
    assert reasoning["reasoning_queries"] == reasoning["num_queries"] == 8
    # The search is sharded: each rank holds only the documents it encoded (a padded repeat counts once).
    held = [int((tmp_path / "ddp" / f"held-rank{r}.txt").read_text().split()[0]) for r in (0, 1)]
    assert sum(held) == 48 and max(held) <= 0.55 * 48, held
    assert int((tmp_path / "single" / "held-rank0.txt").read_text().split()[0]) == 48


def test_a_reasoning_row_states_how_much_reasoning_there_was(tiny_lm_dir: Path, mini_scifact: Path,
                                                            tmp_path: Path) -> None:
    """The greedy analysis lengths of exactly the test queries, and the rendered row shows them."""
    from search_r3.evaluation.results_record import render_markdown

    module, _ = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, max_reasoning_tokens=4)
    direct, reasoning = module.rows
    assert direct.reasoning is None
    stats = reasoning.reasoning
    queries = list(module.trainer.datamodule.tasks[0].queries.values())
    lengths = [r.tokens for r in module.retrievers[0].encoder.reasoner.encode(queries)[1]]  # greedy: the same
    assert len(lengths) == reasoning.num_queries == 8 and all(0 <= n <= 4 for n in lengths)
    assert stats["reasoning_tokens_mean"] == pytest.approx(sum(lengths) / 8, abs=0.01)
    assert stats["empty_reasoning_rate"] == pytest.approx(sum(n == 0 for n in lengths) / 8)
    record = reasoning.record()
    assert record["reasoning_tokens_mean"] == stats["reasoning_tokens_mean"]
    assert f"reasoning ({stats['reasoning_tokens_mean']:.1f} tokens" in render_markdown([record])


def test_mlflow_gets_one_comparable_child_run_per_row(tiny_lm_dir: Path, mini_scifact: Path, tmp_path: Path) -> None:
    """Two retrievers and two modes under one command run: the same metric keys in every child, the row's
    identity as params, the reasoning row's analyses as a table, and search-r3-compare reads them back."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    from search_r3.evaluation.compare import rows_from_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="compare", tracking_uri=uri, artifact_location=str(tmp_path / "art"))
    long = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=4)
    short = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_document_tokens=16)
    module = RetrievalEvalModule([EmbeddingLMRetriever(long, name="tiny", modes=["direct", "reasoning"]),
                                  EmbeddingLMRetriever(short, name="tiny-short", modes=["direct"])],
                                 output_dir=str(tmp_path / "out"), embedding_cache_dir=None)
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=BEIRDataModule(data_root=str(mini_scifact.parent), datasets=["scifact"],
                                                   batch_size=16))

    client = MlflowClient(tracking_uri=uri)
    children = client.search_runs([logger.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{logger.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"scifact/tiny.direct", "scifact/tiny.reasoning", "scifact/tiny-short.direct"}
    for row in module.rows:
        child = by_name[f"scifact/{row.label}"]
        assert child.info.status == "FINISHED"
        assert {k: child.data.metrics[f"test/{k.replace('@', '_at_')}"] for k in row.metrics} == row.metrics
        assert (child.data.params["retriever"], child.data.params["mode"]) == (row.retriever, row.mode)
        assert child.data.params["dtype"] == "fp32" and child.data.params["num_docs"] == str(row.num_docs)
    assert by_name["scifact/tiny.reasoning"].data.metrics["test/reasoning_queries"] == 8

    reasoning = by_name["scifact/tiny.reasoning"].info.run_id
    table = json.loads(Path(client.download_artifacts(reasoning, "reasoning_samples.json", str(tmp_path))).read_text())
    assert table["columns"] == ["query_id", "query", "analysis", "analysis_tokens", "embed_token_appended",
                                "copies_query", "begins_with_closing"]
    task = trainer.datamodule.tasks[0]
    assert [r[1] for r in table["data"]] == list(task.queries.values())  # every test query, in order
    assert [r[0] for r in table["data"]] == list(task.queries)
    expected = {(r.query, r.analysis, r.tokens) for r in long.reasoner.encode(list(task.queries.values()))[1]}
    assert {(q, a, n) for _, q, a, n, *_ in table["data"]} == expected
    metrics = by_name["scifact/tiny.reasoning"].data.metrics  # every reasoning row says what its analyses are
    assert {"test/copies_query_rate", "test/begins_with_closing_rate", "test/capped_rate"} <= set(metrics)
    assert "reasoning_samples.json" not in {a.path for a in client.list_artifacts(by_name["scifact/tiny.direct"].info.run_id)}

    back = rows_from_runs(client, [client.get_run(logger.run_id)], "nDCG@10")
    assert sorted((r.label, r.metrics["nDCG@10"]) for r in back) == sorted((r.label, r.metrics["nDCG@10"]) for r in module.rows)


def test_per_query_breakdown_reads_the_tables_outputs(tiny_lm_dir: Path, mini_scifact: Path, tmp_path: Path) -> None:
    """The table folder holds each query's analysis beside the run files, and the breakdown script splits
    reasoning − direct by analysis and query length from them, consistently with the recorded row."""
    import subprocess
    import sys

    from search_r3.evaluation.metrics import evaluate_run
    from search_r3.evaluation.paired import read_run

    module, _ = _run(tiny_lm_dir, mini_scifact.parent, tmp_path, max_reasoning_tokens=4)
    out = next((tmp_path / "out").iterdir())
    lines = [json.loads(line) for line in (out / "analyses.scifact.tiny.reasoning.jsonl").read_text().splitlines()]
    task = module.trainer.datamodule.tasks[0]
    assert [row["query_id"] for row in lines] == list(task.queries)
    assert [row["query"] for row in lines] == list(task.queries.values())
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "per_query_breakdown.py"), "--grid", str(out),
                           "--system", "tiny", "--dataset", "scifact", "--data-root", str(mini_scifact.parent),
                           "--out", str(tmp_path / "breakdown.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "breakdown.json").read_text())
    groups = result["groups"]
    reasoning_row = [r for r in json.loads((out / "metrics.json").read_text()) if r["mode"] == "reasoning"][0]
    assert groups["all"]["queries"] == 8
    assert groups["empty analysis"]["queries"] == round(reasoning_row["empty_reasoning_rate"] * 8)
    assert groups["empty analysis"]["queries"] + groups["non-empty analysis"].get("queries", 0) == 8
    for mode in ("direct", "reasoning"):  # the breakdown's means are the runs' means
        mean = evaluate_run(task.qrels, read_run(out / f"run.scifact.tiny.{mode}.trec"), ["nDCG@10"])["nDCG@10"]
        assert groups["all"][mode] == pytest.approx(mean, abs=1e-9)
    lengths = [g for g in groups if g.split()[0] in ("short", "medium", "long") and "," not in g]
    assert sum(groups[g]["queries"] for g in lengths) == 8
