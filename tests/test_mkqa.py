"""MKQA loader on the real 6-record sample (MTEB MKQARetrieval formulation)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from search_r3.datamodules.beir_files import DataFormatError
from search_r3.datamodules.mkqa import MKQA_LANGUAGES, MKQADataModule, answer_id


@pytest.fixture(scope="module")
def sample(data_root: Path) -> Path:
    return data_root / "mkqa" / "mkqa_test_sample6.jsonl.gz"


def _module(sample: Path, cache: Path, **kw) -> MKQADataModule:
    dm = MKQADataModule(source=str(sample), cache_dir=str(cache), **kw)
    dm.setup("test")
    return dm


def test_all_26_languages_with_counts(sample: Path, tmp_path: Path) -> None:
    dm = _module(sample, tmp_path)
    assert [t.name for t in dm.tasks] == [f"mkqa-{lang}" for lang in MKQA_LANGUAGES] and len(dm.tasks) == 26
    en = dm.tasks[MKQA_LANGUAGES.index("en")]
    # 6 records: 3 have no answer text (long_answer, 2x unanswerable); "2017" and "2017-05-18" answer one query.
    assert (len(en.queries), en.num_docs, sum(map(len, en.qrels.values()))) == (3, 4, 4)
    assert en.report.skipped["mkqa no answer text"] == 3
    assert en.queries["-7449157003522518870"] == "mountain game of thrones world's strongest man"
    assert set(en.qrels["36228854473990432"]) == {answer_id("en", "2017"), answer_id("en", "2017-05-18")}
    assert all(r == 1 for judged in en.qrels.values() for r in judged.values())


def test_non_latin_scripts_survive(sample: Path, tmp_path: Path) -> None:
    dm = _module(sample, tmp_path, languages=["ja", "ar", "zh_cn", "km"])
    ja = dm.tasks[0]
    assert ja.queries["7631360939705650347"].endswith("監督は誰ですか？")
    assert answer_id("ja", "リドリー・スコット") in ja.doc_ids
    assert any("\u0600" <= ch <= "\u06ff" for q in dm.tasks[1].queries.values() for ch in q)


def test_ids_are_stable_under_reordering(sample: Path, tmp_path: Path) -> None:
    rows = gzip.open(sample, "rt", encoding="utf-8").read().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(reversed(rows)) + "\n", encoding="utf-8")
    a = _module(sample, tmp_path / "a", languages=["en"]).tasks[0]
    b = _module(shuffled, tmp_path / "b", languages=["en"]).tasks[0]
    assert sorted(a.doc_ids) == sorted(b.doc_ids) and a.qrels == b.qrels


def test_bad_input(sample: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown MKQA languages"):
        MKQADataModule(source=str(sample), languages=["xx"])
    with pytest.raises(DataFormatError, match="does not exist"):
        _module(tmp_path / "nope.jsonl.gz", tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"example_id": 1, "queries": {}}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: MKQA record without 'answers'"):
        _module(bad, tmp_path / "c")
