"""MKQA as retrieval, in MTEB's ``MKQARetrieval`` formulation, one task per language, from the official
release (found, cached or downloaded), from MTEB's copy on the Hugging Face hub (streamed), or from a file.

Per language: queries = ``queries[lang]``; corpus = the distinct answer strings ``answers[lang][*].text``
(empty title); qrels = query -> each of its answer strings, score 1. Rows whose query is null or that
have no answer text in that language (``unanswerable``, ``long_answer``) are skipped and counted.

The records are streamed once and written as BEIR folders (``corpus.jsonl``, ``queries.jsonl``,
``qrels/test.tsv``) in a cache directory keyed by the source file's content, so everything downstream
(dense retrievers, BM25, metrics) is the BEIR path, unchanged. Document ids are a hash of the answer
string, so they are the same whatever the row order or the file (the 6-row sample or the full release).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from search_r3.datamodules.beir import BEIRDataModule
from search_r3.datamodules.beir_files import DataFormatError, iter_jsonl
from search_r3.datamodules.sources import ENV_HF_MIRROR, HF_PREFIX, atomic_write_lines, resolve_mkqa

log = logging.getLogger(__name__)

MKQA_LANGUAGES = (
    "ar", "da", "de", "en", "es", "fi", "fr", "he", "hu", "it", "ja", "km", "ko", "ms", "nl", "no", "pl", "pt",
    "ru", "sv", "th", "tr", "vi", "zh_cn", "zh_hk", "zh_tw",
)


def answer_id(lang: str, text: str) -> str:
    return f"{lang}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


def convert_mkqa(source: Path, out_root: Path, languages: list[str]) -> dict[str, Counter[str]]:
    """Write one BEIR folder per language under ``out_root``; returns per-language skip counts."""
    queries: dict[str, list[dict[str, str]]] = {lang: [] for lang in languages}
    corpus: dict[str, dict[str, str]] = {lang: {} for lang in languages}
    qrels: dict[str, list[tuple[str, str]]] = {lang: [] for lang in languages}
    skipped: dict[str, Counter[str]] = {lang: Counter() for lang in languages}
    seen_ids: set[str] = set()
    for lineno, row in iter_jsonl(source):
        for key in ("example_id", "queries", "answers"):
            if key not in row:
                raise DataFormatError(f"{source}:{lineno}: MKQA record without {key!r}")
        qid = str(row["example_id"])
        if qid in seen_ids:
            raise DataFormatError(f"{source}:{lineno}: duplicate example_id {qid!r}")
        seen_ids.add(qid)
        for lang in languages:
            text = (row["queries"] or {}).get(lang)
            answers = [a.get("text") for a in (row["answers"] or {}).get(lang) or [] if isinstance(a, dict)]
            answers = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
            if not isinstance(text, str) or not text.strip():
                skipped[lang]["null query"] += 1
                continue
            if not answers:
                skipped[lang]["no answer text"] += 1
                continue
            queries[lang].append({"_id": qid, "text": text.strip()})
            for answer in dict.fromkeys(answers):
                did = answer_id(lang, answer)
                corpus[lang][did] = answer
                qrels[lang].append((qid, did))
    for lang in languages:
        folder = out_root / f"mkqa-{lang}"
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
            for did, text in corpus[lang].items():
                fh.write(json.dumps({"_id": did, "title": "", "text": text}, ensure_ascii=False) + "\n")
        with open(folder / "queries.jsonl", "w", encoding="utf-8") as fh:
            for q in queries[lang]:
                fh.write(json.dumps(q, ensure_ascii=False) + "\n")
        with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            fh.writelines(f"{q}\t{d}\t1\n" for q, d in qrels[lang])
        (folder / "skipped.json").write_text(json.dumps(skipped[lang]))
    return skipped


def mteb_mkqa_to_beir(repo: str, languages: list[str], split: str, out_root: Path) -> None:
    """Stream MTEB's ``MKQARetrieval`` (one ``<lang>-corpus`` / ``<lang>-queries`` / ``<lang>-qrels`` config
    per language, split ``split``) into the same per-language BEIR folders as :func:`convert_mkqa`.

    ``repo`` is a hub id (``mteb/MKQARetrieval``) or, with ``$SEARCH_R3_HF_MIRROR``, a local copy laid out
    like the hub. Each folder is written under a temporary name and renamed into place."""
    import datasets

    mirror = os.environ.get(ENV_HF_MIRROR)
    location = str(Path(mirror).expanduser() / repo) if mirror else repo

    def rows(lang: str, part: str) -> Iterator[dict]:
        try:
            return iter(datasets.load_dataset(location, f"{lang}-{part}", split=split, streaming=True))
        except (FileNotFoundError, ValueError) as err:
            raise DataFormatError(f"hf:{repo}: no {lang}-{part} ({split}) at {location} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]}); offline, set ${ENV_HF_MIRROR} to a local copy") from err

    for lang in languages:
        folder = out_root / f"mkqa-{lang}"
        tmp = out_root / f".mkqa-{lang}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_lines(tmp / "corpus.jsonl", (json.dumps({"_id": str(r.get("_id", r.get("id"))), "title": r.get("title") or "",
                                                              "text": r.get("text")}, ensure_ascii=False) + "\n"
                                                  for r in rows(lang, "corpus")))
        atomic_write_lines(tmp / "queries.jsonl", (json.dumps({"_id": str(r.get("_id", r.get("id"))), "text": r.get("text")},
                                                              ensure_ascii=False) + "\n" for r in rows(lang, "queries")))
        atomic_write_lines(tmp / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore\n"] + [
            f"{r['query-id']}\t{r['corpus-id']}\t{r['score']}\n" for r in rows(lang, "qrels")])
        (tmp / "skipped.json").write_text("{}")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


class MKQADataModule(BEIRDataModule):
    """MKQA retrieval tasks ``mkqa-<lang>``, one per language in ``languages`` (default: all 26).

    Args:
        source: ``mkqa`` (default): the official release ``mkqa.jsonl.gz`` (apple/ml-mkqa), found under the
            local roots (``<root>/mkqa/mkqa.jsonl.gz``) or the cache, else downloaded once
            (``$SEARCH_R3_MKQA_MIRROR`` replaces the base URL); ``hf:mteb/MKQARetrieval``: MTEB's
            per-language configs, streamed (split ``hf_split``); or the path of an MKQA JSONL(.gz) file
            (the 6-row sample in ``tests/data/mkqa`` is one).
        languages: language codes as in MKQA (``en``, ``ja``, ``zh_cn`` ...).
        cache_dir: where the per-language BEIR folders are written (keyed by the source's content or id).
        data_root: a folder searched first for ``mkqa/mkqa.jsonl.gz`` (``None``: ``$SEARCH_R3_DATA``, the mirrors).
        hf_split: the split of a Hugging Face source (MTEB's MKQARetrieval has ``train`` only).
        Other arguments as :class:`BEIRDataModule`.
    """

    def __init__(self, source: str = "mkqa", languages: list[str] | None = None,
                 cache_dir: str = ".cache/search_r3/mkqa", data_root: str | None = None, hf_split: str = "train",
                 **kwargs: Any) -> None:
        kwargs.setdefault("split", "test")
        super().__init__(data_root=cache_dir, **kwargs)
        self.source, self.search_root, self.hf_split = source, data_root, hf_split
        self.languages = list(languages) if languages else list(MKQA_LANGUAGES)
        unknown = sorted(set(self.languages) - set(MKQA_LANGUAGES))
        if unknown:
            raise ValueError(f"unknown MKQA languages {unknown}; MKQA has {list(MKQA_LANGUAGES)}")
        self.skipped: dict[str, Counter[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.tasks:
            return
        if self.source.startswith(HF_PREFIX):
            repo = self.source[len(HF_PREFIX):]
            root = Path(self.data_root) / f"hf-{repo.replace('/', '__')}-{self.hf_split}"
            missing = [lang for lang in self.languages if not (root / f"mkqa-{lang}" / "skipped.json").is_file()]
            if missing:
                mteb_mkqa_to_beir(repo, missing, self.hf_split, root)
        else:
            path = resolve_mkqa(self.source, self.search_root)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            root = Path(self.data_root) / digest
            missing = [lang for lang in self.languages if not (root / f"mkqa-{lang}" / "skipped.json").is_file()]
            if missing:
                convert_mkqa(path, root, missing)
        self.skipped = {lang: Counter(json.loads((root / f"mkqa-{lang}" / "skipped.json").read_text()))
                        for lang in self.languages}
        self.data_root = str(root)
        self.dataset_paths = [str(root / f"mkqa-{lang}") for lang in self.languages]
        super().setup(stage)
        for task in self.tasks:
            for reason, n in self.skipped[task.name.removeprefix("mkqa-")].items():
                task.report.skipped[f"mkqa {reason}"] += n
