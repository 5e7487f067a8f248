"""Datasets by name: BEIR zips fetched from a loopback server (once, verified, atomically), Hugging Face
layouts read through ``datasets`` streaming from local folders laid out like the hub, the offline message,
and Stage-1 rows mined on the fly or streamed from a triplet dataset. Nothing here reaches the network."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import lightning as L
import pytest

from search_r3.datamodules.beir import BEIRDataModule
from search_r3.datamodules.beir_files import DataFormatError, ReadReport, read_qrels
from search_r3.datamodules.sources import DataSourceError, resolve_beir
from loopback import LoopbackServer, beir_zip


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEARCH_R3_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _leftovers(cache: Path) -> list[str]:
    """Everything in the cache except lock files: what a failed fetch must not leave behind."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def _score(tiny_lm_dir: Path, dataset: str, tmp_path: Path, tag: str) -> dict[str, float]:
    from search_r3.evaluation.retrievers import EmbeddingLMRetriever
    from search_r3.lightning_modules.retrieval_eval import RetrievalEvalModule
    from search_r3.model.embedding_lm import EmbeddingLM

    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_document_tokens=32)
    module = RetrievalEvalModule([EmbeddingLMRetriever(encoder, name="tiny", modes=["direct"])],
                                 output_dir=str(tmp_path / f"out-{tag}"), embedding_cache_dir=str(tmp_path / f"emb-{tag}"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=BEIRDataModule(datasets=[dataset], batch_size=16))
    (row,) = module.rows
    assert row.dataset == "scifact"
    return row.metrics


def test_a_beir_zip_is_downloaded_once_and_scores(data_root: Path, tiny_lm_dir: Path, tmp_path: Path, cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with LoopbackServer() as server:
        server.files["/scifact.zip"] = beir_zip(data_root / "beir" / "scifact", "scifact")
        monkeypatch.setenv("SEARCH_R3_BEIR_MIRROR", server.url)
        first = _score(tiny_lm_dir, "beir/scifact", tmp_path, "first")
        assert server.requests["/scifact.zip"] == 1
        assert (cache / "beir" / "scifact" / "corpus.jsonl").is_file()
        assert not (cache / "downloads" / "scifact.zip").exists()  # unzipped, then removed
        second = _score(tiny_lm_dir, "beir/scifact", tmp_path, "second")
        assert server.requests["/scifact.zip"] == 1  # the cache answered
    assert first == second and first["nDCG@10"] > 0
    local = _score(tiny_lm_dir, str(data_root / "beir" / "scifact"), tmp_path, "local")
    assert local == first  # the zip holds the same data as the folder it was built from


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(data_root: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    body = beir_zip(data_root / "beir" / "scifact", "scifact")
    with LoopbackServer() as server:
        server.files["/scifact.zip"] = body
        server.files["/MD5SUMS"] = f"{'0' * 32}  scifact.zip\n".encode()
        monkeypatch.setenv("SEARCH_R3_BEIR_MIRROR", server.url)
        with pytest.raises(DataSourceError, match=r"scifact\.zip: checksum mismatch, the download was refused"):
            resolve_beir("beir/scifact")
        assert _leftovers(cache) == []
        server.files["/MD5SUMS"] = f"{hashlib.md5(body).hexdigest()}  scifact.zip\n".encode()
        assert (resolve_beir("beir/scifact") / "corpus.jsonl").is_file()  # the right checksum is accepted


def test_a_download_cut_in_the_middle_leaves_nothing_and_the_next_run_succeeds(data_root: Path, cache: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with LoopbackServer() as server:
        server.files["/scifact.zip"] = beir_zip(data_root / "beir" / "scifact", "scifact")
        server.cut_next.add("/scifact.zip")
        monkeypatch.setenv("SEARCH_R3_BEIR_MIRROR", server.url)
        with pytest.raises(DataSourceError, match=r"download of .*/scifact\.zip failed"):
            resolve_beir("beir/scifact")
        assert _leftovers(cache) == []
        folder = resolve_beir("beir/scifact")
        assert server.requests["/scifact.zip"] == 2 and (folder / "qrels" / "test.tsv").is_file()


def test_offline_with_no_copy_is_one_message_naming_every_place(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataSourceError) as err:
        resolve_beir("beir/fiqa", data_root=root)
    message = str(err.value)
    for place in (f"{root}/beir/fiqa (data root)", f"{cache}/beir/fiqa (cache)", "download of http://127.0.0.1:9/fiqa.zip failed",
                  "To place it by hand", "SEARCH_R3_BEIR_MIRROR"):
        assert place in message
    assert _leftovers(cache) == []


def _hub_layout(data_root: Path, mirror: Path) -> None:
    """Local copies of BeIR/scifact + BeIR/scifact-qrels and of mteb/scifact, laid out as on the hub."""
    src = data_root / "beir" / "scifact"
    beir, qrels, mteb = mirror / "BeIR" / "scifact", mirror / "BeIR" / "scifact-qrels", mirror / "mteb" / "scifact"
    for folder in (beir, qrels, mteb / "qrels"):
        folder.mkdir(parents=True)
    for name in ("corpus.jsonl.gz", "queries.jsonl.gz"):
        shutil.copy(src / name, beir / name)
        (mteb / name[:-3]).write_bytes(gzip.decompress((src / name).read_bytes()))
    for split in ("test", "train"):
        shutil.copy(src / "qrels" / f"{split}.tsv", qrels / f"{split}.tsv")
        shutil.copy(src / "qrels" / f"{split}.tsv", mteb / "qrels" / f"{split}.tsv")


@pytest.mark.parametrize("repo", ["BeIR/scifact", "mteb/scifact"])
def test_a_hugging_face_layout_streams_into_the_same_task_and_scores(repo: str, data_root: Path, tiny_lm_dir: Path,
                                                                    tmp_path: Path, cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _hub_layout(data_root, tmp_path / "hub")
    monkeypatch.setenv("SEARCH_R3_HF_MIRROR", str(tmp_path / "hub"))
    via_hf = BEIRDataModule(datasets=[f"hf:{repo}"])
    via_hf.setup("test")
    files = BEIRDataModule(datasets=[str(data_root / "beir" / "scifact")])
    files.setup("test")
    (a,), (b,) = via_hf.tasks, files.tasks
    assert a.name == b.name == "scifact"
    assert (a.queries, a.qrels, a.doc_ids) == (b.queries, b.qrels, b.doc_ids)
    assert a.load_texts() == b.load_texts()
    assert _score(tiny_lm_dir, f"hf:{repo}", tmp_path, "hf") == _score(tiny_lm_dir, str(data_root / "beir" / "scifact"),
                                                                       tmp_path, "files")


def test_a_bad_row_from_the_hub_is_named_by_its_row(data_root: Path, tmp_path: Path, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation applies to every source: row n of a streamed split is line n of its cache file."""
    _hub_layout(data_root, tmp_path / "hub")
    qrels = tmp_path / "hub" / "BeIR" / "scifact-qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "1\tno-such-doc\t1\n")
    monkeypatch.setenv("SEARCH_R3_HF_MIRROR", str(tmp_path / "hub"))
    lines = len(qrels.read_text().splitlines())
    with pytest.raises(DataFormatError, match=rf"qrels/test\.tsv:{lines}: judgement names a document missing"):
        BEIRDataModule(datasets=["hf:BeIR/scifact"]).setup("test")


def _triplets(data_root: Path, folder: Path) -> None:
    """A local dataset in the sentence-transformers triplet layout, from the fixture's real rows."""
    from search_r3.datamodules.beir_files import iter_corpus
    from search_r3.datamodules.training_rows import read_training_rows

    rows = read_training_rows(data_root / "train" / "scifact_train_triples.jsonl.gz")
    texts = {d: t for _, d, t in iter_corpus(data_root / "beir" / "scifact" / "corpus.jsonl.gz")}
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"anchor": r.query, "positive": texts[r.pos_id], "negative": texts[r.neg_ids[0]]}) + "\n")


def test_stage1_trains_two_steps_from_a_local_triplet_dataset(data_root: Path, tiny_lm_dir: Path, tmp_path: Path,
                                                              cache: Path) -> None:
    import torch

    from search_r3.datamodules.contrastive import ContrastiveDataModule
    from search_r3.lightning_modules.sft import SFTContrastiveModule
    from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

    _triplets(data_root, tmp_path / "st-triplets")
    data = ContrastiveDataModule(hf_triplets=[str(tmp_path / "st-triplets")], val_datasets=[str(data_root / "beir" / "scifact")],
                                 batch_size=4, num_negatives=1, val_queries=4, val_corpus_docs=30)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_document_tokens=32,
                          max_query_tokens=16, lora=LoraSettings(r=2, alpha=4, dropout=0.0))
    module = SFTContrastiveModule(encoder, adapter_dir=str(tmp_path / "adapter"), warmup_steps=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and len(data.rows) == 40  # every row: no BEIR query is held out of these
    assert data.rows[0].pos_id.startswith("st-triplets/t")  # passages identified by their text
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters() if n in before)


def test_stage1_rows_are_mined_from_train_qrels_once(data_root: Path, tmp_path: Path, cache: Path) -> None:
    from search_r3.datamodules.beir_files import judged_in_any_split
    from search_r3.datamodules.contrastive import ContrastiveDataModule

    folder = str(data_root / "beir" / "scifact")
    data = ContrastiveDataModule(train_datasets=[folder], num_negatives=2, batch_size=4, val_queries=4,
                                 val_corpus_docs=30)
    data.setup("fit")
    (mined,) = list((cache / "mined").glob("scifact-train-bm25-*.jsonl.gz"))
    stamp = mined.stat().st_mtime_ns
    judged = judged_in_any_split(Path(folder))
    train, _ = read_qrels(Path(folder) / "qrels" / "train.tsv", ReadReport(), "error")
    held_out = list(train)[:4]
    assert len(data.rows) == sum(len(docs) for q, docs in train.items() if q not in held_out)  # a row per judgement
    for r in data.rows:
        qid = r.query_id.split("/", 1)[1]
        assert len(r.neg_ids) >= 2 and not {n.split("/", 1)[1] for n in r.neg_ids} & judged[qid]
    again = ContrastiveDataModule(train_datasets=[folder], num_negatives=2, batch_size=4, val_queries=4,
                                  val_corpus_docs=30)
    again.setup("fit")
    assert again.rows == data.rows and mined.stat().st_mtime_ns == stamp  # read from the cache, not mined again
