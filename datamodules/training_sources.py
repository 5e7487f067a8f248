"""Where Stage-1 training rows come from: prepared triples files, a BEIR dataset's train qrels with hard
negatives mined on the fly, or a Hugging Face triplet dataset.

Each source gives the same thing, a :class:`RowSource`: rows (query, positive, negatives by id), the texts
of the documents they name, and the judgements known for its queries (for masking known positives). The
DataModule (:mod:`search_r3.datamodules.contrastive`) namespaces and mixes them.

- **Prepared files** (``train/scifact_train_triples.jsonl.gz``): rows by id; texts from the dataset's
  BEIR corpus, found like any dataset (:mod:`search_r3.datamodules.sources`).
- **Mined** (``beir/scifact``): every positive of the dataset's ``train`` qrels, with BM25's top ranks minus
  every judged document as negatives (what ``search-r3-mine`` writes). The rows are cached under
  ``<cache>/mined/`` keyed by the content of the dataset's files and the mining settings, so a second run
  (or another rank) reads them instead of mining again.
- **Hugging Face triplets** (``hf:sentence-transformers/...`` or a local folder): the sentence-transformers
  layouts (``anchor, positive[, negative...]`` or ``query, positive[, negative...]``) and Tevatron's
  (``query, positive_passages, negative_passages``), streamed with ``datasets``. Passages without an id get
  one from their text's digest, so the no-duplicates sampler still sees a repeated passage as one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from search_r3.datamodules.beir import BEIRDataModule, RetrievalTask
from search_r3.datamodules.beir_files import (
    DataFormatError,
    document_text,
    find_file,
    iter_corpus,
    judged_in_any_split,
)
from search_r3.datamodules.bm25 import BM25Index
from search_r3.datamodules.sources import (
    ENV_HF_MIRROR,
    HF_PREFIX,
    DatasetName,
    atomic_write_lines,
    cache_dir,
    data_roots,
    resolve_beir,
)
from search_r3.datamodules.training_rows import TrainingRow, read_training_rows
from search_r3.common.digests import hash_file

log = logging.getLogger(__name__)
MINING_FORMAT = 1  # bump when the mined rows' recipe changes, so old cache entries are not reused


@dataclass
class RowSource:
    """One source's training rows, the texts of the documents they name, and known judgements."""

    name: str  # namespace of its ids (``scifact``)
    rows: list[TrainingRow]
    texts: dict[str, str]  # document id -> text, for every id the rows use
    relevant: dict[str, set[str]] = field(default_factory=dict)  # query id -> documents judged relevant
    files: list[tuple[str, Path]] = field(default_factory=list)  # (kind, file) read, for the run's record
    validation: str | None = None  # a BEIR dataset (name or folder) whose train queries can be held out


def corpus_texts(folder: Path, needed: set[str], what: str) -> dict[str, str]:
    """Texts of the ``needed`` document ids from a BEIR folder's corpus; an unknown id is an error."""
    corpus = find_file(folder, "corpus.jsonl")
    texts = {doc_id: text for _, doc_id, text in iter_corpus(corpus) if doc_id in needed}
    unknown = needed - texts.keys()
    if unknown:
        raise DataFormatError(f"{len(unknown)} document ids of {what} are not in {corpus} (e.g. {sorted(unknown)[:3]})")
    return texts


def find_rows_file(rel: str, data_root: str | None) -> Path:
    """A prepared triples file: a path that exists, or ``rel`` under a local root (data root, mirrors)."""
    direct = Path(rel).expanduser()
    if direct.is_file():
        return direct
    looked = []
    for _, root in data_roots(data_root):
        if (root / rel).is_file():
            return root / rel
        looked.append(str(root / rel))
    raise DataFormatError(f"training file {rel} not found (looked in {', '.join(looked) or 'no local root'}); "
                          "without prepared files, name the dataset in train_datasets (rows mined from its train "
                          "qrels) or a Hugging Face triplet dataset in hf_triplets")


def prepared_source(rel: str, data_root: str | None, num_negatives: int) -> RowSource:
    path = find_rows_file(rel, data_root)
    dataset = path.name.split("_train_triples")[0]
    rows = read_training_rows(path)
    folder = resolve_beir(f"beir/{dataset}", data_root)
    needed = {r.pos_id for r in rows} | {n for r in rows for n in r.neg_ids[:num_negatives]}
    texts = corpus_texts(folder, needed, f"the {dataset} training rows ({path})")
    return RowSource(dataset, rows, texts, judged_in_any_split(folder, min_score=1), [("train-triples", path)],
                     f"beir/{dataset}")


def mining_key(folder: Path, split: str, window: tuple[int, int], num_negatives: int) -> str:
    """Digest of everything mined rows depend on: the dataset's files and the mining settings."""
    h = hashlib.sha256(json.dumps([MINING_FORMAT, split, list(window), num_negatives]).encode())
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        hash_file(f, h)
    return h.hexdigest()[:16]


def mined_source(spec: str, data_root: str | None, num_negatives: int, window: tuple[int, int],
                 negatives_kept: int) -> RowSource:
    """Rows of ``spec``'s train qrels with BM25 negatives, mined once and cached by content."""
    folder = resolve_beir(spec, data_root, "train")
    name = DatasetName(spec).name
    key = mining_key(folder, "train", window, negatives_kept)
    path = cache_dir() / "mined" / f"{name}-train-bm25-{key}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            log.info("mining BM25 hard negatives for %s (train qrels, ranks %s); cached in %s", spec, window, path)
            loader = BEIRDataModule(datasets=[str(folder)], split="train")
            loader.setup("fit")
            task = loader.tasks[0]
            run = BM25Index().search(task, k=window[1])
            rows = rows_from_ranking(task, run, judged_in_any_split(folder), window, negatives_kept)
            n = atomic_write_lines(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            log.info("%s: %d mined rows", spec, n)
    rows = read_training_rows(path)
    needed = {r.pos_id for r in rows} | {n for r in rows for n in r.neg_ids[:num_negatives]}
    texts = corpus_texts(folder, needed, f"the rows mined for {spec}")
    return RowSource(name, rows, texts, judged_in_any_split(folder, min_score=1), [("train-mined-bm25", path)], spec)


def rows_from_ranking(task: RetrievalTask, run: dict[str, dict[str, float]], judged: dict[str, set[str]],
                      window: tuple[int, int], num_negatives: int) -> Iterator[dict]:
    """Training rows of a task's judged queries: one per positive, with the ranker's ranks inside
    ``window`` (0-based, end exclusive) minus every document judged for the query in any split (a judged
    document is never a negative; unjudged does not mean irrelevant) as negatives, first ``num_negatives``."""
    lo, hi = window
    if not 0 <= lo < hi:
        raise ValueError(f"rank window must satisfy 0 <= start < end, got {window}")
    for qid, text in task.queries.items():
        ranked = sorted(run.get(qid, {}).items(), key=lambda item: -item[1])
        negatives = [d for d, _ in ranked[lo:hi] if d not in judged.get(qid, set())][:num_negatives]
        for pos_id, score in task.qrels[qid].items():
            if score > 0:
                yield {"dataset": task.name, "split": task.split, "query_id": qid, "query": text, "pos_id": pos_id,
                       "pos_score": score, "neg_ids": negatives}


def _text_id(text: str) -> str:
    return "t" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _passage(value: object, where: str) -> tuple[str, str]:
    """(id, text) of a passage given as a string or as Tevatron's ``{docid, title, text}``."""
    if isinstance(value, str):
        text = value.strip()
        return _text_id(text), text
    if isinstance(value, dict):
        text = document_text(value)
        doc_id = value.get("docid") or value.get("doc_id") or value.get("_id")
        return (str(doc_id) if doc_id not in (None, "") else _text_id(text)), text
    raise DataFormatError(f"{where}: a passage must be a string or an object with 'text', got {type(value).__name__}")


def triplet_rows(records: Iterator[dict], where: str, max_rows: int | None) -> tuple[list[TrainingRow], dict[str, str]]:
    """Training rows and texts from sentence-transformers or Tevatron records (see the module doc)."""
    rows: list[TrainingRow] = []
    texts: dict[str, str] = {}
    for i, rec in enumerate(records):
        if max_rows is not None and len(rows) >= max_rows:
            break
        at = f"{where} row {i}"
        query = rec.get("anchor", rec.get("query"))
        if not isinstance(query, str) or not query.strip():
            raise DataFormatError(f"{at}: no query text (expected an 'anchor' or 'query' column; columns: {sorted(rec)})")
        if "positive_passages" in rec:  # Tevatron
            positives = [_passage(p, at) for p in rec.get("positive_passages") or []]
            negatives = [_passage(p, at) for p in rec.get("negative_passages") or []]
        elif "positive" in rec:  # sentence-transformers: negative, or negative_1..n, or negatives (a list)
            positives = [_passage(rec["positive"], at)]
            negs = rec.get("negatives")
            negs = negs if isinstance(negs, list) else [rec[k] for k in sorted(rec) if k == "negative" or
                                                       k.startswith("negative_")]
            negatives = [_passage(n, at) for n in negs if n is not None]
        else:
            raise DataFormatError(f"{at}: neither a sentence-transformers triplet ('positive') nor a Tevatron row "
                                  f"('positive_passages'); columns: {sorted(rec)}")
        if not positives:
            raise DataFormatError(f"{at}: no positive passage")
        qid = str(rec.get("query_id") or _text_id(query))
        for doc_id, text in positives + negatives:
            texts[doc_id] = text
        pos_id = positives[0][0]
        rows.append(TrainingRow(qid, query.strip(), pos_id, tuple(d for d, _ in negatives if d != pos_id)))
    if not rows:
        raise DataFormatError(f"{where}: no training rows")
    return rows, texts


def hf_triplet_source(spec: str, split: str = "train", config: str | None = None,
                      max_rows: int | None = None) -> RowSource:
    """Rows streamed from a Hugging Face dataset id (``hf:org/name``; ``$SEARCH_R3_HF_MIRROR`` reads a
    local copy laid out like the hub) or a local folder of such files."""
    import datasets

    repo = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    mirror = os.environ.get(ENV_HF_MIRROR)
    location = str(Path(mirror).expanduser() / repo) if mirror and spec.startswith(HF_PREFIX) else repo
    try:
        records = datasets.load_dataset(location, config, split=split, streaming=True)
        rows, texts = triplet_rows(iter(records), f"{spec} ({split})", max_rows)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, DataFormatError):
            raise
        raise DataFormatError(f"{spec}: could not stream split {split!r} from {location} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:300]}); offline, set ${ENV_HF_MIRROR} to a local copy") from err
    name = repo.rstrip("/").split("/")[-1]
    log.info("%s: %d training rows streamed (%d passages)", spec, len(rows), len(texts))
    return RowSource(name, rows, texts)
