"""Greedy analyses of committed adapters on the same test queries, as a markdown table to read and judge.

    python scripts/quote_analyses.py --adapter checkpoints/smollm2-rl-default-cpu \
        --adapter checkpoints/smollm2-rl-direct-baseline-cpu --dataset beir/scifact --queries 20

Queries are the first ``--queries`` judged queries of the split, in the order of its qrels file (the same for every
adapter), generated greedily with the table's settings (32 analysis tokens), so what is quoted is what the
reasoning-mode rows of a table encode. Each row carries the analysis measures
(``search_r3.model.analysis_measures``); the judgement of whether an analysis analyses the query is the
reader's, written beside the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search_r3.datamodules.beir import BEIRDataModule
from search_r3.model.embedding_lm import EmbeddingLM


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", action="append", required=True, help="an adapter folder (repeatable)")
    parser.add_argument("--dataset", default="beir/scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--max-reasoning-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    dm = BEIRDataModule(datasets=[args.dataset], split=args.split, max_queries=args.queries)
    dm.setup("test")
    task = dm.tasks[0]
    queries = list(task.queries.values())[: args.queries]
    for adapter in args.adapter:
        model = EmbeddingLM(adapter=adapter, max_reasoning_tokens=args.max_reasoning_tokens, show_progress=False)
        _, records = model.reasoner.encode(queries)
        print(f"\n**{Path(adapter).name}** ({args.dataset} {args.split}, first {len(queries)} queries, greedy, "
              f"{args.max_reasoning_tokens} tokens)\n")
        print("| # | query | analysis | tokens | empty | capped | copies query | opens with closing words |")
        print("|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(records, 1):
            m = r.measures
            flags = [m.empty, m.capped, m.copies_query, m.begins_with_closing] if m else [r.tokens == 0, r.appended, "", ""]
            print(f"| {i} | {_cell(r.query)} | {_cell(r.analysis)} | {r.tokens} | "
                  + " | ".join("yes" if f is True else "" if f is False else str(f) for f in flags) + " |")


if __name__ == "__main__":
    main()
