"""search-r3-mine on a real SciFact training subset: judged documents never become negatives, with BM25 or the
model as the ranker."""

from __future__ import annotations

from pathlib import Path

from search_r3.datamodules.beir_files import judged_in_any_split
from search_r3.mining import main
from search_r3.datamodules.training_rows import read_training_rows


def test_mined_rows_exclude_judged_documents_and_respect_the_window(mini_train_root: Path, tmp_path: Path) -> None:
    dataset = mini_train_root / "beir" / "scifact"
    out = tmp_path / "mined.jsonl.gz"
    main(["--dataset", str(dataset), "--out", str(out), "--window", "1", "20", "--negatives", "5",
          "--index-dir", str(tmp_path / "bm25")])
    rows = read_training_rows(out)
    judged = judged_in_any_split(dataset)
    assert len(rows) == 24  # one row per (query, positive) of the train qrels
    for r in rows:
        assert 0 < len(r.neg_ids) <= 5
        assert not set(r.neg_ids) & judged[r.query_id]


def test_window_skips_the_top_ranks(mini_train_root: Path, tmp_path: Path) -> None:
    from search_r3.datamodules.beir import BEIRDataModule
    from search_r3.mining import mine_negatives
    from search_r3.evaluation.retrievers import BM25Retriever

    dataset = mini_train_root / "beir" / "scifact"
    dm = BEIRDataModule(data_root=str(dataset.parent), datasets=["scifact"], split="train")
    dm.setup("fit")
    run = BM25Retriever(index_dir=str(tmp_path / "bm25")).search(dm.tasks[0], k=20)
    for row in mine_negatives(dataset, window=(5, 20), index_dir=str(tmp_path / "bm25")):
        top5 = set(list(run[row["query_id"]])[:5])
        assert not set(row["neg_ids"]) & top5
        assert set(row["neg_ids"]) <= set(list(run[row["query_id"]])[5:20])


def test_mining_with_the_model_ranks_by_its_embeddings(mini_train_root: Path, tiny_lm_dir: Path, tmp_path: Path) -> None:
    """``--adapter`` mines with the wrapper itself: negatives are its own top ranks inside the window,
    judged documents excluded, exactly as with BM25."""
    from search_r3.datamodules.beir import BEIRDataModule
    from search_r3.mining import model_ranking

    dataset = mini_train_root / "beir" / "scifact"
    out = tmp_path / "mined-model.jsonl.gz"
    main(["--dataset", str(dataset), "--out", str(out), "--window", "2", "12", "--negatives", "4",
          "--adapter", "none", "--base-model", str(tiny_lm_dir)])
    rows = read_training_rows(out)
    judged = judged_in_any_split(dataset)
    dm = BEIRDataModule(data_root=str(dataset.parent), datasets=["scifact"], split="train")
    dm.setup("fit")
    run = model_ranking(dm.tasks[0], 12, adapter=None, base_model=str(tiny_lm_dir))
    assert len(rows) == 24
    for r in rows:
        ranked = sorted(run[r.query_id], key=lambda d: -run[r.query_id][d])
        window = [d for d in ranked[2:12] if d not in judged[r.query_id]]
        assert list(r.neg_ids) == window[:4]
