"""Stage 1 on the tiny random LM with real SciFact rows: what trains, GradCache equivalence, resume."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from search_r3.datamodules.contrastive import ContrastiveDataModule
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings
from search_r3.lightning_modules.sft import SFTContrastiveModule


def _module(tiny_lm_dir: Path, tmp_path: Path, dropout: float = 0.0, **kw) -> SFTContrastiveModule:
    torch.manual_seed(0)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                          lora=LoraSettings(r=4, alpha=8, dropout=dropout), max_document_tokens=48, max_query_tokens=24)
    return SFTContrastiveModule(encoder, adapter_dir=str(tmp_path / "adapter"), warmup_steps=1, lr=1e-2, **kw)


def _data(root: Path, **kw) -> ContrastiveDataModule:
    kw.setdefault("train_files", ["train/scifact_train_triples.jsonl.gz"])
    return ContrastiveDataModule(data_root=str(root), batch_size=4, num_negatives=2, val_queries=4,
                                 val_corpus_docs=30, **kw)


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 2)
    kw.setdefault("devices", 1)
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw)


def _trainable(module: SFTContrastiveModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_a_step_moves_lora_and_the_token_row_only(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path) -> None:
    module = _module(tiny_lm_dir, tmp_path)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    before = _trainable(module)
    # Two steps: LoRA's B starts at zero, so A only receives gradient from the second step on.
    _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=_data(mini_train_root))
    after = _trainable(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("trainable_tokens" in n for n in changed), "the embed-token row must train"
    for n, p in module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"base weight {n} changed"


def test_token_lr_sets_the_embed_token_rows_own_rate(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path) -> None:
    module = _module(tiny_lm_dir, tmp_path, token_lr=0.0)  # rate 0: the row must stay, LoRA must move
    before = _trainable(module)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(mini_train_root))
    after = _trainable(module)
    rows = [n for n in before if "trainable_tokens" in n]
    assert rows and all(torch.equal(before[n], after[n]) for n in rows)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert [g["initial_lr"] for g in trainer.optimizers[0].param_groups] == [1e-2, 0.0]


def test_validation_saves_an_adapter_that_test_loads(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path) -> None:
    module = _module(tiny_lm_dir, tmp_path)
    trainer = _trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(module, datamodule=_data(mini_train_root))
    assert 0.0 <= float(trainer.callback_metrics["val/nDCG_at_10"]) <= 1.0
    loaded = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", adapter=str(tmp_path / "adapter" / "best"),
                         show_progress=False, max_document_tokens=48, max_query_tokens=24)
    texts = ["vitamin D", "Hamlet"]
    torch.testing.assert_close(loaded.encode(texts), module.encoder.encode(texts), atol=1e-6, rtol=0)


def test_cached_step_equals_plain_step(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path) -> None:
    results = []
    for cached in (False, True):
        module = _module(tiny_lm_dir, tmp_path / str(cached), cached=cached, chunk_size=3)
        _trainer(tmp_path / str(cached), max_steps=1, limit_val_batches=0).fit(module, datamodule=_data(mini_train_root))
        results.append(_trainable(module))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-5, rtol=1e-4)


class _StopAfterEpoch(L.Callback):
    """An interruption at the first epoch boundary, after its checkpoint is written."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_resume_reaches_the_uninterrupted_state(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path) -> None:
    """Interrupted at the end of epoch 0 and resumed: epoch 1 must be epoch 1's shuffle, as in the
    uninterrupted run, although (bounded by ``max_epochs``) Lightning builds and iterates the training
    loader before it restores the checkpoint."""
    data_kw = {"max_rows": 8}  # 4 batches an epoch (clashing rows wait); the checkpoint falls on the epoch boundary
    straight = _module(tiny_lm_dir, tmp_path / "a")
    _trainer(tmp_path / "a", max_epochs=2, max_steps=-1, limit_val_batches=0).fit(
        straight, datamodule=_data(mini_train_root, **data_kw))
    first = _module(tiny_lm_dir, tmp_path / "b")
    # The interrupted run has the *same* configuration (its LR schedule spans both epochs) and stops after one.
    trainer = _trainer(tmp_path / "b", max_epochs=2, max_steps=-1, limit_val_batches=0, callbacks=[_StopAfterEpoch()])
    trainer.fit(first, datamodule=_data(mini_train_root, **data_kw))
    assert trainer.current_epoch == 1
    ckpt = next((tmp_path / "b").rglob("*.ckpt"))
    assert ckpt.stat().st_size < 2_000_000  # trainable parameters only
    resumed = _module(tiny_lm_dir, tmp_path / "c")
    _trainer(tmp_path / "c", max_epochs=2, max_steps=-1, limit_val_batches=0).fit(
        resumed, datamodule=_data(mini_train_root, **data_kw), ckpt_path=str(ckpt))
    for name, value in _trainable(straight).items():
        torch.testing.assert_close(_trainable(resumed)[name], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("stop", "bound"), [(2, "max_steps"), (5, "max_steps"), (5, "max_epochs")],
                         ids=["mid-epoch-0", "mid-epoch-1", "mid-epoch-1-max-epochs"])
def test_resume_in_the_middle_of_an_epoch_continues_with_the_next_batch(tiny_lm_dir: Path, mini_train_root: Path,
                                                                         tmp_path: Path, interrupt_at_step,
                                                                         stop: int, bound: str) -> None:
    """The CPU recipe stops mid-epoch (60 steps of 12 rows, 72 batches an epoch): a resumed run must
    train on the batches the interrupted one had not reached, not replay the epoch's first ones, and
    draw the dropout masks the uninterrupted run drew (LoRA dropout on, as in the recipes). In epoch 1
    too, whose order is another shuffle than epoch 0's (Lightning's ``set_epoch`` reaches the sampler),
    and in a run bounded by ``max_epochs``, where Lightning builds the loader before it restores the
    checkpoint, so the resume point can only be read when training starts."""
    data_kw = {"max_rows": 16}  # 4 batches an epoch; 7 steps (or 2 epochs) reach into epoch 1
    limits = {"max_steps": 7} if bound == "max_steps" else {"max_epochs": 2, "max_steps": -1}
    straight = _module(tiny_lm_dir, tmp_path / "a", dropout=0.1)
    _trainer(tmp_path / "a", limit_val_batches=0, **limits).fit(straight, datamodule=_data(mini_train_root, **data_kw))
    first = _module(tiny_lm_dir, tmp_path / "b", dropout=0.1)
    trainer = _trainer(tmp_path / "b", limit_val_batches=0, callbacks=[interrupt_at_step(stop)], **limits)
    trainer.fit(first, datamodule=_data(mini_train_root, **data_kw))
    assert trainer.global_step == stop
    resumed = _module(tiny_lm_dir, tmp_path / "c", dropout=0.1)
    _trainer(tmp_path / "c", limit_val_batches=0, **limits).fit(
        resumed, datamodule=_data(mini_train_root, **data_kw), ckpt_path=str(tmp_path / "b" / "mid.ckpt"))
    for name, value in _trainable(straight).items():
        torch.testing.assert_close(_trainable(resumed)[name], value, atol=1e-6, rtol=0)


def test_needs_lora(tiny_lm_dir: Path) -> None:
    with pytest.raises(ValueError, match="lora"):
        SFTContrastiveModule(EmbeddingLM(base_model=str(tiny_lm_dir), show_progress=False))


@pytest.mark.e2e
def test_two_process_ddp_trains_with_the_no_duplicates_sampler(tiny_lm_dir: Path, mini_train_root: Path,
                                                                 tmp_path: Path) -> None:
    """DDP (2 CPU processes): each rank takes its own share of the packed batches and the step trains."""
    module = _module(tiny_lm_dir, tmp_path)
    before = _trainable(module)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, strategy="ddp_spawn", devices=2,
                       use_distributed_sampler=False)
    trainer.fit(module, datamodule=_data(mini_train_root))
    after = _trainable(module)  # ddp_spawn copies rank 0's weights back into this process
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_known_positives_of_other_rows_are_masked_on_real_nfcorpus(tiny_lm, shared_data_root: Path) -> None:
    """NFCorpus documents are relevant to many train queries: the collator must flag exactly the batch
    documents the qrels judge relevant to a query other than its own positive."""
    import csv

    data_root = shared_data_root
    dm = ContrastiveDataModule(data_root=str(data_root), train_files=["train/nfcorpus_train_triples.jsonl.gz"],
                               batch_size=12, num_negatives=1, val_queries=2, val_corpus_docs=10, max_rows=600)
    dm.setup("fit")
    dm.collator.encoder = tiny_lm
    relevant: dict[str, set[str]] = {}
    with open(data_root / "beir" / "nfcorpus" / "qrels" / "train.tsv") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if int(row["score"]) > 0:  # training ids are namespaced by dataset (datamodules/training_rows.py)
                relevant.setdefault(f"nfcorpus/{row['query-id']}", set()).add(f"nfcorpus/{row['corpus-id']}")
    rows, masked = dm.rows, 0
    for batch_rows in list(iter(dm.train_dataloader().batch_sampler))[:20]:
        items = [dm.train_dataloader().dataset[i] for i in batch_rows]
        exclude = dm.collator(items)["exclude"]
        doc_ids = [rows[i].pos_id for i in batch_rows] + [rows[i].neg_ids[0] for i in batch_rows]
        for a, i in enumerate(batch_rows):
            expected = [j != a and d in relevant.get(rows[i].query_id, set()) for j, d in enumerate(doc_ids)]
            assert exclude[a].tolist() == expected
        masked += int(exclude.sum())
    assert masked > 0, "20 NFCorpus batches without a single shared relevant document: the mask is not wired"
    dm_off = ContrastiveDataModule(data_root=str(data_root), train_files=["train/nfcorpus_train_triples.jsonl.gz"],
                                   batch_size=12, val_queries=2, val_corpus_docs=10, max_rows=50,
                                   mask_known_positives=False)
    dm_off.setup("fit")
    dm_off.collator.encoder = tiny_lm
    assert not dm_off.collator([dm_off.train_dataloader().dataset[i] for i in range(4)])["exclude"].any()


def test_sharded_strategies_are_refused_before_any_compute() -> None:
    """FSDP would hang on our per-rank forward counts; both stages call this check in `setup`, before
    anything is encoded or trained. (On a CPU Lightning itself refuses FSDP before `setup`, so the check
    is exercised on the strategy objects here.)"""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from search_r3.lightning_modules.adapter_training import refuse_sharded_strategy

    from search_r3.common.errors import UserError

    with pytest.raises(UserError, match=r"trains with DDP \(`trainer.strategy: ddp`\), not FSDP"):  # one line, exit 2
        refuse_sharded_strategy(FSDPStrategy())
    refuse_sharded_strategy(DDPStrategy())  # accepted


@pytest.mark.e2e
def test_resuming_fit_continues_its_mlflow_run(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """`fit --ckpt_path` through the CLI logs the remaining steps into the run the checkpoint came from.
    Each part logs its progress line (the CLI's persistent ``TrainingProgress``: stderr is not a terminal)."""
    import yaml
    from mlflow import MlflowClient

    from search_r3.cli import run_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                               "init_args": {"experiment_name": "resume", "tracking_uri": uri,
                                             "artifact_location": str(tmp_path / "art")}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True,
                                                 "every_n_train_steps": 1}}]},
        "model": {"class_path": "search_r3.lightning_modules.sft.SFTContrastiveModule",
                  "init_args": {"encoder": {"class_path": "search_r3.model.EmbeddingLM",
                                            "init_args": {"base_model": str(tiny_lm_dir), "dtype": "float32",
                                                          "show_progress": False, "max_document_tokens": 48,
                                                          "max_query_tokens": 24,
                                                          "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}},
                                "lr": 0.01, "warmup_steps": 1, "adapter_dir": str(tmp_path / "adapter")}},
        "data": {"class_path": "search_r3.datamodules.contrastive.ContrastiveDataModule",
                 "init_args": {"data_root": str(mini_train_root), "batch_size": 4, "num_negatives": 2,
                               "train_files": ["train/scifact_train_triples.jsonl.gz"],
                               "val_queries": 4, "val_corpus_docs": 30}},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.argv", ["search-r3"])
    caplog.set_level(logging.INFO, logger="search_r3.progress")
    run_cli(["fit", "--config", str(path), "--trainer.max_steps", "1"])  # "interrupted" after one step
    capsys.readouterr()
    assert any(r.getMessage().startswith("train: 1/1 steps (100%)") for r in caplog.records), caplog.text
    run_cli(["fit", "--config", str(path), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    printed = capsys.readouterr().out
    assert any(r.getMessage().startswith("train: 2/2 steps (100%)") for r in caplog.records), caplog.text

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1  # both parts in one run
    assert f"adapters: {tmp_path / 'adapter' / 'last'}; MLflow run {runs[0].info.run_id}" in printed  # where it all went
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert steps == [0, 1], steps  # one curve: the first part's step and the resumed part's
    inputs = {(d.dataset.name, d.tags[0].value) for d in runs[0].inputs.dataset_inputs}
    assert {("scifact/train-triples", "train"), ("scifact/train", "validation")} <= inputs, inputs
    assert runs[0].data.params["trainer.max_steps"] == "1"  # params cannot change; the resumed config is kept
    assert {"config_fit.yaml", "config_fit_resumed.yaml"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
