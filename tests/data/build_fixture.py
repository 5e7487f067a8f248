"""Rebuilds this folder's SciFact slice from a full BEIR SciFact copy (run from the repository root):

    python tests/data/build_fixture.py ../shared/data

Deterministic: the first 40 test queries (in qrels order) with every document judged for them, the first
40 rows of the prepared train triples (their queries, all their train judgements, the positives and the
first 5 negatives of each row), and the first 200 documents of the corpus as filler, all in corpus order;
and the first 600 prepared NFCorpus training rows (ids only).
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
TEST_QUERIES, TRAIN_ROWS, NEGATIVES, FILLER, NFCORPUS_ROWS = 40, 40, 5, 200, 600


def jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def qrels(path: Path) -> list[tuple[str, str, str]]:
    lines = path.read_text().splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines if line.strip()]


def write_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def main(source: Path) -> None:
    src = source / "beir" / "scifact"
    test = qrels(src / "qrels" / "test.tsv")
    test_qids = list(dict.fromkeys(q for q, _, _ in test))[:TEST_QUERIES]
    test = [r for r in test if r[0] in test_qids]
    rows = jsonl(source / "train" / "scifact_train_triples.jsonl.gz")[:TRAIN_ROWS]
    for r in rows:
        r["neg_ids"] = r["neg_ids"][:NEGATIVES]
    train_qids = {r["query_id"] for r in rows}
    train = [r for r in qrels(src / "qrels" / "train.tsv") if r[0] in train_qids]
    needed = {d for _, d, _ in test + train} | {n for r in rows for n in r["neg_ids"]}
    corpus = [d for i, d in enumerate(jsonl(src / "corpus.jsonl.gz")) if i < FILLER or d["_id"] in needed]
    queries = [q for q in jsonl(src / "queries.jsonl.gz") if q["_id"] in set(test_qids) | train_qids]
    out = OUT / "beir" / "scifact"
    write_gz(out / "corpus.jsonl.gz", corpus)
    write_gz(out / "queries.jsonl.gz", queries)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    for name, judged in (("test", test), ("train", train)):
        (out / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in judged))
    write_gz(OUT / "train" / "scifact_train_triples.jsonl.gz", rows)
    # ids only (no NFCorpus corpus here): for the batch sampler's tests on real clashing rows
    write_gz(OUT / "train" / "nfcorpus_train_triples.jsonl.gz",
             jsonl(source / "train" / "nfcorpus_train_triples.jsonl.gz")[:NFCORPUS_ROWS])
    (OUT / "mkqa").mkdir(exist_ok=True)
    shutil.copy(source / "mkqa" / "mkqa_test_sample6.jsonl.gz", OUT / "mkqa" / "mkqa_test_sample6.jsonl.gz")
    print(f"{len(corpus)} documents, {len(queries)} queries, {len(test)} test and {len(train)} train judgements, "
          f"{len(rows)} train rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
