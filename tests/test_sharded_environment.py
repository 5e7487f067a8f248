"""Sharded search on 2 gloo processes is the one-process search: the RL environment and evaluation.

Each rank owns half of the document vectors; searches are a local top-k per rank merged from k
candidates per query and rank, refreshes re-encode on the owner, and the vectors a reward needs are
summed from their owners. Against one process holding everything and seeing every rank's queries: the
same top-k, rewards, refresh counts, staleness, fidelity probe and checkpoint state, with half the
vector bytes per rank; a checkpoint's per-rank block files restore either layout. A reduced storage dtype halves the bytes again and moves rewards only a little.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from search_r3.datamodules.beir import RetrievalTask
from search_r3.environment import RefreshPolicy, RetrievalEnvironment
from search_r3.environment.index import ExactIndex
from search_r3.evaluation.dense_eval import EmbeddingStore, owned_documents, score_task
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

TEXTS = [f"document {i} about {['vitamin D', 'Hamlet', 'the ocean', 'prime numbers'][i % 4]} number {i}"
         for i in range(41)]  # odd: the two blocks differ in size
QUERIES = ["vitamin D levels", "Hamlet's father", "deep ocean fish", "prime numbers 7", "number 12",
           "document 3", "vitamin D and bones", "the Danish prince"]
POSITIVES = [[0, 4], [1], [2, 6, 10], [3], [12], [3], [8], [5, 9]]


class CountingIndex(ExactIndex):
    """The exact index, counting the query rows it is asked to search (each rank's search meets every
    rank's queries, so a rank that searched its own share twice would show it here)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.rows += queries.shape[0]
        return super().search(queries, k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario(model_dir: str, shard: bool, storage: torch.dtype = torch.float32, blocks: str | None = None) -> dict:
    """Two RL-like steps on this rank's half of the queries (all of them on one process)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model = EmbeddingLM(base_model=model_dir, dtype="float32", show_progress=False, batch_size=1,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    env = RetrievalEnvironment(TEXTS, model.encode_documents, RefreshPolicy(top_l=5, neighbours=1, settle_rounds=1),
                               index=CountingIndex(), shard=shard, storage_dtype=storage)
    mine = slice(rank * len(QUERIES) // world, (rank + 1) * len(QUERIES) // world)
    env.full_refresh()
    out: dict = {"steps": [], "owned": (env.owned.start, env.owned.stop)}
    for step in (1, 2):
        torch.manual_seed(step)  # the same "optimizer step" on every rank
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        env.set_step(step)
        q = model.encode(QUERIES[mine])
        stats = env.step_refresh(q, POSITIVES[mine])
        scores, idx = env.search(q, 7)
        out["steps"].append({"reward": env.reward(q, POSITIVES[mine], k=5), "scores": scores, "idx": idx,
                             "vectors": env.vectors_at(idx[:, :3]), "reencoded": stats.reencoded,
                             "drift": stats.drift, "staleness": stats.staleness})
    probe = env.fidelity_probe(q, k=5)
    out.update(probe=(probe.top_overlap, probe.kendall_tau), state=env.state_dict(), bytes=env.vector_bytes(),
               searched_rows=env.index.rows)
    if blocks is not None:  # a checkpoint of per-rank block files, restored by a fresh sharded environment
        out["manifest"] = env.state_dict(Path(blocks))
        fresh = RetrievalEnvironment(TEXTS, model.encode_documents, shard=shard)
        fresh.load_state_dict(out["manifest"])
        out["restored"] = (fresh.vectors, fresh.versions, fresh.step)
    return out


def _worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:  # module level: spawn pickles it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _scenario(model_dir, shard=True, blocks=str(Path(out) / "blocks"))
        # A corpus with fewer documents than ranks would leave a rank an empty block: it stays replicated.
        result["one_document_sharded"] = RetrievalEnvironment(["only one"], lambda texts: None, shard=True).shard
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_sharded_processes_give_the_replicated_search_rewards_and_state(tiny_lm_dir: Path, tmp_path: Path) -> None:
    one = _scenario(str(tiny_lm_dir), shard=False)
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_lm_dir), str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert two[0]["owned"] == (0, 20) and two[1]["owned"] == (20, 41)
    assert not two[0]["one_document_sharded"] and not two[1]["one_document_sharded"]
    for s, (a, b) in enumerate(zip(two[0]["steps"], two[1]["steps"])):
        ref = one["steps"][s]
        assert a["reencoded"] == b["reencoded"] == ref["reencoded"] > 0, (s, a["reencoded"], ref["reencoded"])
        assert a["staleness"] == b["staleness"] == ref["staleness"]
        assert torch.equal(torch.cat([a["idx"], b["idx"]]), ref["idx"]), s  # every rank's queries saw both blocks
        torch.testing.assert_close(torch.cat([a["scores"], b["scores"]]), ref["scores"], atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.cat([a["vectors"], b["vectors"]]), ref["vectors"], atol=1e-6, rtol=0)
        assert torch.equal(torch.cat([a["reward"], b["reward"]]), ref["reward"]), s
        assert a["drift"] == pytest.approx(ref["drift"], abs=1e-6)
    # The probe is over each rank's queries (4 and 4): their mean is the one-process probe over all 8.
    assert (two[0]["probe"][0] + two[1]["probe"][0]) / 2 == pytest.approx(one["probe"][0])
    for state in (two[0]["state"], two[1]["state"]):  # checkpoints hold the whole corpus, in corpus order
        torch.testing.assert_close(state["vectors"], one["state"]["vectors"], atol=1e-6, rtol=0)
        assert torch.equal(state["versions"], one["state"]["versions"])
    # A checkpoint of a sharded environment: each rank wrote only its own block, the state names them,
    # each rank restores its block from them, and one process restores the whole corpus from both.
    assert two[0]["manifest"] == two[1]["manifest"] and "vectors" not in two[0]["manifest"]
    for rank, rows in ((0, 20), (1, 21)):
        saved = torch.load(tmp_path / "blocks" / f"step2-rank{rank}-of2.pt", weights_only=True)
        assert saved["vectors"].shape[0] == saved["versions"].shape[0] == rows
        vectors, versions, step = two[rank]["restored"]
        start = two[rank]["owned"][0]
        torch.testing.assert_close(vectors, one["state"]["vectors"][start : start + rows], atol=1e-6, rtol=0)
        assert torch.equal(versions, one["state"]["versions"][start : start + rows]) and step == 2
    whole = RetrievalEnvironment(TEXTS, lambda texts: None)
    whole.load_state_dict(two[0]["manifest"])
    torch.testing.assert_close(whole.vectors, one["state"]["vectors"], atol=1e-6, rtol=0)
    assert torch.equal(whole.versions, one["state"]["versions"])
    # Each query (rollouts' and the neighbour look-ups') is searched once per block: every rank searches
    # as many rows as the one process does, not world times as many.
    assert two[0]["searched_rows"] == two[1]["searched_rows"] == one["searched_rows"], \
        (two[0]["searched_rows"], two[1]["searched_rows"], one["searched_rows"])
    # Half of the vectors per rank (20 and 21 of 41 documents).
    assert max(t["bytes"] for t in two) <= 0.55 * one["bytes"], ([t["bytes"] for t in two], one["bytes"])


def test_bfloat16_storage_halves_the_vectors_and_keeps_the_rewards_close(tiny_lm_dir: Path) -> None:
    fp32 = _scenario(str(tiny_lm_dir), shard=False)
    bf16 = _scenario(str(tiny_lm_dir), shard=False, storage=torch.bfloat16)
    vector_bytes = lambda r: r["state"]["vectors"].nbytes  # noqa: E731
    assert vector_bytes(bf16) * 2 == vector_bytes(fp32) and bf16["state"]["vectors"].dtype == torch.bfloat16
    for a, b in zip(fp32["steps"], bf16["steps"]):
        # Scores move by bf16's rounding of the stored vectors (8 bits of mantissa), never more.
        torch.testing.assert_close(b["scores"], a["scores"], atol=2e-2, rtol=0)
        assert (b["reward"] - a["reward"]).abs().max() <= 0.25


def _eval_case() -> tuple[RetrievalTask, torch.Tensor, torch.Tensor]:
    """60 documents (three exact copies of document 7: ties), 12 queries, graded qrels."""
    g = torch.Generator().manual_seed(3)
    docs = torch.nn.functional.normalize(torch.randn(60, 16, generator=g), dim=-1)
    docs[[20, 33, 59]] = docs[7].clone()
    queries = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    queries[0] = docs[7].clone()
    qrels = {f"q{i}": {f"d{(5 * i) % 60}": 1, f"d{(5 * i + 20) % 60}": 2} for i in range(12)}
    task = RetrievalTask(name="toy", split="test", corpus_path=Path("unused"), queries={q: q for q in qrels},
                         qrels=qrels, keep_docs=None, doc_ids=[f"d{i}" for i in range(60)], corpus_size=60)
    return task, docs, queries


def _eval_worker(rank: int, world: int, port: int, out: str) -> None:  # module level: spawn pickles it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task, docs, queries = _eval_case()
        # What each rank encoded: strided, and rank 1 repeats three of rank 0's documents (sampler padding).
        mine = list(range(rank, 60, 2)) + ([0, 2, 4] if rank == 1 else [])
        store = EmbeddingStore()
        store.add(("docs",), mine, docs[mine])
        idx, emb = owned_documents(store, ("docs",), 60, "toy documents")
        metrics, run = score_task(task, emb, queries, top_k=10, measures=["nDCG@10", "RR@10"], doc_indices=idx)
        # A corpus smaller than the world size: rank 1 encoded no document at all.
        one = RetrievalTask(name="one", split="test", corpus_path=Path("unused"), queries={"q0": "q0", "q1": "q1"},
                            qrels={"q0": {"d0": 1}, "q1": {"d0": 1}}, keep_docs=None, doc_ids=["d0"], corpus_size=1)
        small = EmbeddingStore()
        if rank == 0:
            small.add(("docs",), [0], docs[:1])
        small_idx, small_emb = owned_documents(small, ("docs",), 1, "one document")
        small_metrics, _ = score_task(one, small_emb, queries[:2], top_k=10, measures=["nDCG@10"], doc_indices=small_idx)
        torch.save({"held": idx.tolist(), "metrics": metrics, "run": run, "small": small_metrics,
                    "small_shape": tuple(small_emb.shape)},
                   Path(out) / f"eval-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_search_is_the_search_of_the_gathered_corpus(tmp_path: Path) -> None:
    task, docs, queries = _eval_case()
    metrics, run = score_task(task, docs, queries, top_k=10, measures=["nDCG@10", "RR@10"])
    mp.spawn(_eval_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"eval-rank{r}.pt", weights_only=False) for r in range(2)]
    # A document two ranks encoded is held once, by the lower rank; together they hold the corpus once.
    assert ranks[0]["held"] == list(range(0, 60, 2)) and ranks[1]["held"] == list(range(1, 60, 2))
    for r in ranks:  # every rank builds the same run, the one-process run (ties at document 7 included)
        assert r["run"] == run and r["metrics"] == metrics
    assert list(run["q0"])[:4] == ["d7", "d20", "d33", "d59"]
    assert ranks[0]["small"] == ranks[1]["small"] == {"nDCG@10": 1.0}  # a rank without documents takes part
    # ... holding no rows of the corpus's width (what a cache assembled from every rank's part needs)
    assert ranks[0]["small_shape"] == (1, 16) and ranks[1]["small_shape"] == (0, 16)
