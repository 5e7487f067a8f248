"""Every bad input a user can give ``search-r3`` ends in one line naming the problem, exit status 2 and
nothing half-written (no run files, cached embeddings or result rows).

Each case breaks one thing in a good set-up (a real SciFact subset, the tiny test model) and runs the
real console entry point in this process, so the message asserted is the one a user sees.
"""

from __future__ import annotations

import gzip
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from search_r3.cli import main as cli_main
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings


@dataclass
class Setup:
    root: Path  # data root holding scifact/
    config: dict
    tmp: Path
    extra_args: list[str]

    @property
    def dataset(self) -> Path:
        return self.root / "scifact"

    @property
    def encoder(self) -> dict:
        return self.config["model"]["init_args"]["retrievers"][0]["init_args"]["encoder"]["init_args"]

    def rewrite_lines(self, name: str, change: Callable[[list[bytes]], list[bytes]]) -> None:
        path = self.dataset / name
        path.write_bytes(b"".join(change(path.read_bytes().splitlines(keepends=True))))


def _not_json(s: Setup) -> None:
    s.rewrite_lines("corpus.jsonl", lambda lines: lines[:2] + [b'{"_id": "x", "text": "unterminated\n'] + lines[2:])


def _unknown_document(s: Setup) -> None:
    s.rewrite_lines("qrels/test.tsv", lambda lines: lines + [lines[1].split(b"\t")[0] + b"\tno-such-doc\t1\n"])


def _empty_query(s: Setup) -> None:
    s.rewrite_lines("queries.jsonl", lambda lines: [re.sub(rb'"text": "[^"]*"', b'"text": ""', lines[0])] + lines[1:])


def _not_utf8(s: Setup) -> None:
    s.rewrite_lines("corpus.jsonl", lambda lines: lines[:1] + [lines[1].replace(b'"text": "', b'"text": "\xff', 1)] + lines[2:])


def _missing_root(s: Setup) -> None:
    s.config["data"]["init_args"]["data_root"] = str(s.tmp / "no-data")


def _missing_dataset(s: Setup) -> None:
    s.config["data"]["init_args"]["datasets"] = ["nfcorpus"]


def _misspelled_key(s: Setup) -> None:
    s.config["model"]["init_args"]["top_kk"] = 10


def _misspelled_class_path(s: Setup) -> None:
    s.config["model"]["init_args"]["retrievers"][0]["class_path"] = "search_r3.evaluation.retrievers.EmbeddingLMRetreiver"


def _missing_adapter(s: Setup) -> None:
    s.encoder["adapter"] = str(s.tmp / "runs" / "sft" / "adapter" / "best")


def _empty_qrels(s: Setup) -> None:
    (s.dataset / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")


def _cut_qrels_row(s: Setup) -> None:
    s.rewrite_lines("qrels/test.tsv", lambda lines: lines[:2] + [lines[2].split(b"\t")[0] + b"\n"] + lines[3:])


def _output_under_a_file(s: Setup) -> None:
    (s.tmp / "taken").write_text("a file")
    s.config["model"]["init_args"]["output_dir"] = str(s.tmp / "taken" / "eval")


def _mlflow_under_a_file(s: Setup) -> None:
    (s.tmp / "taken").write_text("a file")
    s.config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {
        "experiment_name": "bad", "tracking_uri": f"sqlite:///{s.tmp / 'taken' / 'mlflow.db'}"}}


def _truncated_checkpoint(s: Setup) -> None:
    (s.tmp / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    s.extra_args += ["--ckpt_path", str(s.tmp / "last.ckpt")]


def _corrupt_adapter(s: Setup) -> None:
    folder = s.tmp / "adapter"
    EmbeddingLM(base_model=s.encoder["base_model"], dtype="float32", show_progress=False,
                lora=LoraSettings(r=2, alpha=4, dropout=0.0)).save(folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 100])
    s.encoder["adapter"] = str(folder)


def _skip(reason: str) -> str:
    return rf"{reason}.*; to drop and count such rows instead, set on_bad_row: skip"


CASES = {
    "corpus line not JSON": (_not_json, r"corpus\.jsonl:3: not valid JSON \(Unterminated string starting at column 22\)$"),
    "judgement names an unknown document": (
        _unknown_document, r"qrels/test\.tsv:\d+: " + _skip("judgement names a document missing from corpus.jsonl")),
    "empty query": (_empty_query, r"queries\.jsonl:1: " + _skip("empty query")),
    "non-UTF-8 byte": (_not_utf8, r"corpus\.jsonl:2: " + _skip(r"not UTF-8 \(byte 0xff at column \d+; re-save the file as UTF-8\)")),
    "missing data root": (_missing_root, r"data root .*no-data .*does not exist; pass --data\.init_args\.data_root"),
    "missing dataset": (_missing_dataset, r"dataset 'nfcorpus' is not available: looked in .*/nfcorpus \(data root\); .*"
                        r"/beir/nfcorpus \(cache\); download of http://127\.0\.0\.1:9/nfcorpus\.zip failed \(.*\)\. "
                        r"To place it by hand, unzip BEIR's nfcorpus\.zip so that .*/beir/nfcorpus/corpus\.jsonl exists"),
    "misspelled config key": (_misspelled_key, r"config: Option 'top_kk' is not accepted \(in search_r3\.lightning_modules\.RetrievalEvalModule\)"),
    "misspelled class path": (_misspelled_class_path, r"config: class_path 'search_r3\.evaluation\.retrievers\."
                              r"EmbeddingLMRetreiver' does not exist \(key 'model\.init_args\.retrievers' of "
                              r"search_r3\.lightning_modules\.RetrievalEvalModule, in .*config\.yaml\); did you mean "
                              r"'search_r3\.evaluation\.retrievers\.EmbeddingLMRetriever'\?"),
    "missing adapter folder": (_missing_adapter, r"adapter folder '.*/runs/sft/adapter/best' does not exist"),
    "empty qrels file": (_empty_qrels, r"qrels/test\.tsv: no judgements in this qrels file"),
    "qrels row cut in half": (_cut_qrels_row, r"qrels/test\.tsv:3: expected 3 tab-separated columns \(query-id, corpus-id, score\), got 1"),
    "output folder under a file": (_output_under_a_file, r"output_dir '.*/taken/eval' cannot be created: '.*/taken' is a file, not a folder"),
    "MLflow store under a file": (_mlflow_under_a_file, r"MLflow store '.*/taken/mlflow\.db' cannot be created: '.*/taken' is a file"),
    "truncated checkpoint": (_truncated_checkpoint, r"checkpoint '.*/last\.ckpt' is corrupt or truncated"),
    "corrupt adapter weights": (_corrupt_adapter, r"adapter folder '.*/adapter': its weights cannot be read \(.*\); the file is corrupt or truncated"),
}


@pytest.fixture()
def setup(mini_scifact: Path, tiny_lm_dir: Path, tmp_path: Path) -> Setup:
    root = tmp_path / "data"
    (root / "scifact" / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):  # plain text, so a case can break one line
        with gzip.open(mini_scifact / f"{name}.gz", "rb") as fh:
            (root / "scifact" / name).write_bytes(fh.read())
    shutil.copy(mini_scifact / "qrels" / "test.tsv", root / "scifact" / "qrels" / "test.tsv")
    encoder = {"class_path": "search_r3.model.EmbeddingLM", "init_args": {
        "base_model": str(tiny_lm_dir), "dtype": "float32", "show_progress": False, "max_document_tokens": 32}}
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False},
        "model": {"class_path": "search_r3.lightning_modules.RetrievalEvalModule", "init_args": {
            "retrievers": [{"class_path": "search_r3.evaluation.retrievers.EmbeddingLMRetriever",
                            "init_args": {"name": "tiny", "modes": ["direct"], "encoder": encoder}}],
            "record_results": True, "results_file": str(tmp_path / "results.json"),
            "output_dir": str(tmp_path / "eval"), "embedding_cache_dir": str(tmp_path / "cache")}},
        "data": {"class_path": "search_r3.datamodules.BEIRDataModule", "init_args": {
            "data_root": str(root), "datasets": ["scifact"], "split": "test", "batch_size": 8}},
    }
    return Setup(root, config, tmp_path, [])


def _run(s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    path = s.tmp / "config.yaml"
    path.write_text(yaml.safe_dump(s.config))
    monkeypatch.setattr(sys, "argv", ["search-r3", "test", "--config", str(path), *s.extra_args])
    cli_main()


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_exit_2_and_leaves_nothing(case: str, setup: Setup, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    breaks, message = CASES[case]
    breaks(setup)
    with pytest.raises(SystemExit) as stop:
        _run(setup, monkeypatch)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("search-r3: error: ")]
    assert len(errors) == 1, err[-2000:]
    text = errors[0][len("search-r3: error: "):].removesuffix(" (traceback: --debug or SEARCH_R3_DEBUG=1)")
    assert re.search(message, text), text
    for partial in ("eval", "cache", "results.json", "results.md"):
        leftover = setup.tmp / partial
        assert not leftover.exists() or not any(leftover.iterdir()), f"{case}: {partial} written"


def _rescoring_the_run_file_gives_the_recorded_number(s: Setup) -> None:
    """pytrec_eval straight on the run file, over the queries its sidecar records (a query without a
    line scores 0), reproduces the recorded nDCG@10."""
    import json

    import pytrec_eval

    from search_r3.datamodules.beir_files import ReadReport, read_qrels
    from search_r3.evaluation.paired import read_run
    from search_r3.evaluation.run_files import read_provenance

    (run_file,) = (s.tmp / "eval").glob("*/run.scifact.tiny.direct.trec")
    provenance = read_provenance(run_file)
    assert provenance is not None and not provenance.capped and provenance.corpus_documents == 48
    qrels, _ = read_qrels(s.dataset / "qrels" / "test.tsv", ReadReport(), "error")
    run = read_run(run_file)
    scores = pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in provenance.query_ids}, {"ndcg_cut.10"}).evaluate(
        {q: run.get(q, {}) for q in provenance.query_ids})
    mean = sum(scores.get(q, {}).get("ndcg_cut_10", 0.0) for q in provenance.query_ids) / len(provenance.query_ids)
    (row,) = json.loads((s.tmp / "results.json").read_text())
    assert round(mean, 4) == row["nDCG@10"]


def test_the_good_setup_runs_and_debug_shows_the_traceback(setup: Setup, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The set-up the cases break is itself fine (so each case fails for its own reason), and --debug
    turns a user error back into its traceback."""
    _run(setup, monkeypatch)
    assert (setup.tmp / "results.json").is_file()
    _rescoring_the_run_file_gives_the_recorded_number(setup)
    _empty_qrels(setup)
    setup.extra_args.append("--debug")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # the traceback, and the same exit status as the one line
        _run(setup, monkeypatch)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback (most recent call last)" in err
    assert "search-r3: error: " in err and "no judgements in this qrels file" in err


def test_skip_drops_and_counts_a_line_that_is_not_utf8(setup: Setup) -> None:
    """Under ``on_bad_row: skip`` the undecodable document is dropped from every pass over the corpus and
    counted, instead of stopping the run."""
    from search_r3.datamodules import BEIRDataModule

    _not_utf8(setup)
    data = BEIRDataModule(data_root=str(setup.root), datasets=["scifact"], split="test", on_bad_row="skip")
    data.setup("test")
    task = data.tasks[0]
    assert task.describe()["skipped not UTF-8"] == 1
    assert len(task.load_texts()) == task.num_docs == task.corpus_size
    with pytest.raises(Exception, match=r"corpus\.jsonl:2: not UTF-8"):
        BEIRDataModule(data_root=str(setup.root), datasets=["scifact"], split="test").setup("test")
