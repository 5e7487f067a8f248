"""RetrievalEnvironment and rewards on the tiny LM and on hand-made rankings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from environment import RefreshPolicy, RetrievalEnvironment, dcg_reward
from evaluation.metrics import evaluate_run
from lightning_modules.embedding_lm import EmbeddingLM, LoraSettings

TEXTS = [f"document {i} about {'vitamin D' if i % 2 else 'Hamlet'} number {i}" for i in range(12)]


@pytest.fixture()
def lora_lm(tiny_lm_dir: Path) -> EmbeddingLM:
    return EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                       lora=LoraSettings(r=4, alpha=8, dropout=0.0))


def _train_a_bit(model: EmbeddingLM) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def test_refresh_equals_a_fresh_encode_of_those_documents_only(lora_lm: EmbeddingLM) -> None:
    env = RetrievalEnvironment(TEXTS, lora_lm.encode_documents)
    assert env.full_refresh().reencoded == len(TEXTS)
    stale = env.vectors.clone()
    _train_a_bit(lora_lm)
    env.set_step(1)
    stats = env.refresh([0, 3, 5, 3])
    assert stats.reencoded == 3 and stats.fraction == pytest.approx(3 / 12) and stats.staleness == {0: 3, 1: 9}
    torch.testing.assert_close(env.vectors[[0, 3, 5]], lora_lm.encode_documents([TEXTS[i] for i in (0, 3, 5)]))
    others = [i for i in range(12) if i not in (0, 3, 5)]
    assert torch.equal(env.vectors[others], stale[others]) and not torch.allclose(env.vectors[0], stale[0])
    assert env.refresh([0, 3]).reencoded == 0  # already fresh at this version


def test_exact_search_equals_brute_force(lora_lm: EmbeddingLM) -> None:
    env = RetrievalEnvironment(TEXTS, lora_lm.encode_documents)
    env.full_refresh()
    q = lora_lm.encode(["vitamin D", "Hamlet"])
    scores, idx = env.search(q, k=5)
    ref_s, ref_i = (q @ env.vectors.T).topk(5, dim=1)
    assert torch.equal(idx, ref_i) and torch.allclose(scores, ref_s)


def test_step_refresh_touches_top_l_and_positives(lora_lm: EmbeddingLM) -> None:
    env = RetrievalEnvironment(TEXTS, lora_lm.encode_documents, RefreshPolicy(top_l=2))
    env.full_refresh()
    env.set_step(1)
    stats = env.step_refresh(lora_lm.encode(["vitamin D"]), positives=[[11]])
    fresh = set((env.versions == 1).nonzero().flatten().tolist())
    assert 11 in fresh and 2 <= stats.reencoded <= 3 and len(fresh) == stats.reencoded


def test_rewards_are_one_at_the_top_and_fall_as_the_positive_drops() -> None:
    n = 20
    rewards = []
    for rank in range(n):
        scores = torch.linspace(1, 0, n)[None]
        relevant = torch.zeros(1, n, dtype=torch.bool)
        relevant[0, rank] = True
        rewards.append((float(dcg_reward(scores, relevant, k=10)), float(dcg_reward(scores, relevant, k=10, kind="scaled_dcg"))))
    assert rewards[0][0] == pytest.approx(1.0)
    assert all(a[0] > b[0] for a, b in zip(rewards[:10], rewards[1:10]))
    assert all(r[0] == 0 for r in rewards[10:])
    assert all(0 <= r[1] <= 1 for r in rewards) and all(a[1] > b[1] for a, b in zip(rewards[:10], rewards[1:10]))
    no_relevant = dcg_reward(torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.bool))
    assert float(no_relevant) == 0.0


def test_ndcg_reward_equals_ir_measures() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 30, generator=g)
    relevant = torch.rand(4, 30, generator=g) > 0.8
    reward = dcg_reward(scores, relevant, k=10)
    for row in range(4):
        qrels = {"q": {f"d{i}": 1 for i in range(30) if relevant[row, i]}}
        run = {"q": {f"d{i}": float(scores[row, i]) for i in range(30)}}
        assert float(reward[row]) == pytest.approx(evaluate_run(qrels, run, ["nDCG@10"])["nDCG@10"], abs=1e-5)
