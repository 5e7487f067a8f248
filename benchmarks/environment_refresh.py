"""Selective local refresh vs full re-encoding of the RL environment, measured in one run.

What it simulates: K training updates of the real model (SmolLM2 + LoRA, optionally starting from the
Stage-1 adapter), each a real AdamW step on the LoRA weights and the embed-token row with InfoNCE
(in-batch negatives) on a batch of B SciFact *train* queries and their positives. After every update
two copies of the index are brought up to date:

* **selective** - ``RetrievalEnvironment.step_refresh``: re-encode the batch queries' top-L and their
  positives (the policy the RL stage uses; the "rollouts" here are the batch's direct-mode query
  embeddings, one per query, since sampling reasoning on 2 CPU cores would dominate the run);
* **full** - re-encode every document with the current weights (the reference).

Per step it records documents encoded and wall time of each, the batch queries' reward (nDCG@10 over
the index) and top-10 overlap between the two indexes, and on held-out *test* queries the environment's
fidelity probe (top-10 overlap and Kendall tau, stale selective index vs fresh). Medians and ratios
come from the same run, so machine noise hits both arms alike. Extra selective policies (``--arm``) are
measured in the same run against the same full arm, so policies compare on identical updates.

    python benchmarks/environment_refresh.py                       # defaults below, CPU
    python benchmarks/environment_refresh.py --adapter runs/sft/adapter/best --steps 8 --index hnsw
    python benchmarks/environment_refresh.py --max-corpus-docs 600 --steps 2 --arm 20:2:0 --arm 30:0:0
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from search_r3.datamodules.beir import BEIRDataModule  # noqa: E402
from search_r3.environment import ExactIndex, HNSWIndex, RefreshPolicy, RetrievalEnvironment  # noqa: E402
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings  # noqa: E402
from search_r3.lightning_modules.losses import info_nce_loss  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--dataset", default="beir/scifact")
    p.add_argument("--max-corpus-docs", type=int, default=None, help="cap the corpus (judged documents kept)")
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=None, help="start from this Stage-1 adapter (default: a fresh LoRA)")
    p.add_argument("--max-document-tokens", type=int, default=32,
                   help="document truncation; small so the full-refresh arm fits a CPU run")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-queries", type=int, default=8)
    p.add_argument("--top-l", type=int, default=20)
    p.add_argument("--neighbours", type=int, default=0)
    p.add_argument("--settle-rounds", type=int, default=0)
    p.add_argument("--arm", action="append", default=[], metavar="TOP_L:SETTLE:NEIGHBOURS",
                   help="an extra selective policy measured in the same run against the same full arm "
                        "(repeatable), e.g. --arm 30:0:0 --arm 20:2:0")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--index", choices=["exact", "hnsw"], default="exact")
    p.add_argument("--probe-queries", type=int, default=100, help="held-out test queries for the fidelity probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "environment.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    folder = Path(args.data_root) / args.dataset
    train = BEIRDataModule(args.data_root, split="train", max_corpus_docs=args.max_corpus_docs).load_task(folder)
    probe = BEIRDataModule(args.data_root, split="test", max_queries=args.probe_queries).load_task(folder)
    texts = train.load_texts()
    model = EmbeddingLM(base_model=args.base_model, adapter=args.adapter, max_document_tokens=args.max_document_tokens,
                        lora=LoraSettings(r=16, alpha=32, dropout=0.0), show_progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)

    def make_index():
        return HNSWIndex() if args.index == "hnsw" else ExactIndex()

    specs = [(args.top_l, args.settle_rounds, args.neighbours)] + [parse_arm(a) for a in args.arm]
    arms = [RetrievalEnvironment(texts, model.encode_documents,
                                 RefreshPolicy(top_l=top_l, settle_rounds=settle, neighbours=near),
                                 make_index(), train.doc_ids) for top_l, settle, near in specs]
    selective = arms[0]
    full = RetrievalEnvironment(texts, model.encode_documents, RefreshPolicy(), ExactIndex(), train.doc_ids)
    print(f"corpus {len(texts)} documents ({args.max_document_tokens} tokens), {args.steps} steps of "
          f"{args.batch_queries} queries, top-L {args.top_l}, index {args.index}", flush=True)
    initial = selective.full_refresh()
    for env in [*arms[1:], full]:
        env.vectors, env.versions = selective.vectors.clone(), selective.versions.clone()
        env.index.reset(env.vectors)
    print(f"initial full encode: {initial.seconds:.1f} s", flush=True)

    query_ids = list(train.queries)
    order = torch.randperm(len(query_ids)).tolist()
    probe_texts = list(probe.queries.values())
    rows: list[list[dict]] = [[] for _ in arms]
    for step in range(1, args.steps + 1):
        batch = [query_ids[i] for i in order[(step - 1) * args.batch_queries: step * args.batch_queries]]
        pos_ids = [next(d for d, g in train.qrels[q].items() if g > 0) for q in batch]
        positions = selective.positions(pos_ids)
        t0 = time.perf_counter()
        q_emb = model.embed([train.queries[q] for q in batch], "query")
        d_emb = model.embed([texts[i] for i in positions], "document")
        loss = info_nce_loss(q_emb, d_emb, torch.arange(len(batch)), tau=args.tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_s = time.perf_counter() - t0
        for env in [*arms, full]:
            env.set_step(step)

        with model.inference():
            q_now = model.embed([train.queries[q] for q in batch], "query")
        positives = [selective.positions([d for d, g in train.qrels[q].items() if g > 0]) for q in batch]
        fresh = full.full_refresh()
        reward_full = full.reward(q_now, positives, k=10)
        _, top_full = full.search(q_now, 10)
        probe_q = model.encode_queries(probe_texts)
        for a, env in enumerate(arms):
            sel = env.step_refresh(q_now, positives)
            reward_sel = env.reward(q_now, positives, k=10)
            _, top_sel = env.search(q_now, 10)
            overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_sel, top_full)) / top_full.numel()
            # Held-out fidelity: the stale selective index against the fresh full one (no extra encode:
            # the full arm's vectors are exactly what the probe would compute).
            fidelity = env.fidelity_probe(probe_q, k=10, fresh=full.vectors)
            row = {
                "step": step, "loss": loss.item(), "update_seconds": update_s,
                "selective_docs": sel.reencoded, "selective_fraction": sel.fraction, "selective_seconds": sel.seconds,
                "full_docs": fresh.reencoded, "full_seconds": fresh.seconds,
                "reward_selective": float(reward_sel.mean()), "reward_full": float(reward_full.mean()),
                "top10_overlap_vs_full": overlap, "heldout_top10_overlap_vs_full": fidelity.top_overlap,
                "heldout_kendall_tau": fidelity.kendall_tau,
                "drift": sel.drift, "staleness_mean": sel.metrics()["env/staleness_mean"],
            }
            rows[a].append(row)
            print(f"step {step} [{arm_name(specs[a])}]: loss {row['loss']:.3f}  selective {sel.reencoded} docs "
                  f"{sel.seconds:.2f}s  full {fresh.reencoded} docs {fresh.seconds:.1f}s  reward sel "
                  f"{row['reward_selective']:.3f} full {row['reward_full']:.3f}  overlap {overlap:.3f}  held-out "
                  f"overlap {fidelity.top_overlap:.3f} tau {fidelity.kendall_tau:.3f}", flush=True)

    # The ANN back end against exact search on the final (real, full-corpus) vectors: the same interface,
    # so this is what the environment would return with `index: hnsw`.
    hnsw, exact = HNSWIndex(), ExactIndex()
    t0 = time.perf_counter()
    hnsw.reset(full.vectors)
    hnsw_build_s = time.perf_counter() - t0
    exact.reset(full.vectors)
    probe_q = model.encode_queries(probe_texts)
    (_, e_top), (_, h_top) = exact.search(probe_q, 10), hnsw.search(probe_q, 10)
    hnsw_recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(e_top, h_top)) / e_top.numel()
    summaries = [summarize(r, len(texts)) for r in rows]
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO)), *(argv if argv is not None else sys.argv[1:])]),
        "dataset": args.dataset, "corpus_size": len(texts), "max_document_tokens": args.max_document_tokens,
        "index": args.index, "adapter": args.adapter, "steps": args.steps, "batch_queries": args.batch_queries,
        "top_l": args.top_l, "settle_rounds": args.settle_rounds, "neighbours": args.neighbours, "lr": args.lr,
        "update": "AdamW step on LoRA + embed-token row, InfoNCE with in-batch negatives, direct mode",
        **summaries[0],
        "initial_full_encode_seconds": initial.seconds,
        "hnsw_recall_at_10_vs_exact": hnsw_recall, "hnsw_build_seconds": hnsw_build_s,
        "per_step": rows[0],
        "arms": [{"policy": arm_name(spec), "top_l": spec[0], "settle_rounds": spec[1], "neighbours": spec[2],
                  **summary, "per_step": r} for spec, summary, r in zip(specs, summaries, rows)],
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return result


def parse_arm(spec: str) -> tuple[int, int, int]:
    try:
        top_l, settle, near = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--arm {spec!r}: expected TOP_L:SETTLE:NEIGHBOURS, three integers such as 30:0:0") from None
    return top_l, settle, near


def arm_name(spec: tuple[int, int, int]) -> str:
    return f"top-L {spec[0]}, settle {spec[1]}, neighbours {spec[2]}"


def summarize(rows: list[dict], corpus_size: int) -> dict:
    """One arm's per-step rows as the JSON keys the issue asks for (means; medians for times)."""
    med, mean = statistics.median, statistics.mean
    return {
        "docs_reencoded_per_step": mean(r["selective_docs"] for r in rows),
        "refresh_fraction_per_step": mean(r["selective_fraction"] for r in rows),
        "selective_seconds_median": med(r["selective_seconds"] for r in rows),
        "full_seconds_median": med(r["full_seconds"] for r in rows),
        "step_speedup_vs_full": med(r["full_seconds"] for r in rows) / max(med(r["selective_seconds"] for r in rows), 1e-9),
        "docs_ratio_vs_full": corpus_size / max(mean(r["selective_docs"] for r in rows), 1e-9),
        "top10_overlap_vs_full": mean(r["top10_overlap_vs_full"] for r in rows),
        "heldout_top10_overlap_vs_full": mean(r["heldout_top10_overlap_vs_full"] for r in rows),
        "heldout_kendall_tau": mean(r["heldout_kendall_tau"] for r in rows),
        "reward_selective": mean(r["reward_selective"] for r in rows),
        "reward_full": mean(r["reward_full"] for r in rows),
    }


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"RL environment: selective vs full refresh ({r['dataset']}, {r['corpus_size']} docs, {r['steps']} steps)")
    for col in ("", "selective", "full", "ratio"):
        t.add_column(col)
    t.add_row("documents encoded / step", f"{r['docs_reencoded_per_step']:.1f} ({100 * r['refresh_fraction_per_step']:.2f}%)",
              str(r["corpus_size"]), f"{r['docs_ratio_vs_full']:.1f}x fewer")
    t.add_row("refresh wall time / step (median)", f"{r['selective_seconds_median']:.2f} s", f"{r['full_seconds_median']:.1f} s",
              f"{r['step_speedup_vs_full']:.1f}x faster")
    t.add_row("reward (nDCG@10, batch queries)", f"{r['reward_selective']:.4f}", f"{r['reward_full']:.4f}", "")
    t.add_row("top-10 overlap vs full, batch queries", f"{r['top10_overlap_vs_full']:.3f}", "1", "")
    t.add_row("top-10 overlap vs full, held-out queries", f"{r['heldout_top10_overlap_vs_full']:.3f}", "1", "")
    t.add_row("Kendall tau vs full, held-out queries", f"{r['heldout_kendall_tau']:.3f}", "1", "")
    t.add_row("HNSW recall@10 vs exact (final vectors)", f"{r['hnsw_recall_at_10_vs_exact']:.3f}", "", "")
    Console().print(t)
    if len(r["arms"]) > 1:
        a = Table(title="selective policies measured against the same full arm")
        for col in ("policy", "docs / step", "speedup", "top-10 overlap (batch)", "top-10 overlap (held-out)",
                    "Kendall tau (held-out)", "reward"):
            a.add_column(col)
        for arm in r["arms"]:
            a.add_row(arm["policy"], f"{arm['docs_reencoded_per_step']:.1f} ({100 * arm['refresh_fraction_per_step']:.2f}%)",
                      f"{arm['step_speedup_vs_full']:.1f}x", f"{arm['top10_overlap_vs_full']:.3f}",
                      f"{arm['heldout_top10_overlap_vs_full']:.3f}", f"{arm['heldout_kendall_tau']:.3f}",
                      f"{arm['reward_selective']:.4f}")
        Console().print(a)


if __name__ == "__main__":
    main()
