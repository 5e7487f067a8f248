"""The RL environment sharded over 2 processes against the replicated one, and reduced storage dtypes.

    python benchmarks/sharded_environment.py                       # SciFact test, 600 documents, 32 queries
    python benchmarks/sharded_environment.py --docs 300 --queries 16 --steps 2

Real vectors, synthetic drift: the documents and queries of SciFact test are embedded once by the
committed Stage-1 adapter (direct mode, dtype auto); a "training step" then moves every document vector
by a fixed, seeded amount (``--drift``) instead of by an optimizer, and each query stands for a group of
``--group`` rollouts (its embedding plus seeded noise). That is all the environment sees of a model
(``encoder(texts) -> vectors``), and it keeps the measurement about the environment: search, merge,
refresh and reward, not the model. The corpus holds the judged documents of the chosen queries plus the
first documents of the corpus.

Runs (each ``--steps`` steps of refresh + reward): one process, replicated, float32 (the reference);
two gloo processes, sharded, float32; one process with bfloat16 and float16 storage. Writes the
``environment`` section of ``benchmarks/results/scale.json``: per-rank vector bytes (2 processes vs 1),
the largest reward difference sharded vs replicated (float32: the target is 0), and per storage dtype
its bytes, reward differences and nDCG@10 of the final step's queries against the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_r3.datamodules.beir_files import ReadReport, find_file, iter_corpus, read_qrels, read_queries  # noqa: E402
from search_r3.datamodules.sources import resolve_beir  # noqa: E402
from search_r3.environment import RefreshPolicy, RetrievalEnvironment  # noqa: E402
from search_r3.evaluation.metrics import build_run, evaluate_run  # noqa: E402

from scale_results import add_common_args, provenance, write_section  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--docs", type=int, default=600)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--drift", type=float, default=0.05, help="norm of the seeded move per step, before renormalising")
    p.add_argument("--dtype", default="auto")
    return p.parse_args()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def embed(args: argparse.Namespace, work: Path) -> dict:
    """Documents, queries and qrels of the subset, embedded once (the only model work of the benchmark)."""
    from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

    folder = resolve_beir(args.dataset, split="test")
    qrels, _ = read_qrels(find_file(folder / "qrels", "test.tsv"), ReadReport(), "error")
    texts, _ = read_queries(find_file(folder, "queries.jsonl"), set(qrels), ReadReport(), "error")
    query_ids = [q for q in texts if q in qrels][: args.queries]
    wanted = {d for q in query_ids for d, rel in qrels[q].items() if rel > 0}
    corpus = {doc_id: text for _, doc_id, text in iter_corpus(find_file(folder, "corpus.jsonl"))}
    doc_ids = [d for d in corpus if d in wanted] + [d for d in corpus if d not in wanted][: args.docs - len(wanted)]
    model = EmbeddingLM(adapter=args.adapter, lora=LoraSettings(dropout=0.0), dtype=args.dtype, show_progress=True)
    data = {"doc_ids": doc_ids, "query_ids": query_ids,
            "qrels": {q: {d: r for d, r in qrels[q].items() if d in set(doc_ids)} for q in query_ids},
            "docs": model.encode_documents([corpus[d] for d in doc_ids]).float().cpu(),
            "queries": model.encode_queries([texts[q] for q in query_ids]).float().cpu(),
            "dtype": str(model.lm.dtype)}
    torch.save(data, work / "embedded.pt")
    return data


def scenario(data: dict, args: argparse.Namespace, shard: bool, storage: torch.dtype) -> dict:
    """``--steps`` RL-like steps on this rank's share of the queries; rewards and final top-10 per row."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    position = {str(i): i for i in range(len(data["doc_ids"]))}
    versions = [data["docs"]]
    for step in range(1, args.steps + 1):
        g = torch.Generator().manual_seed(step)
        versions.append(_unit(versions[-1] + args.drift * _unit(torch.randn(versions[-1].shape, generator=g))))
    env: RetrievalEnvironment | None = None

    def encoder(texts: list[str]) -> torch.Tensor:  # the model at the environment's current version
        return versions[env.step][[position[t] for t in texts]]

    env = RetrievalEnvironment([str(i) for i in range(len(data["doc_ids"]))], encoder,
                               RefreshPolicy(top_l=20, settle_rounds=1), doc_ids=data["doc_ids"], shard=shard,
                               storage_dtype=storage)
    env.full_refresh()
    n = len(data["query_ids"])
    mine = range(rank * n // world, (rank + 1) * n // world)
    positives = [env.positions([d for d, r in data["qrels"][data["query_ids"][i]].items() if r > 0]) for i in mine]
    rewards, search_seconds = [], []
    for step in range(1, args.steps + 1):
        env.set_step(step)
        g = torch.Generator().manual_seed(1000 + step)
        noise = torch.randn((n, args.group, data["queries"].shape[1]), generator=g)[list(mine)]
        rollouts = _unit(data["queries"][list(mine)].unsqueeze(1) + 0.02 * noise).flatten(0, 1)
        groups = [p for p in positives for _ in range(args.group)]
        env.step_refresh(rollouts, groups)
        rewards.append(env.reward(rollouts, groups, k=10))
        start = time.perf_counter()
        scores, top = env.search(data["queries"][list(mine)], 10)
        search_seconds.append(time.perf_counter() - start)
    return {"rewards": torch.stack(rewards), "scores": scores, "top": top, "vector_bytes": env.vector_bytes(),
            "search_seconds": search_seconds}


def _worker(rank: int, world: int, port: int, work: str, args: argparse.Namespace) -> None:  # spawn pickles it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = torch.load(Path(work) / "embedded.pt", weights_only=False)
        torch.save(scenario(data, args, shard=True, storage=torch.float32), Path(work) / f"sharded-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ndcg(data: dict, result: dict) -> float:
    run = build_run(data["query_ids"], data["doc_ids"], result["scores"], result["top"])
    return evaluate_run(data["qrels"], run, ["nDCG@10"])["nDCG@10"]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = embed(args, work)
        reference = scenario(data, args, shard=False, storage=torch.float32)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(2, port, str(work), args), nprocs=2, join=True)
        ranks = [torch.load(work / f"sharded-rank{r}.pt", weights_only=False) for r in range(2)]
    sharded = {"rewards": torch.cat([r["rewards"] for r in ranks], dim=1),
               "scores": torch.cat([r["scores"] for r in ranks]), "top": torch.cat([r["top"] for r in ranks])}
    storage = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        result = reference if dtype == torch.float32 else scenario(data, args, shard=False, storage=dtype)
        diff = (result["rewards"] - reference["rewards"]).abs()
        storage[name] = {"vector_bytes": result["vector_bytes"], "max_reward_diff": float(diff.max()),
                         "mean_reward_diff": float(diff.mean()), "ndcg@10": ndcg(data, result),
                         "top10_identical_share": float((result["top"] == reference["top"]).all(1).float().mean())}
    section = {
        **provenance(" ".join(["python benchmarks/sharded_environment.py", *sys.argv[1:]]),
                     embedding_dtype=data["dtype"]),
        "documents": len(data["doc_ids"]), "queries": len(data["query_ids"]), "group": args.group,
        "steps": args.steps, "drift": args.drift,
        "vector_bytes_per_rank": {"replicated_1proc": reference["vector_bytes"],
                                  "sharded_2proc": [r["vector_bytes"] for r in ranks]},
        "env_vector_bytes_per_rank_ratio_2proc": max(r["vector_bytes"] for r in ranks) / reference["vector_bytes"],
        "sharded_vs_replicated_max_reward_diff": float((sharded["rewards"] - reference["rewards"]).abs().max()),
        "sharded_vs_replicated_identical_top10": bool(torch.equal(sharded["top"], reference["top"])),
        "search_median_seconds": {"replicated_1proc": statistics.median(reference["search_seconds"]),
                                  "sharded_2proc_rank0": statistics.median(ranks[0]["search_seconds"])},
        "storage_dtype": storage,
    }
    out = write_section(args.out, "environment", section)
    print(json.dumps({k: section[k] for k in ("env_vector_bytes_per_rank_ratio_2proc",
                                              "sharded_vs_replicated_max_reward_diff", "storage_dtype")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
