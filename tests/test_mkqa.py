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


def test_mkqa_by_name_is_downloaded_once_from_the_release(sample: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from loopback import LoopbackServer

    monkeypatch.setenv("SEARCH_R3_CACHE", str(tmp_path / "cache"))
    with LoopbackServer() as server:
        server.files["/mkqa.jsonl.gz"] = sample.read_bytes()  # the sample, served as the release's file
        monkeypatch.setenv("SEARCH_R3_MKQA_MIRROR", server.url)
        first = _module(Path("mkqa"), tmp_path / "conv1", languages=["en", "ja"])
        again = _module(Path("mkqa"), tmp_path / "conv2", languages=["en", "ja"])
        assert server.requests["/mkqa.jsonl.gz"] == 1
    local = _module(sample, tmp_path / "conv3", languages=["en", "ja"])
    for a, b, c in zip(first.tasks, again.tasks, local.tasks):
        assert a.name == c.name and (a.queries, a.qrels, a.doc_ids) == (b.queries, b.qrels, b.doc_ids) == \
            (c.queries, c.qrels, c.doc_ids)


def test_mteb_mkqa_retrieval_layout_streams_into_the_same_tasks(sample: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A local folder laid out like ``mteb/MKQARetrieval`` (configs ``<lang>-corpus/queries/qrels``, split
    ``train``, declared in the card), built from the release sample, gives the release's tasks."""
    import yaml

    from search_r3.datamodules.beir_files import ReadReport, iter_jsonl, read_qrels

    release = _module(sample, tmp_path / "release", languages=["en", "zh_cn"])
    repo = tmp_path / "hub" / "mteb" / "MKQARetrieval"
    configs = []
    for task in release.tasks:
        lang = task.name.removeprefix("mkqa-")
        folder = Path(task.corpus_path).parent
        parts = {"corpus": [{"_id": o["_id"], "title": "", "text": o["text"]} for _, o in iter_jsonl(folder / "corpus.jsonl")],
                 "queries": [{"_id": o["_id"], "text": o["text"]} for _, o in iter_jsonl(folder / "queries.jsonl")],
                 "qrels": [{"query-id": q, "corpus-id": d, "score": s}
                           for q, docs in read_qrels(folder / "qrels" / "test.tsv", ReadReport(), "error")[0].items()
                           for d, s in docs.items()]}
        for part, rows in parts.items():
            (repo / f"{lang}-{part}").mkdir(parents=True)
            (repo / f"{lang}-{part}" / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                          for r in rows), encoding="utf-8")
            configs.append({"config_name": f"{lang}-{part}",
                            "data_files": [{"split": "train", "path": f"{lang}-{part}/train.jsonl"}]})
    (repo / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n")
    monkeypatch.setenv("SEARCH_R3_HF_MIRROR", str(tmp_path / "hub"))
    hub = _module(Path("hf:mteb/MKQARetrieval"), tmp_path / "hub-cache", languages=["en", "zh_cn"])
    for a, b in zip(hub.tasks, release.tasks):
        assert a.name == b.name and (a.queries, a.qrels, a.doc_ids) == (b.queries, b.qrels, b.doc_ids)
        assert a.load_texts() == b.load_texts()
