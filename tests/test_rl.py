"""Stage 2 (GRPO) on the tiny random LM with real SciFact queries and documents."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from search_r3.datamodules.rl_queries import RLQueryDataModule
from search_r3.environment import RefreshPolicy
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings
from search_r3.lightning_modules.losses import clipped_policy_loss, group_advantages, multi_positive_info_nce
from search_r3.lightning_modules.rl import RLModule


def _module(tiny_lm_dir: Path, tmp_path: Path, **kw) -> RLModule:
    torch.manual_seed(0)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=8,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_document_tokens=32, max_query_tokens=24)
    kw.setdefault("refresh", RefreshPolicy(top_l=5))
    return RLModule(encoder, group_size=4, adapter_dir=str(tmp_path / "adapter"), lr=1e-2, **kw)


def _data(root: Path, **kw) -> RLQueryDataModule:
    kw.setdefault("batch_size", 2)
    return RLQueryDataModule(data_root=str(root), val_queries=4, val_corpus_docs=30, **kw)


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), num_sanity_val_steps=0, enable_checkpointing=False, **kw)


def test_equal_rewards_in_a_group_give_no_policy_gradient() -> None:
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv[:4], torch.zeros(4)) and adv[4] > 0 > adv[5]
    logp = torch.randn(4, 6, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    loss = clipped_policy_loss(logp, logp.detach(), adv[:4], mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))


def test_policy_loss_ignores_masked_prompt_tokens_and_clips() -> None:
    logp = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, False], [False, True, True, True, True]])
    loss = clipped_policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.equal(logp.grad[~mask], torch.zeros(int((~mask).sum())))
    assert (logp.grad[mask] != 0).all()
    # On-policy the ratio is 1: the loss is minus the mean advantage over trajectories.
    assert float(loss) == pytest.approx(0.0)
    # Far outside the clip range the gradient vanishes for a positive advantage (PPO's pessimism).
    moved = (torch.zeros(1, 2) + 1.0).requires_grad_()
    clipped_policy_loss(moved, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool)).backward()
    assert torch.equal(moved.grad, torch.zeros(1, 2))


def test_multi_positive_info_nce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    docs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    relevant = torch.tensor([[True, True, False]])
    valid = torch.tensor([[True, True, True]])
    s = torch.tensor([1.0, 0.0, -1.0]) / 0.5
    expected = torch.logsumexp(s, 0) - torch.logsumexp(s[:2], 0)
    assert float(multi_positive_info_nce(q, docs, relevant, valid, tau=0.5)) == pytest.approx(float(expected))
    # Padding is ignored; a row without a positive contributes nothing.
    valid_pad = torch.tensor([[True, True, False]])
    expected_pad = torch.logsumexp(s[:2], 0) - torch.logsumexp(s[:2], 0)
    assert float(multi_positive_info_nce(q, docs, relevant, valid_pad, tau=0.5)) == pytest.approx(float(expected_pad))
    none = multi_positive_info_nce(q, docs, torch.zeros_like(relevant), valid, tau=0.5)
    assert float(none) == 0.0


def test_one_update_is_finite_and_reaches_lora_and_the_token_row(tiny_lm_dir: Path, mini_train_root: Path,
                                                                  tmp_path: Path) -> None:
    module = _module(tiny_lm_dir, tmp_path)
    data = _data(mini_train_root)
    data.setup("fit")
    env = module.build_environment(data.corpus_texts, data.corpus_ids)
    batch = next(iter(data.train_dataloader()))
    r = module.rollout(batch["query"])
    prompts = module.encoder.reasoning_prompt_ids([q for q in batch["query"] for _ in range(4)])
    for i, p in enumerate(prompts):
        assert not r["sampled"][i, : len(p)].any(), "a prompt token is in the policy mask"
        assert r["sampled"][i].any()
    emb, logp, logits = module._forward(r)
    positives = [env.positions(p) for p in batch["positives"] for _ in range(4)]
    rewards = env.reward(emb.detach(), positives, valid=~r["missing"])
    adv = group_advantages(torch.linspace(0, 1, len(rewards)), 4)  # non-zero advantages, so every term acts
    terms = module.losses(r, emb, logp, logp.detach(), logits, adv, positives)
    total = terms["policy"] + terms["kl"] + terms["embed"]
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["kl"]) == pytest.approx(0.0, abs=1e-5)
    total.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    # LoRA's B starts at zero, so at the first step the gradient reaches B (A gets it from then on).
    assert any("lora_B" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("trainable_tokens" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)


def test_format_rule_constant_failure_reward_or_penalised_retrieval(tiny_lm_dir: Path, mini_train_root: Path,
                                                                    tmp_path: Path) -> None:
    # A constant failure reward makes an all-failed group all-equal (zero advantage); the penalty keeps
    # the fixed-up embedding's retrieval signal and still pays a trajectory that ends with the token.
    module = _module(tiny_lm_dir, tmp_path, failure_reward=-0.5)
    data = _data(mini_train_root)
    data.setup("fit")
    env = module.build_environment(data.corpus_texts, data.corpus_ids)
    batch = next(iter(data.train_dataloader()))
    positives = [env.positions(p) for p in batch["positives"] for _ in range(4)]
    emb = env.vectors[[p[0] for p in positives]] + 0.3 * torch.randn(len(positives), env.vectors.shape[1])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    missing = torch.tensor([True, False] * (len(positives) // 2))
    retrieval = env.reward(emb, positives)
    constant = module.rollout_rewards(emb, positives, missing)
    assert torch.equal(constant[missing], torch.full((int(missing.sum()),), -0.5))
    torch.testing.assert_close(constant[~missing], retrieval[~missing])
    module.format_penalty = 0.1
    penalised = module.rollout_rewards(emb, positives, missing)
    torch.testing.assert_close(penalised, retrieval - 0.1 * missing.float())


def test_mean_reward_rises_on_a_toy_task(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path) -> None:
    """Four fixed queries, each step the same batch: the embedding term and the policy gradient must
    raise the reward of their rollouts within a few steps (a learnable signal with a tiny model)."""
    module = _module(tiny_lm_dir, tmp_path, embed_weight=1.0, kl_weight=0.0)
    rewards: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            rewards.append(float(trainer.callback_metrics["train/reward_mean"]))

    data = _data(mini_train_root, max_queries=4, batch_size=4)
    _trainer(tmp_path, max_steps=8, limit_val_batches=0, callbacks=[Record()]).fit(module, datamodule=data)
    assert len(rewards) == 8
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards
    assert module.env is not None and module.env.history[-1].fraction < 1.0  # selective refreshes happened


def test_validation_scores_both_modes_and_writes_reasoning_samples(tiny_lm_dir: Path, mini_train_root: Path,
                                                                    tmp_path: Path) -> None:
    module = _module(tiny_lm_dir, tmp_path, probe_every=1)
    trainer = _trainer(tmp_path, max_steps=1, val_check_interval=1)
    trainer.fit(module, datamodule=_data(mini_train_root))
    metrics = trainer.callback_metrics
    for key in ("val/reasoning/nDCG_at_10", "val/direct/nDCG_at_10", "val/nDCG_at_10", "env/probe_top_overlap",
                "env/reencoded_fraction", "train/zero_advantage_groups", "train/format_failure_rate"):
        assert key in metrics, key
    assert float(metrics["val/nDCG_at_10"]) == float(metrics["val/reasoning/nDCG_at_10"])
    samples = list((tmp_path / "reasoning").glob("step_*.txt"))
    assert samples and "greedy reasoning" in samples[0].read_text()
    assert (tmp_path / "adapter" / "best").is_dir()


def _trainable(module: RLModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_resume_in_the_middle_of_an_epoch_reaches_the_uninterrupted_state(tiny_lm_dir: Path, mini_train_root: Path,
                                                                          tmp_path: Path, interrupt_at_step) -> None:
    """Interrupted after step 2 of 4 (mid-epoch) and resumed from its checkpoint, an RL run must end where
    the uninterrupted one does: the same queries in the same order, the same sampled rollouts (the
    random streams come back from the checkpoint) and the same stale environment (not a fresh encode)."""
    data_kw = {"max_queries": 8}  # 4 batches of 2 queries
    straight = _module(tiny_lm_dir, tmp_path / "a")
    _trainer(tmp_path / "a", max_steps=4, limit_val_batches=0).fit(straight, datamodule=_data(mini_train_root, **data_kw))
    first = _module(tiny_lm_dir, tmp_path / "b")
    trainer = _trainer(tmp_path / "b", max_steps=4, limit_val_batches=0, callbacks=[interrupt_at_step(2)])
    trainer.fit(first, datamodule=_data(mini_train_root, **data_kw))
    assert trainer.global_step == 2
    resumed = _module(tiny_lm_dir, tmp_path / "c")
    resumed_trainer = _trainer(tmp_path / "c", max_steps=4, limit_val_batches=0)
    resumed_trainer.fit(resumed, datamodule=_data(mini_train_root, **data_kw), ckpt_path=str(tmp_path / "b" / "mid.ckpt"))
    assert resumed_trainer.global_step == 4
    assert resumed.env is not None and straight.env is not None
    assert not any(s.full for s in resumed.env.history), "the resumed run re-encoded the corpus instead of restoring it"
    torch.testing.assert_close(resumed.env.vectors, straight.env.vectors, atol=1e-6, rtol=0)
    assert torch.equal(resumed.env.versions, straight.env.versions)
    for name, value in _trainable(straight).items():
        torch.testing.assert_close(_trainable(resumed)[name], value, atol=1e-6, rtol=0)


def test_a_saved_environment_only_restores_onto_its_own_corpus(tiny_lm_dir: Path, mini_train_root: Path,
                                                                tmp_path: Path) -> None:
    module = _module(tiny_lm_dir, tmp_path)
    data = _data(mini_train_root)
    data.setup("fit")
    state = module.build_environment(data.corpus_texts, data.corpus_ids).state_dict()
    restored = module.build_environment(data.corpus_texts, data.corpus_ids, state)
    assert not restored.history and torch.equal(restored.vectors, state["vectors"])
    with pytest.raises(ValueError, match="another corpus"):
        restored.load_state_dict({**state, "corpus": "0" * 16})
    shorter = module.build_environment(data.corpus_texts[:-1], data.corpus_ids[:-1], state)
    assert shorter.history and shorter.history[-1].full  # encoded afresh, with a warning


def test_needs_a_group(tiny_lm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="group_size"):
        RLModule(EmbeddingLM(base_model=str(tiny_lm_dir), show_progress=False, lora=LoraSettings(r=2, alpha=4)),
                 group_size=1)


def test_rl_data_holds_out_validation_queries_and_keeps_every_positive(data_root: Path) -> None:
    data = RLQueryDataModule(data_root=str(data_root), dataset="beir/scifact", max_corpus_docs=1200, val_queries=20,
                             val_corpus_docs=100, batch_size=3)
    data.setup("fit")
    held_out = set(data.validation.tasks[0].queries)
    assert len(held_out) == 20 and not held_out & set(data.train_query_ids)
    assert len(data.corpus_texts) == len(data.corpus_ids) <= 1200 and data.task.capped
    known = set(data.corpus_ids)
    batch = next(iter(data.train_dataloader()))
    assert len(batch["query"]) == 3 and all(p and set(p) <= known for p in batch["positives"])
    texts = dict(zip(data.corpus_ids, data.corpus_texts))
    assert texts["4983"].startswith("Microstructural development of human newborn cerebral white matter")


def test_a_saved_stage1_adapter_keeps_training_in_stage2(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """configs/rl.yaml loads the Stage-1 adapter with `lora` set: LoRA and the token row must stay trainable,
    and the loaded model must embed exactly as the saved one."""
    stage1 = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for p in stage1.parameters():
            if p.requires_grad:
                p.add_(0.1)
    stage1.save(tmp_path / "sft")
    loaded = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, adapter=str(tmp_path / "sft"),
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    torch.testing.assert_close(loaded.encode(["vitamin D"]), stage1.encode(["vitamin D"]), atol=1e-6, rtol=0)
    RLModule(loaded, group_size=2)  # accepted as a trainable encoder
