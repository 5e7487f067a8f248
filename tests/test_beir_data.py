"""BEIRDataModule and readers on the real SciFact/NFCorpus files and on corrupted copies of real data."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from search_r3.datamodules import beir
from search_r3.datamodules.beir import BEIRDataModule, CorpusStream, QueryBatches
from search_r3.datamodules.beir_files import DataFormatError


def _module(root: Path, **kw) -> BEIRDataModule:
    dm = BEIRDataModule(data_root=str(root), **kw)
    dm.setup("test")
    return dm


def test_real_scifact_and_nfcorpus_counts(shared_data_root: Path) -> None:
    dm = _module(shared_data_root, datasets=["beir/scifact", "beir/nfcorpus"])
    scifact, nfcorpus = dm.tasks
    assert (len(scifact.queries), scifact.num_docs, sum(map(len, scifact.qrels.values()))) == (300, 5183, 339)
    assert (len(nfcorpus.queries), nfcorpus.num_docs, sum(map(len, nfcorpus.qrels.values()))) == (323, 3633, 12334)
    grades = {r for judged in nfcorpus.qrels.values() for r in judged.values()}
    assert grades == {1, 2}  # graded relevance kept as given
    assert all(isinstance(d, str) for d in scifact.doc_ids[:10])


def test_corpus_stream_reads_every_document_once(mini_scifact: Path) -> None:
    dm = _module(mini_scifact.parent, datasets=["scifact"], batch_size=5, sort_window=7)
    task = dm.tasks[0]
    loader = dm.test_dataloader()[0]
    seen = [(i, d) for batch in loader for i, d in zip(batch["index"], batch["id"])]
    assert sorted(i for i, _ in seen) == list(range(task.num_docs))
    assert all(task.doc_ids[i] == d for i, d in seen)
    lengths = [len(t) for batch in loader for t in batch["text"]]
    assert lengths[:7] == sorted(lengths[:7], reverse=True)  # sorted inside the first window


def _batches_on(stream, world: int, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, ...]]]:
    """Each rank's batches (as tuples of indices) when ``stream`` is read by ``world`` processes."""
    ranks = []
    for rank in range(world):
        monkeypatch.setattr(beir, "world_and_rank", lambda r=rank: (world, r))
        ranks.append([tuple(row["index"] for row in batch) for batch in stream])
        assert len(ranks[-1]) == len(stream)  # the length progress bars use
    return ranks


@pytest.mark.parametrize("kind", ["documents", "queries"])
def test_every_world_size_encodes_the_same_batches(mini_scifact: Path, monkeypatch: pytest.MonkeyPatch,
                                                   kind: str) -> None:
    """A text meets the same neighbours on 1, 2 or 3 processes (bf16 embeddings depend on the batch), and
    the ranks' shares are disjoint and cover every text once."""
    task = _module(mini_scifact.parent, datasets=["scifact"]).tasks[0]
    stream = CorpusStream(task, batch_size=5, sort_window=7) if kind == "documents" else QueryBatches(task, batch_size=3)
    one = _batches_on(stream, 1, monkeypatch)[0]
    assert sorted(i for b in one for i in b) == list(range(task.num_docs if kind == "documents" else len(task.queries)))
    for world in (2, 3):
        ranks = _batches_on(stream, world, monkeypatch)
        assert sorted(b for r in ranks for b in r) == sorted(one), world
        assert [len(r) for r in ranks] == [len(range(k, len(one), world)) for k in range(world)]


def test_fewer_batches_than_ranks_still_give_every_rank_a_batch(mini_scifact: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning refuses a rank with an empty validation loader: 8 queries in batches of 5 (two batches)
    on 3 ranks are one batch each, and 2 queries on 3 ranks repeat one (the merge keeps one copy)."""
    task = _module(mini_scifact.parent, datasets=["scifact"]).tasks[0]
    assert _batches_on(QueryBatches(task, batch_size=5), 3, monkeypatch) == [[(0, 1)], [(2, 3, 4)], [(5, 6, 7)]]
    two = _module(mini_scifact.parent, datasets=["scifact"], max_queries=2).tasks[0]
    assert _batches_on(QueryBatches(two, batch_size=5), 3, monkeypatch) == [[(0,)], [(1,)], [(0,)]]


def test_capped_run_keeps_judged_documents(data_root: Path) -> None:
    task = _module(data_root, max_queries=10, max_corpus_docs=100).tasks[0]
    assert len(task.queries) == 10 and task.num_docs == 100 and task.corpus_size == 400
    judged = {d for j in task.qrels.values() for d in j}
    assert judged <= set(task.doc_ids)


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_gz(path: Path, edit) -> None:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    lines = edit(lines)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def test_malformed_corpus_line_names_file_and_line(mini_scifact: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(mini_scifact, tmp_path / "data" / "scifact")
    _rewrite_gz(bad / "corpus.jsonl.gz", lambda ls: ls[:3] + ['{"_id": "x", "text": '] + ls[3:])
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl\.gz:4: not valid JSON"):
        _module(bad.parent, datasets=["scifact"])


def test_duplicate_document_id_is_an_error(mini_scifact: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(mini_scifact, tmp_path / "data" / "scifact")
    _rewrite_gz(bad / "corpus.jsonl.gz", lambda ls: ls + [ls[0]])
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl\.gz:49: duplicate document id .* \(first at line 1\)"):
        _module(bad.parent, datasets=["scifact"])


def test_missing_files_are_named(mini_scifact: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(mini_scifact, tmp_path / "data" / "scifact")
    (bad / "queries.jsonl.gz").unlink()
    with pytest.raises(DataFormatError, match=r"queries\.test\.jsonl: no such file .*corpus\.jsonl\.gz"):
        _module(bad.parent, datasets=["scifact"])
    with pytest.raises(DataFormatError, match="dev.tsv: no such file"):
        _module(mini_scifact.parent, datasets=["scifact"], split="dev")
    with pytest.raises(DataFormatError, match="does not exist"):
        _module(tmp_path / "nowhere")


def test_unknown_document_in_qrels_errors_or_is_counted(mini_scifact: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(mini_scifact, tmp_path / "data" / "scifact")
    qrels = bad / "qrels" / "test.tsv"
    lines = qrels.read_text().splitlines()
    qid = lines[1].split("\t")[0]
    qrels.write_text("\n".join(lines + [f"{qid}\tNO-SUCH-DOC\t1"]) + "\n")
    with pytest.raises(DataFormatError, match=rf"test\.tsv:{len(lines) + 1}: judgement names a document missing"):
        _module(bad.parent, datasets=["scifact"])
    task = _module(bad.parent, datasets=["scifact"], on_bad_row="skip").tasks[0]
    assert task.report.skipped["judgement names a document missing from corpus.jsonl.gz"] == 1
    assert "NO-SUCH-DOC" not in task.qrels[qid]


def test_empty_query_errors_or_is_counted(mini_scifact: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(mini_scifact, tmp_path / "data" / "scifact")
    _rewrite_gz(bad / "queries.jsonl.gz", lambda ls: [ls[0].replace('"text": "', '"text": "   ', 1).split('"text"')[0]
                                                       + '"text": ""}'] + ls[1:])
    with pytest.raises(DataFormatError, match=r"queries\.jsonl\.gz:1: empty query"):
        _module(bad.parent, datasets=["scifact"])
    task = _module(bad.parent, datasets=["scifact"], on_bad_row="skip").tasks[0]
    assert task.report.skipped == {"empty query": 1} and len(task.queries) == 7


def test_malformed_qrels_line(mini_scifact: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(mini_scifact, tmp_path / "data" / "scifact")
    qrels = bad / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "only-two\tcolumns\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:\d+: expected 3 tab-separated columns"):
        _module(bad.parent, datasets=["scifact"])


def test_suite_finds_sets_with_a_corpus_and_picks_up_new_ones(data_root: Path, mini_scifact: Path, tmp_path: Path) -> None:
    from search_r3.datamodules.beir import BEIRSuiteDataModule

    assert [Path(p).name for p in BEIRSuiteDataModule(data_root=str(data_root)).discover()] == ["scifact"]
    # A query-only set (queries.test.jsonl.gz + qrels, as in beir_queries_qrels_only/) joins once a corpus is added.
    root = tmp_path / "data"
    shutil.copytree(mini_scifact, root / "beir" / "scifact")
    qonly = root / "beir_queries_qrels_only" / "mini"
    shutil.copytree(mini_scifact / "qrels", qonly / "qrels")
    shutil.copy(mini_scifact / "queries.jsonl.gz", qonly / "queries.test.jsonl.gz")
    assert BEIRSuiteDataModule(data_root=str(root)).discover() == [str((root / "beir" / "scifact").resolve())]
    shutil.copy(mini_scifact / "corpus.jsonl.gz", qonly / "corpus.jsonl.gz")
    suite = BEIRSuiteDataModule(data_root=str(root))
    suite.setup("test")
    assert [t.name for t in suite.tasks] == ["scifact", "mini"] and len(suite.tasks[1].queries) == 8
