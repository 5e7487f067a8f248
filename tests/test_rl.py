"""Stage 2 (GRPO) on the tiny random LM with real SciFact queries and documents."""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path

import lightning as L
import pytest
import torch

from search_r3.datamodules.rl_queries import RLQueryDataModule
from search_r3.environment import RefreshPolicy
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings
from search_r3.lightning_modules.losses import group_advantages
from search_r3.lightning_modules.rl import RLModule


def _module(tiny_lm_dir: Path, tmp_path: Path, **kw) -> RLModule:
    torch.manual_seed(0)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=8,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_document_tokens=32, max_query_tokens=24)
    kw.setdefault("refresh", RefreshPolicy(top_l=5))
    kw.setdefault("group_size", 4)
    return RLModule(encoder, adapter_dir=str(tmp_path / "adapter"), lr=1e-2, **kw)


def _data(root: Path, **kw) -> RLQueryDataModule:
    kw.setdefault("batch_size", 2)
    return RLQueryDataModule(data_root=str(root), val_queries=4, val_corpus_docs=30, **kw)


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), num_sanity_val_steps=0, enable_checkpointing=False, **kw)


def test_kl_enters_per_token_and_dr_grpo_leaves_advantages_unscaled(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """TRL's placement: β·KL per token inside the policy term's normalisation (here GRPO's per-rollout
    mean), the all-equal group included; ``token_mean`` keeps the separate mean over policy tokens."""
    from search_r3.lightning_modules.losses import TokenScores

    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [True, True, True]])
    kl = torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0, 4.0, 0.0, 0.0, 9.0])  # the policy tokens in row order
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    logp = torch.zeros(4, 3)
    got = {}
    for placement in ("per_token", "token_mean"):
        module = _module(tiny_lm_dir, tmp_path, group_size=2, kl_weight=0.1, embed_weight=0.0, kl_placement=placement)
        terms = module.losses(mask, torch.zeros(4, 8), logp, TokenScores(logp[mask], kl, kl * 0),
                              group_advantages(rewards, 2), [], rewards)
        got[placement] = float(terms["kl"])
    assert got == {"per_token": pytest.approx((2.0 + 2.0 + 2.0 + 3.0) / 4), "token_mean": pytest.approx(21.0 / 9)}
    assert not _module(tiny_lm_dir, tmp_path, loss_norm="dr_grpo").scale_rewards
    assert _module(tiny_lm_dir, tmp_path, loss_norm="grpo").scale_rewards
    assert _module(tiny_lm_dir, tmp_path, loss_norm="sequence").kl_placement == "token_mean"


def test_a_step_with_the_direct_baseline_scores_direct_embeddings_and_logs_the_comparison(
        tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path) -> None:
    module = _module(tiny_lm_dir, tmp_path, advantage_baseline="direct", kl_weight=0.0)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(mini_train_root, max_queries=4))
    metrics = trainer.callback_metrics
    assert {"train/beats_direct_rate_step", "train/margin_over_direct_step"} <= set(metrics)
    rate, margin = float(metrics["train/beats_direct_rate_step"]), float(metrics["train/margin_over_direct_step"])
    assert 0.0 <= rate <= 1.0 and -1.0 <= margin <= 1.0
    # the baseline is the current policy's direct-mode embedding, exactly what test time computes
    queries = ["vitamin D deficiency", "who wrote Hamlet?"]
    with module.encoder.eval_mode():
        torch.testing.assert_close(module.direct_embeddings(queries).cpu(),
                                   module.encoder.encode_queries(queries, "direct").cpu(), atol=1e-5, rtol=0)


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
        assert not r.policy[i, : len(p)].any(), "a prompt token is in the policy mask"
        assert r.policy[i].any()
    emb, logp, tokens = module._forward(r)
    positives = [env.positions(p) for p in batch["positives"] for _ in range(4)]
    rewards = torch.linspace(0, 1, len(positives))  # distinct rewards, non-zero advantages: every term acts
    adv = group_advantages(rewards, 4)
    terms = module.losses(r.policy, emb, logp, tokens, adv, positives, rewards)
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
    r = SimpleNamespace(format_failed=missing)  # the one Rollout field the reward reads
    retrieval = env.reward(emb, positives)
    constant = module.rollout_rewards(r, emb, positives)
    assert torch.equal(constant[missing], torch.full((int(missing.sum()),), -0.5))
    torch.testing.assert_close(constant[~missing], retrieval[~missing])
    module.format_penalty = 0.1
    penalised = module.rollout_rewards(r, emb, positives)
    torch.testing.assert_close(penalised, retrieval - 0.1 * missing.float())


def test_the_embedding_term_raises_the_retrieval_reward(tiny_lm_dir: Path, mini_train_root: Path,
                                                        tmp_path: Path) -> None:
    """Four fixed queries, each step the same batch: with the embedding InfoNCE term on (and KL off) the
    retrieval reward of the rollouts rises within a few steps. The policy gradient is on too, but this
    term alone can explain the rise; the policy gradient's own proof is the sampled-token test below."""
    module = _module(tiny_lm_dir, tmp_path, embed_weight=1.0, kl_weight=0.0, top_k=50)  # as the test below
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
    module = _module(tiny_lm_dir, tmp_path, probe_every=1, samples_every=1)
    trainer = _trainer(tmp_path, max_steps=1, val_check_interval=1)
    trainer.fit(module, datamodule=_data(mini_train_root))
    metrics = trainer.callback_metrics
    for key in ("val/reasoning/nDCG_at_10", "val/direct/nDCG_at_10", "val/nDCG_at_10", "env/probe_top_overlap",
                "env/reencoded_fraction", "train/reasoning_tokens_p50", "train/reasoning_tokens_p90"):
        assert key in metrics, key
    # What the paper reports of RL and what shows a run going wrong, per step and per epoch.
    for key in ("reward_ge_0.5", "format_failure_rate", "zero_variance_groups", "kl", "entropy",
                "reasoning_tokens", "empty_reasoning_rate"):
        assert f"train/{key}_step" in metrics and f"train/{key}_epoch" in metrics, key
    assert float(metrics["train/entropy_step"]) > 0
    table = json.loads((tmp_path / "rollouts" / "step_000001.json").read_text())
    assert set(table) == {"step", "query", "reasoning", "reward"} and len(table["query"]) == 8
    assert float(metrics["val/nDCG_at_10"]) == float(metrics["val/reasoning/nDCG_at_10"])
    greedy = json.loads(next((tmp_path / "reasoning").glob("step_*.json")).read_text())  # held-out queries
    assert set(greedy) == {"step", "query", "analysis", "analysis_tokens", "embed_token_appended"}
    assert greedy["query"] and len(greedy["analysis"]) == len(greedy["query"])
    staleness = json.loads(next((tmp_path / "environment").glob("staleness_step_*.json")).read_text())
    assert sum(staleness["documents"]) == len(module.env)
    assert (tmp_path / "adapter" / "best").is_dir()


def _trainable(module: RLModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class _RecordQueries(L.Callback):
    """The query ids of every training step, to compare the order two runs trained in."""

    def __init__(self) -> None:
        self.steps: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        self.steps[trainer.global_step] = list(batch["query_id"])


@pytest.mark.parametrize("stop", [2, 4, 5], ids=["mid-epoch-0", "end-of-epoch-0", "mid-epoch-1"])
def test_resume_in_the_middle_of_an_epoch_reaches_the_uninterrupted_state(tiny_lm_dir: Path, mini_train_root: Path,
                                                                          tmp_path: Path, interrupt_at_step,
                                                                          stop: int) -> None:
    """Interrupted after step ``stop`` (epochs of 4 steps) and resumed from its checkpoint, an RL run must end
    where the uninterrupted one does: the same queries in the same order, the same sampled rollouts (the
    random streams come back from the checkpoint) and the same stale environment (not a fresh encode).
    Its per-epoch telemetry covers the whole epoch, not only the steps after the resume.

    Epoch 1 is reshuffled (Lightning's ``set_epoch`` must reach the batch sampler): until it did, every
    epoch replayed epoch 0's order, and a run resumed inside epoch 1, or from the checkpoint at the end
    of epoch 0, went on in epoch 1's order, so it trained on other queries than the uninterrupted run."""
    data_kw = {"max_queries": 8}  # 4 batches of 2 queries an epoch; 7 steps reach into epoch 1
    straight, order = _module(tiny_lm_dir, tmp_path / "a"), _RecordQueries()
    straight_trainer = _trainer(tmp_path / "a", max_steps=7, limit_val_batches=0, callbacks=[order])
    straight_trainer.fit(straight, datamodule=_data(mini_train_root, **data_kw))
    assert [order.steps[s] for s in (4, 5, 6)] != [order.steps[s] for s in (0, 1, 2)], "epoch 1 replayed epoch 0's order"
    assert len({q for s in range(4) for q in order.steps[s]}) == 8
    first = _module(tiny_lm_dir, tmp_path / "b")
    trainer = _trainer(tmp_path / "b", max_steps=7, limit_val_batches=0, callbacks=[interrupt_at_step(stop)])
    trainer.fit(first, datamodule=_data(mini_train_root, **data_kw))
    assert trainer.global_step == stop
    resumed, resumed_order = _module(tiny_lm_dir, tmp_path / "c"), _RecordQueries()
    resumed_trainer = _trainer(tmp_path / "c", max_steps=7, limit_val_batches=0, callbacks=[resumed_order])
    resumed_trainer.fit(resumed, datamodule=_data(mini_train_root, **data_kw), ckpt_path=str(tmp_path / "b" / "mid.ckpt"))
    assert resumed_trainer.global_step == 7
    assert resumed_order.steps == {s: order.steps[s] for s in range(stop, 7)}
    assert resumed.env is not None and straight.env is not None
    assert not any(s.full for s in resumed.env.history), "the resumed run re-encoded the corpus instead of restoring it"
    torch.testing.assert_close(resumed.env.vectors, straight.env.vectors, atol=1e-6, rtol=0)
    assert torch.equal(resumed.env.versions, straight.env.versions)
    for name, value in _trainable(straight).items():
        torch.testing.assert_close(_trainable(resumed)[name], value, atol=1e-6, rtol=0)
    epoch = {k: float(v) for k, v in straight_trainer.callback_metrics.items() if k.endswith("_epoch")}
    assert {"train/reward_ge_0.5_epoch", "train/kl_epoch", "train/entropy_epoch", "train/reasoning_tokens_epoch"} <= set(epoch)
    for key, value in epoch.items():
        assert float(resumed_trainer.callback_metrics[key]) == pytest.approx(value, abs=1e-6), key


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


def test_rl_data_holds_out_validation_queries_and_keeps_every_positive(shared_data_root: Path) -> None:
    data = RLQueryDataModule(data_root=str(shared_data_root), dataset="beir/scifact", max_corpus_docs=1200, val_queries=20,
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


def test_a_saved_stage1_adapter_keeps_training_in_stage2(tiny_lm_dir: Path, tmp_path: Path, perturb_trainable) -> None:
    """configs/rl.yaml loads the Stage-1 adapter with `lora` set: LoRA and the token row must stay trainable,
    and the loaded model must embed exactly as the saved one."""
    stage1 = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    perturb_trainable(stage1)
    stage1.save(tmp_path / "sft")
    loaded = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, adapter=str(tmp_path / "sft"),
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    torch.testing.assert_close(loaded.encode(["vitamin D"]), stage1.encode(["vitamin D"]), atol=1e-6, rtol=0)
    RLModule(loaded, group_size=2)  # accepted as a trainable encoder


def _trained_stage1(tiny_lm_dir: Path, folder: Path, perturb_trainable) -> EmbeddingLM:
    """A Stage-1 model whose LoRA (B included) and token row are far from their initial values, saved."""
    torch.manual_seed(1)
    stage1 = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=8,
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_document_tokens=32, max_query_tokens=24)
    perturb_trainable(stage1, 0.2, noise=True)
    stage1.save(folder)
    return stage1


def test_stage2_starts_from_stage1_and_is_anchored_to_it(tiny_lm_dir: Path, mini_train_root: Path,
                                                         tmp_path: Path, perturb_trainable) -> None:
    """GRPO's reference is the policy RL starts from: with a trained Stage-1 adapter the KL at step 0 is
    exactly 0 and the embeddings are Stage 1's. (Continuing the Stage-1 adapter with the base model as
    the reference, as before, gives a KL of several nats here.)"""
    stage1 = _trained_stage1(tiny_lm_dir, tmp_path / "sft", perturb_trainable)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=8,
                          adapter=str(tmp_path / "sft"), lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                          max_document_tokens=32, max_query_tokens=24)
    module = RLModule(encoder, group_size=4, adapter_dir=str(tmp_path / "adapter"), kl_weight=1.0,
                      refresh=RefreshPolicy(top_l=5))
    texts = ["vitamin D deficiency in the elderly", "who wrote hamlet"]
    # Stage 1 merged into the weights against Stage 1 as an adapter: equal up to fp32 rounding.
    torch.testing.assert_close(encoder.encode(texts, "document"), stage1.encode(texts, "document"), atol=1e-5, rtol=0)
    data = _data(mini_train_root)
    data.setup("fit")
    env = module.build_environment(data.corpus_texts, data.corpus_ids)
    batch = next(iter(data.train_dataloader()))
    r = module.rollout(batch["query"])
    emb, logp, tokens = module._forward(r)
    positives = [env.positions(p) for p in batch["positives"] for _ in range(4)]
    rewards = torch.linspace(0, 1, len(positives))
    terms = module.losses(r.policy, emb, logp, tokens, group_advantages(rewards, 4), positives, rewards)
    assert float(terms["kl"]) == 0.0
    # The RL adapter loads for `search-r3 test` on its own, Stage 1 inside it, and embeds as the policy.
    perturb_trainable(encoder, 0.1, noise=True)
    encoder.save(tmp_path / "rl")
    assert (tmp_path / "rl" / "base_adapter" / "search_r3.json").is_file()
    tested = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                         adapter=str(tmp_path / "rl"), max_document_tokens=32)
    torch.testing.assert_close(tested.encode(texts, "document"), encoder.encode(texts, "document"), atol=1e-5, rtol=0)
    # Its digest identifies both stages: another Stage 1 under the same RL weights is another checkpoint.
    digest = tested.adapter_digest
    (tmp_path / "rl" / "base_adapter" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "sft" / "adapter_model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    from search_r3.common.digests import folder_digest

    assert folder_digest(str(tmp_path / "rl")) != digest


def test_rollout_scores_the_sampled_stop_token_at_the_sampling_temperature(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """A trajectory that ends its turn without the embed token keeps the stop token it sampled in the
    policy mask (that action failed the format), the appended fix-up text gets no gradient, and every
    log-prob is taken under the tempered distribution that was sampled."""
    from search_r3.model.reasoning import Generated

    module = _module(tiny_lm_dir, tmp_path, temperature=0.7)
    enc = module.encoder
    tok = enc.tokenizer
    close = tok(enc.prompts.reasoning_close, add_special_tokens=False)["input_ids"]
    words = tok("vitamin deficiency", add_special_tokens=False)["input_ids"]
    prompts = enc.reasoning_prompt_ids(["vitamin D"] * 4)
    eos = tok.eos_token_id
    responses = [words + [enc.embed_token_id], words + close, words[:1] + close, [enc.embed_token_id]]
    from search_r3.model.analysis_measures import AnalysisMeasures

    lengths = [len(words), len(words), 1, 0]
    gen = Generated(prompts, responses, [False, True, True, False], [None, eos, None, None], lengths,
                    [AnalysisMeasures(n, False, False, i == 2) for i, n in enumerate(lengths)])
    module.encoder.reasoner.generate = lambda *a, **k: gen  # the layout under test, not the sampler
    r = module.rollout(["vitamin D"])
    p = len(prompts[0])
    n = len(words)
    assert r.policy[0, p: p + n + 1].all() and r.policy[0].sum() == n + 1  # analysis + embed token
    assert r.policy[1, p: p + n + 1].all() and r.policy[1].sum() == n + 1  # analysis + sampled stop
    assert int(r.targets[1, p + n]) == eos and int(r.input_ids[1, p + n]) == close[0]
    assert r.policy[2].sum() == 1 and bool(r.capped[2])  # capped: nothing sampled after the analysis
    assert r.analysis_tokens.tolist() == [n, n, 1, 0]
    emb, logp, _ = module._forward(r)
    with torch.no_grad():
        hidden = enc.decoder(input_ids=r.input_ids, attention_mask=r.attention_mask).last_hidden_state
        raw = enc.lm.get_output_embeddings()(hidden[1, p + n - 1])
    want = torch.log_softmax(raw.float() / 0.7, -1)[eos]
    torch.testing.assert_close(logp[1, p + n], want)


def _sampled_token_reward_curve(tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path, steps: int,
                                sampled_token_reward: type, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=8,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_document_tokens=32, max_query_tokens=24)
    # top_k=50: a sampler truncated to 50 of the ~400 tokens (scored under the same truncation), so 24
    # steps of a tiny random model move a visible share of the sampled tokens.
    module = sampled_token_reward(encoder, group_size=4, adapter_dir=str(tmp_path / "adapter"), lr=lr,
                                 embed_weight=0.0, kl_weight=0.0, refresh=RefreshPolicy(top_l=5), samples_every=0,
                                 top_k=50)
    rewards: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            rewards.append(float(trainer.callback_metrics["train/reward_mean"]))

    data = _data(mini_train_root, max_queries=4, batch_size=4)  # the same 4 queries every step
    _trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=[Record()]).fit(module, datamodule=data)
    return rewards


def test_the_policy_gradient_alone_raises_a_reward_on_sampled_tokens(tiny_lm_dir: Path, mini_train_root: Path,
                                                                     tmp_path: Path, monkeypatch,
                                                                     sampled_token_reward: type) -> None:
    """The reward (see conftest.SampledTokenReward) depends on nothing but the sampled tokens, and the
    embedding term and the KL are off: only the policy gradient can raise it."""
    rewards = _sampled_token_reward_curve(tiny_lm_dir, mini_train_root, tmp_path / "up", 24, sampled_token_reward)
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.15, rewards
    # Mutation check: the same run with the advantages' sign flipped must learn the other way.
    import search_r3.lightning_modules.rl as rl

    flipped = rl.group_advantages
    monkeypatch.setattr(rl, "group_advantages", lambda *a, **k: -flipped(*a, **k))
    wrong = _sampled_token_reward_curve(tiny_lm_dir, mini_train_root, tmp_path / "down", 24, sampled_token_reward)
    assert sum(wrong[-6:]) / 6 < sum(wrong[:6]) / 6 - 0.15, wrong


def test_the_policy_gradient_credits_each_token_at_its_own_position(tiny_lm_dir: Path, mini_train_root: Path,
                                                                    tmp_path: Path, alternating_parity_reward: type) -> None:
    """A reward on which token sits at which position (see conftest.AlternatingParityReward): only log-probs
    read at the positions that predict their tokens can raise it (checked: reading the hidden states one
    position off makes this fail)."""
    rewards = _sampled_token_reward_curve(tiny_lm_dir, mini_train_root, tmp_path, 40, alternating_parity_reward, lr=3e-2)
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.15, rewards


def test_against_the_direct_baseline_the_policy_learns_the_analysis_that_helps(
        tiny_lm_dir: Path, mini_train_root: Path, tmp_path: Path, monkeypatch, analysis_helps_or_hurts: type) -> None:
    """See conftest.AnalysisHelpsOrHurts: the share of rollouts that beat the direct embedding rises; with
    the direct advantage's sign flipped (the mutation check) it falls."""

    def curve(folder: Path) -> list[float]:
        torch.manual_seed(0)
        encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=8,
                              lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_document_tokens=32, max_query_tokens=24)
        module = analysis_helps_or_hurts(encoder, group_size=4, adapter_dir=str(folder / "adapter"), lr=1e-2,
                                         embed_weight=0.0, kl_weight=0.0, refresh=RefreshPolicy(top_l=5),
                                         samples_every=0, top_k=50, advantage_baseline="direct")
        shares: list[float] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                shares.append(float(trainer.callback_metrics["train/beats_direct_rate_step"]))

        _trainer(folder, max_steps=40, limit_val_batches=0, callbacks=[Record()]).fit(
            module, datamodule=_data(mini_train_root, max_queries=4, batch_size=4))
        return shares

    up = curve(tmp_path / "up")
    assert sum(up[-6:]) / 6 > sum(up[:6]) / 6 + 0.15, up
    import search_r3.lightning_modules.rl as rl

    direct = rl.direct_advantages
    monkeypatch.setattr(rl, "direct_advantages", lambda *a, **k: -direct(*a, **k))
    down = curve(tmp_path / "down")
    assert sum(down[-6:]) / 6 < sum(down[:6]) / 6 - 0.15, down


def test_training_sources_name_the_files_that_train_the_policy(mini_train_root: Path) -> None:
    data = _data(mini_train_root)
    sources = dict(data.training_sources())
    assert set(sources) == {"scifact/train-qrels", "scifact/corpus"}
    assert all(path.is_file() for path in sources.values())
