"""``search-r3-mine``: hard negatives for a BEIR dataset, in the training-row format, from BM25 or the model.

    search-r3-mine --dataset beir/scifact --out runs/mined/scifact.jsonl.gz --window 10 100
    search-r3-mine --dataset beir/scifact --out runs/mined/scifact-sft.jsonl.gz \
        --adapter runs/sft/adapter/best --window 10 100        # ranked by the current Stage-1 model

For every judged query of ``--split`` and each of its positives, the negatives are the ranker's ranks
inside ``--window`` (0-based, end exclusive) minus every document judged for that query in *any* split
(a judged document is never a negative; unjudged does not mean irrelevant, so skipping the top ranks
with the window lowers the false-negative rate). The ranker is BM25 (pyserini), or with ``--adapter``
the search-r3 wrapper itself (``none``: the untrained wrapper) in direct mode, exact search: negatives
the current model confuses with positives, the usual second round of mining. Rows: ``{"dataset",
"split", "query_id", "query", "pos_id", "pos_score", "neg_ids"}``, readable by
:func:`search_r3.datamodules.training_rows.read_training_rows`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from search_r3.datamodules.beir import BEIRDataModule, RetrievalTask
from search_r3.datamodules.beir_files import judged_in_any_split
from search_r3.datamodules.bm25 import BM25Index
from search_r3.datamodules.sources import resolve_beir
from search_r3.datamodules.training_sources import rows_from_ranking
from search_r3.evaluation.metrics import Run
from search_r3.common.errors import report_user_errors

log = logging.getLogger(__name__)


def bm25_ranking(task: RetrievalTask, k: int, index_dir: str = ".cache/search_r3/bm25") -> Run:
    return BM25Index(index_dir=index_dir).search(task, k=k)


def model_ranking(task: RetrievalTask, k: int, adapter: str | None, base_model: str = "smollm2-135m-instruct",
                  max_document_tokens: int = 256) -> Run:
    """Exact top-k of the search-r3 wrapper (direct mode) over the task's corpus."""
    from search_r3.evaluation.metrics import build_run
    from search_r3.common.search import exact_topk
    from search_r3.model.embedding_lm import EmbeddingLM

    encoder = EmbeddingLM(base_model=base_model, adapter=adapter, max_document_tokens=max_document_tokens)
    with encoder.inference():
        docs = encoder.encode(task.load_texts(), "document")
        queries = encoder.encode(list(task.queries.values()), "query")
    scores, idx = exact_topk(queries, docs, k=min(k + 1, len(task.doc_ids)))
    return build_run(list(task.queries), task.doc_ids, scores, idx)


def mine_negatives(dataset_dir: Path, split: str = "train", window: tuple[int, int] = (0, 100),
                   num_negatives: int = 30, index_dir: str = ".cache/search_r3/bm25", max_queries: int | None = None,
                   adapter: str | None = None, use_model: bool = False,
                   base_model: str = "smollm2-135m-instruct") -> Iterator[dict]:
    """Training rows with negatives from BM25 (default) or, with ``use_model``, the wrapper loaded with
    ``adapter`` (``None``: untrained)."""
    if not 0 <= window[0] < window[1]:
        raise ValueError(f"rank window must satisfy 0 <= start < end, got {window}")
    dm = BEIRDataModule(datasets=[str(dataset_dir)], split=split, max_queries=max_queries)
    dm.setup("fit")
    task = dm.tasks[0]
    hi = window[1]
    run = model_ranking(task, hi, adapter, base_model) if use_model else bm25_ranking(task, hi, index_dir)
    yield from rows_from_ranking(task, run, judged_in_any_split(dataset_dir), window, num_negatives)


def main(argv: list[str] | None = None) -> None:
    report_user_errors(lambda: _main(argv), "search-r3-mine")


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="search-r3-mine", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True,
                        help="a BEIR dataset name (beir/scifact, hf:BeIR/scifact) or folder (corpus, queries, qrels/)")
    parser.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz")
    parser.add_argument("--split", default="train")
    parser.add_argument("--window", type=int, nargs=2, default=(0, 100), metavar=("START", "END"))
    parser.add_argument("--negatives", type=int, default=30)
    parser.add_argument("--index-dir", default=".cache/search_r3/bm25")
    parser.add_argument("--adapter", default=None,
                        help="rank with the search-r3 wrapper loaded with this adapter ('none': untrained) instead of BM25")
    parser.add_argument("--base-model", default="smollm2-135m-instruct", help="the wrapper's base model (with --adapter)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if out.suffix == ".gz" else open
    n = 0
    with opener(out, "wt", encoding="utf-8") as fh:
        for row in mine_negatives(resolve_beir(args.dataset, split=args.split), args.split, tuple(args.window), args.negatives,
                                  args.index_dir, adapter=None if args.adapter in (None, "none") else args.adapter,
                                  use_model=args.adapter is not None, base_model=args.base_model):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    log.info("wrote %d rows to %s", n, out)


if __name__ == "__main__":
    main()
