"""RetrievalEnvironment and rewards on the tiny LM and on hand-made rankings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search_r3.environment import ExactIndex, HNSWIndex, RefreshPolicy, RetrievalEnvironment, dcg_reward
from search_r3.evaluation.metrics import evaluate_run
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

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


def test_refresh_before_a_full_refresh_is_refused(lora_lm: EmbeddingLM) -> None:
    # A first selective refresh used to encode the whole corpus silently; that cost must be explicit.
    env = RetrievalEnvironment(TEXTS, lora_lm.encode_documents)
    with pytest.raises(RuntimeError, match="full_refresh"):
        env.refresh([0, 1])
    env.full_refresh()
    with pytest.raises(IndexError, match=r"\[0, 12\)"):
        env.refresh([12])
    with pytest.raises(ValueError, match="forward"):
        env.set_step(-1)


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


def test_settle_rounds_leave_the_rollouts_top_l_fresh(lora_lm: EmbeddingLM) -> None:
    # A refresh moves scores, so stale documents can enter the top-L it just refreshed; settling
    # re-encodes those until every rollout's top-L is at the current version (or the rounds run out).
    settled = RetrievalEnvironment(TEXTS, lora_lm.encode_documents, RefreshPolicy(top_l=3, settle_rounds=12))
    plain = RetrievalEnvironment(TEXTS, lora_lm.encode_documents, RefreshPolicy(top_l=3))
    settled.full_refresh()
    plain.full_refresh()
    torch.manual_seed(0)
    _train_a_bit(lora_lm)
    q = lora_lm.encode(["vitamin D", "Hamlet"])
    for env in (settled, plain):
        env.set_step(1)
    stats = settled.step_refresh(q, positives=[[], []])
    _, top = settled.search(q, 3)
    assert bool((settled.versions[top.flatten()] == 1).all())
    assert stats.reencoded == int((settled.versions == 1).sum()) and len(settled.history) == 2  # one record per step
    plain.step_refresh(q, positives=[[], []])
    # Settling starts from the same first pass and only adds documents.
    assert set((plain.versions == 1).nonzero().flatten().tolist()) <= set((settled.versions == 1).nonzero().flatten().tolist())


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


def test_drift_and_periodic_policies_trigger_full_refreshes(lora_lm: EmbeddingLM) -> None:
    env = RetrievalEnvironment(TEXTS, lora_lm.encode_documents, RefreshPolicy(top_l=2, drift_threshold=1e-6))
    env.full_refresh()
    _train_a_bit(lora_lm)
    env.set_step(1)
    stats = env.step_refresh(lora_lm.encode(["vitamin D"]), positives=[[11]])
    assert stats.full and stats.drift > 1e-6 and bool((env.versions == 1).all())
    env.policy = RefreshPolicy(top_l=2, full_refresh_every=2)
    env.set_step(2)
    assert env.step_refresh(lora_lm.encode(["Hamlet"]), positives=[[]]).full
    env.set_step(3)
    assert not env.step_refresh(lora_lm.encode(["Hamlet"]), positives=[[]]).full
    metrics = env.history[-1].metrics()
    assert metrics["env/reencoded"] == env.history[-1].reencoded and 0 < metrics["env/fresh_fraction"] < 1
    assert metrics["env/staleness_max"] == 1


def test_reward_through_the_index_equals_the_reward_over_the_whole_corpus(lora_lm: EmbeddingLM) -> None:
    env = RetrievalEnvironment(TEXTS, lora_lm.encode_documents, RefreshPolicy(top_l=3))
    env.full_refresh()
    q = lora_lm.encode(["vitamin D", "Hamlet", "number 7"])
    positives = [[1, 3], [11], [7]]
    full_scores = q @ env.vectors.T
    relevant = torch.zeros_like(full_scores, dtype=torch.bool)
    for r, p in enumerate(positives):
        relevant[r, p] = True
    for kind in ("ndcg", "scaled_dcg"):
        torch.testing.assert_close(env.reward(q, positives, k=3, kind=kind), dcg_reward(full_scores, relevant, k=3, kind=kind))
    failed = env.reward(q, positives, k=3, valid=torch.tensor([True, False, True]), failure_reward=-1.0)
    assert float(failed[1]) == -1.0


def test_fidelity_probe_is_perfect_when_fresh_and_drops_after_updates(lora_lm: EmbeddingLM) -> None:
    env = RetrievalEnvironment(TEXTS, lora_lm.encode_documents)
    env.full_refresh()
    q = lora_lm.encode(["vitamin D", "Hamlet"])
    probe = env.fidelity_probe(q, k=5)
    assert probe.top_overlap == 1.0 and probe.kendall_tau == pytest.approx(1.0)
    stale = env.vectors.clone()
    _train_a_bit(lora_lm)
    env.set_step(1)
    moved = env.fidelity_probe(lora_lm.encode(["vitamin D", "Hamlet"]), k=5)
    assert moved.kendall_tau < 1.0 and torch.equal(env.vectors, stale)  # the probe changes nothing


def test_hnsw_index_matches_exact_and_replaces_vectors_in_place() -> None:
    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=-1)
    exact, hnsw = ExactIndex(), HNSWIndex()
    exact.reset(vectors)
    hnsw.reset(vectors)
    queries = torch.nn.functional.normalize(torch.randn(20, 32, generator=g), dim=-1)
    (es, ei), (hs, hi) = exact.search(queries, 10), hnsw.search(queries, 10)
    assert (ei == hi).float().mean() >= 0.95 and torch.allclose(es, hs, atol=1e-5)
    moved = torch.tensor([5, 17, 200])
    hnsw.update(moved, queries[:3])  # those documents now sit exactly on the first three queries
    exact.update(moved, queries[:3])
    assert hnsw.search(queries[:3], 1)[1].flatten().tolist() == [5, 17, 200]
    assert exact.search(queries[:3], 1)[1].flatten().tolist() == [5, 17, 200]
    with pytest.raises(RuntimeError, match="reset"):
        HNSWIndex().search(queries, 3)


@pytest.mark.model
def test_hnsw_recall_at_10_on_real_scifact_embeddings(smollm2: EmbeddingLM, full_scifact_dir: Path) -> None:
    """The ANN back end against exact search on 1,000 real SciFact documents and the 300 test queries,
    embedded by the real default model, before and after replacing a tenth of the vectors in place."""
    from search_r3.datamodules.beir_files import ReadReport, find_file, find_queries_file, iter_corpus, read_qrels, read_queries

    scifact_dir = full_scifact_dir
    texts = [text for _, (_, _, text) in zip(range(1000), iter_corpus(find_file(scifact_dir, "corpus.jsonl")))]
    qrels, _ = read_qrels(scifact_dir / "qrels" / "test.tsv", ReadReport(), "error")
    query_texts, _ = read_queries(find_queries_file(scifact_dir, "test"), set(qrels), ReadReport(), "error")
    saved = dict(smollm2.max_tokens)
    smollm2.max_tokens["document"] = 32  # keeps the test under a minute on 2 cores; recall is what is tested
    try:
        docs = smollm2.encode_documents(texts)
    finally:
        smollm2.max_tokens.update(saved)
    queries = smollm2.encode(list(query_texts.values()))
    assert queries.shape[0] == 300
    exact, hnsw = ExactIndex(), HNSWIndex()
    exact.reset(docs)
    hnsw.reset(docs)

    def recall() -> float:
        (_, e), (_, h) = exact.search(queries, 10), hnsw.search(queries, 10)
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(e, h)) / e.numel()

    assert recall() >= 0.95
    g = torch.Generator().manual_seed(0)
    moved = torch.randperm(1000, generator=g)[:100]
    shifted = torch.nn.functional.normalize(docs[moved] + 0.05 * torch.randn(100, docs.shape[1], generator=g), dim=-1)
    exact.update(moved, shifted)
    hnsw.update(moved, shifted)
    assert recall() >= 0.95
