"""What Stage 2 costs as it scales: batched rollouts against one decode per query.

    python benchmarks/scale.py                      # SmolLM2 + the committed Stage-1 adapter, dtype auto
    python benchmarks/scale.py --queries 8 --group 4 --max-new-tokens 32 --repeats 3

GRPO samples G copies of each query of a step. Before the batched loop (``model/sampling.py``), each query
was decoded alone so that its rollouts would not depend on the batch; now a rank's queries and copies
decode together, every row from its own random stream. This times both on the same rows (SciFact train
queries, the same per-row seeds, so both sample identical tokens, which is checked) and reports the median
of interleaved repetitions and their ratio, ``rollout_speedup_batched``. Writes the ``rollouts`` section of
``benchmarks/results/scale.json`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_r3.datamodules.beir_files import ReadReport, find_file, read_qrels, read_queries  # noqa: E402
from search_r3.datamodules.sources import resolve_beir  # noqa: E402
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings  # noqa: E402

from scale_results import add_common_args, provenance, write_section  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    folder = resolve_beir(args.dataset, split="train")
    train, _ = read_qrels(find_file(folder / "qrels", "train.tsv"), ReadReport(), "error")
    texts, _ = read_queries(find_file(folder, "queries.jsonl"), set(train), ReadReport(), "error")
    queries = list(texts.values())[: args.queries]
    model = EmbeddingLM(adapter=args.adapter, lora=LoraSettings(dropout=0.0), dtype=args.dtype, show_progress=False)
    seeds = {q: [hash((i, c)) % (2**62) for c in range(args.group)] for i, q in enumerate(queries)}

    def sample(batch: list[str]) -> list[list[int]]:
        return model.reasoner.generate(batch, max_new_tokens=args.max_new_tokens, do_sample=True, copies=args.group,
                                       seeds=[s for q in batch for s in seeds[q]]).responses

    sample(queries[:1])  # warm-up
    times: dict[str, list[float]] = {"per_query": [], "batched": []}
    rows: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
        start = time.perf_counter()
        rows["per_query"] = [r for q in queries for r in sample([q])]
        times["per_query"].append(time.perf_counter() - start)
        start = time.perf_counter()
        rows["batched"] = sample(queries)
        times["batched"].append(time.perf_counter() - start)
    tokens = sum(len(r) for r in rows["batched"])
    medians = {k: statistics.median(v) for k, v in times.items()}
    section = {
        **provenance(" ".join(["python benchmarks/scale.py", *sys.argv[1:]]), dtype=str(model.lm.dtype)),
        "queries": len(queries), "group": args.group, "max_new_tokens": args.max_new_tokens,
        # fp32: identical; bf16: a row can change where the batch's kernel shapes round a logit differently
        "sampled_tokens": tokens, "identical_rows": rows["batched"] == rows["per_query"],
        "identical_row_share": sum(a == b for a, b in zip(rows["batched"], rows["per_query"])) / len(rows["batched"]),
        "seconds": times, "median_seconds": medians,
        "rollout_speedup_batched": medians["per_query"] / medians["batched"],
    }
    out = write_section(args.out, "rollouts", section)
    print(f"per query {medians['per_query']:.1f} s, batched {medians['batched']:.1f} s: "
          f"{section['rollout_speedup_batched']:.2f}x ({tokens} tokens, identical rows: {section['identical_rows']}); "
          f"wrote {out}")


if __name__ == "__main__":
    main()
