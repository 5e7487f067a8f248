"""Readers for BEIR-format folders: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` (plain or .gz).

Every problem is reported with the file and line it comes from. Problems that cannot be skipped
without changing what a number means (a malformed corpus line, a duplicate id) always raise; the
rest follow ``on_bad_row``: ``"error"`` (default) raises, ``"skip"`` drops the row and counts it in
:class:`ReadReport`, which the caller logs next to the metrics.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from search_r3.common.errors import UserError

OnBadRow = Literal["error", "skip"]


class DataFormatError(UserError, ValueError):
    """A BEIR file is missing or malformed; the message names the file and line."""


@dataclass
class ReadReport:
    """Rows dropped under ``on_bad_row="skip"`` (and other facts worth logging), by reason."""

    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str, on_bad_row: OnBadRow) -> None:
        """Raise ``where: reason (detail)`` or count the skip under ``reason``."""
        message = f"{where}: {reason} ({detail})"
        if on_bad_row == "error":
            raise DataFormatError(f"{message}; to drop and count such rows instead, set on_bad_row: skip")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, message)


def find_file(folder: Path, stem: str) -> Path:
    """``folder/stem`` or ``folder/stem.gz``; an error lists what the folder does contain."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    hint = f"it contains {present}" if present is not None else "the folder does not exist"
    raise DataFormatError(f"{folder / stem}: no such file (nor {stem}.gz); {hint}")


def find_queries_file(folder: Path, split: str) -> Path:
    """``queries.jsonl`` (all splits, BEIR's layout) or ``queries.<split>.jsonl`` (one split only)."""
    try:
        return find_file(folder, "queries.jsonl")
    except DataFormatError:
        return find_file(folder, f"queries.{split}.jsonl")


def iter_lines(path: Path, report: ReadReport | None = None, on_bad_row: OnBadRow = "error") -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a plain or gzipped UTF-8 file, decoded line by line, so a byte that is
    not UTF-8 is reported with its file and line (and, under ``on_bad_row="skip"``, that line is dropped
    and counted) instead of a ``UnicodeDecodeError`` that names neither."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                (report or ReadReport()).skip(
                    "not UTF-8", f"{path}:{lineno}",
                    f"byte {raw[err.start]:#04x} at column {err.start + 1}; re-save the file as UTF-8", on_bad_row)


def iter_jsonl(path: Path, report: ReadReport | None = None, on_bad_row: OnBadRow = "error") -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for each non-blank line; a line that is not a JSON object raises (a
    line that is not UTF-8 follows ``on_bad_row``)."""
    for lineno, line in iter_lines(path, report, on_bad_row):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            # json's messages may end in "at" ("Unterminated string starting at"): the position follows
            reason = err.msg.removesuffix(" at")
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({reason} at column {err.colno})") from err
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _id_of(obj: dict, path: Path, lineno: int) -> str:
    if "_id" not in obj:
        raise DataFormatError(f"{path}:{lineno}: no '_id' field (keys: {sorted(obj)})")
    return str(obj["_id"])


def document_text(obj: dict) -> str:
    """Title and body joined by a space, as BEIR's own dense-model evaluation does."""
    title = (obj.get("title") or "").strip()
    text = (obj.get("text") or "").strip()
    return f"{title} {text}".strip()


def iter_corpus(path: Path, report: ReadReport | None = None,
                on_bad_row: OnBadRow = "error") -> Iterator[tuple[int, str, str]]:
    """Streams ``(line_number, doc_id, text)``; a line without ``_id`` or with a non-string text raises
    (a line that is not UTF-8 follows ``on_bad_row``)."""
    for lineno, obj in iter_jsonl(path, report, on_bad_row):
        doc_id = _id_of(obj, path, lineno)
        for key in ("title", "text"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise DataFormatError(f"{path}:{lineno}: field {key!r} of document {doc_id!r} is not a string")
        yield lineno, doc_id, document_text(obj)


def read_queries(
    path: Path, wanted: set[str] | None, report: ReadReport, on_bad_row: OnBadRow
) -> tuple[dict[str, str], set[str]]:
    """Query id -> text for the ids in ``wanted`` (all when ``None``), and the ids skipped because
    their text is empty (which follows ``on_bad_row``)."""
    queries: dict[str, str] = {}
    empty: set[str] = set()
    where: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path, report, on_bad_row):
        qid = _id_of(obj, path, lineno)
        if wanted is not None and qid not in wanted:
            continue
        if qid in queries:
            raise DataFormatError(f"{path}:{lineno}: duplicate query id {qid!r} (first at line {where[qid]})")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            report.skip("empty query", f"{path}:{lineno}", f"query {qid!r}", on_bad_row)
            empty.add(qid)
            continue
        queries[qid] = text.strip()
        where[qid] = lineno
    return queries, empty


Qrels = dict[str, dict[str, int]]


def read_qrels(path: Path, report: ReadReport, on_bad_row: OnBadRow) -> tuple[Qrels, dict[tuple[str, str], int]]:
    """Query id -> {doc id: graded relevance} in file order, and the line of each judgement (for
    error messages about ids found later to be unknown). The BEIR header line is optional."""
    qrels: Qrels = {}
    lines: dict[tuple[str, str], int] = {}
    for lineno, line in iter_lines(path, report, on_bad_row):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        if lineno == 1 and cols[0].strip().lower() in {"query-id", "query_id", "qid"}:
            continue
        if len(cols) != 3:
            raise DataFormatError(
                f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}"
            )
        qid, did, score = (c.strip() for c in cols)
        try:
            rel = int(float(score))
        except ValueError as err:
            raise DataFormatError(f"{path}:{lineno}: score {score!r} is not a number") from err
        if qid in qrels and did in qrels[qid]:
            report.skip("duplicate qrel", f"{path}:{lineno}", f"query {qid!r}, document {did!r}", on_bad_row)
            continue
        qrels.setdefault(qid, {})[did] = rel
        lines[(qid, did)] = lineno
    if not qrels:
        raise DataFormatError(f"{path}: no judgements in this qrels file")
    return qrels, lines


def judged_in_any_split(dataset_dir: Path, min_score: int | None = None) -> dict[str, set[str]]:
    """Query id -> documents judged for it in any ``qrels/*.tsv`` of the folder; with ``min_score``,
    only judgements of at least that grade (``min_score=1``: the documents known to be relevant)."""
    judged: dict[str, set[str]] = {}
    for path in sorted((dataset_dir / "qrels").glob("*.tsv*")):
        qrels, _ = read_qrels(path, ReadReport(), "error")
        for qid, docs in qrels.items():
            kept = docs if min_score is None else {d for d, rel in docs.items() if rel >= min_score}
            judged.setdefault(qid, set()).update(kept)
    return judged
