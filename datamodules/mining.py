"""``search-r3-mine``: BM25 hard negatives for a BEIR dataset, in the training-row format.

    search-r3-mine --dataset ../shared/data/beir/scifact --out runs/mined/scifact.jsonl.gz --window 10 100

For every judged query of ``--split`` and each of its positives, the negatives are BM25's ranks inside
``--window`` (0-based, end exclusive) minus every document judged for that query in *any* split
(a judged document is never a negative; unjudged does not mean irrelevant, so skipping the top ranks
with the window lowers the false-negative rate). Rows: ``{"dataset", "split", "query_id", "query",
"pos_id", "pos_score", "neg_ids"}``, readable by :func:`datamodules.training_rows.read_training_rows`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from datamodules.beir import BEIRDataModule
from datamodules.beir_files import judged_in_any_split

log = logging.getLogger(__name__)


def mine_bm25_negatives(dataset_dir: Path, split: str = "train", window: tuple[int, int] = (0, 100),
                        num_negatives: int = 30, index_dir: str = ".cache/search_r3/bm25",
                        max_queries: int | None = None) -> Iterator[dict]:
    from evaluation.retrievers import BM25Retriever

    lo, hi = window
    if not 0 <= lo < hi:
        raise ValueError(f"rank window must satisfy 0 <= start < end, got {window}")
    dm = BEIRDataModule(data_root=str(dataset_dir.parent), datasets=[dataset_dir.name], split=split,
                        max_queries=max_queries)
    dm.setup("fit")
    task = dm.tasks[0]
    judged = judged_in_any_split(dataset_dir)
    run = BM25Retriever(index_dir=index_dir).search(task, k=hi)
    for qid, text in task.queries.items():
        ranked = list(run.get(qid, {}))[lo:hi]
        negatives = [d for d in ranked if d not in judged.get(qid, set())][:num_negatives]
        for pos_id, score in task.qrels[qid].items():
            if score > 0:
                yield {"dataset": task.name, "split": split, "query_id": qid, "query": text, "pos_id": pos_id,
                       "pos_score": score, "neg_ids": negatives}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="search-r3-mine", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="a BEIR folder (corpus, queries, qrels/)")
    parser.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz")
    parser.add_argument("--split", default="train")
    parser.add_argument("--window", type=int, nargs=2, default=(0, 100), metavar=("START", "END"))
    parser.add_argument("--negatives", type=int, default=30)
    parser.add_argument("--index-dir", default=".cache/search_r3/bm25")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if out.suffix == ".gz" else open
    n = 0
    with opener(out, "wt", encoding="utf-8") as fh:
        for row in mine_bm25_negatives(Path(args.dataset), args.split, tuple(args.window), args.negatives,
                                       args.index_dir):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    log.info("wrote %d rows to %s", n, out)


if __name__ == "__main__":
    main()
