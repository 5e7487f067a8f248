"""Where reasoning helps or hurts, per query: reasoning − direct nDCG@10 of one adapter, broken down by
query length and by whether the greedy analysis was empty.

    python scripts/per_query_breakdown.py --grid runs/eval/<stamp> --system smollm2-rl-default --dataset scifact
    python scripts/per_query_breakdown.py --grid runs/eval/<stamp> --system smollm2-rl-default --dataset scifact \\
        --out docs/paired/scifact.smollm2-rl-default.breakdown.json

Reads what a table run (``search-r3 test`` with both modes) leaves in its output folder:
``run.<dataset>.<system>.{direct,reasoning}.trec`` and ``analyses.<dataset>.<system>.reasoning.jsonl``
(one line per query: id, text, analysis, its length in tokens), and the split's qrels. Query length is
counted in words and split at its tertiles over the evaluated queries (so each length group holds about
a third of them); the groups and their bounds are printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from search_r3.datamodules.beir_files import ReadReport, find_file, read_qrels
from search_r3.datamodules.sources import resolve_beir
from search_r3.evaluation.metrics import per_query
from search_r3.evaluation.paired import grid_run_file, read_run
from search_r3.evaluation.run_files import read_provenance


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=Path, required=True, help="the runs/eval/<stamp> folder of the table")
    p.add_argument("--system", required=True, help="retriever name, e.g. smollm2-rl-default")
    p.add_argument("--dataset", required=True, help="dataset name in the run files, e.g. scifact")
    p.add_argument("--measure", default="nDCG@10")
    p.add_argument("--data-root", default=None, help="where BEIR folders are looked for first")
    p.add_argument("--out", type=Path, default=None, help="write the breakdown as JSON here")
    return p.parse_args(argv)


def breakdown(per_query_direct: dict[str, float], per_query_reasoning: dict[str, float],
              analyses: dict[str, dict]) -> dict:
    """Groups (length tertile × empty or not, and each alone) with their counts and mean measures."""
    qids = sorted(analyses)
    words = {q: len(analyses[q]["query"].split()) for q in qids}
    lengths = sorted(words.values())
    low, high = lengths[len(lengths) // 3], lengths[2 * len(lengths) // 3]

    def length_group(q: str) -> str:
        return f"short (< {low} words)" if words[q] < low else (
            f"long (>= {high} words)" if words[q] >= high else f"medium ({low}-{high - 1} words)")

    def summary(members: list[str]) -> dict:
        if not members:
            return {"queries": 0}
        diffs = [per_query_reasoning[q] - per_query_direct[q] for q in members]
        return {"queries": len(members), "direct": statistics.fmean(per_query_direct[q] for q in members),
                "reasoning": statistics.fmean(per_query_reasoning[q] for q in members),
                "difference": statistics.fmean(diffs), "wins": sum(d > 0 for d in diffs),
                "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}

    empty = {q: analyses[q]["analysis_tokens"] == 0 for q in qids}
    groups: dict[str, list[str]] = {"all": qids}
    for name in ("empty analysis", "non-empty analysis"):
        groups[name] = [q for q in qids if empty[q] == (name == "empty analysis")]
    for name in sorted({length_group(q) for q in qids}, key=lambda g: ("short", "medium", "long").index(g.split()[0])):
        groups[name] = [q for q in qids if length_group(q) == name]
        for analysis in ("empty analysis", "non-empty analysis"):
            groups[f"{name}, {analysis}"] = [q for q in groups[name] if empty[q] == (analysis == "empty analysis")]
    return {"length_tertile_bounds_words": [low, high], "groups": {g: summary(m) for g, m in groups.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = {mode: grid_run_file(args.grid, args.dataset, args.system, mode) for mode in ("direct", "reasoning")}
    provenance = read_provenance(runs["reasoning"])
    split = provenance.split if provenance is not None else "test"
    qrels_path = find_file(resolve_beir(args.dataset, args.data_root, split) / "qrels", f"{split}.tsv")
    qrels, _ = read_qrels(qrels_path, ReadReport(), "error")
    analyses_path = args.grid / f"analyses.{args.dataset}.{args.system}.reasoning.jsonl"
    analyses = {row["query_id"]: row for row in map(json.loads, analyses_path.read_text().splitlines())}
    qrels = {q: qrels[q] for q in analyses}
    scores = {mode: {q: m[args.measure] for q, m in per_query(qrels, read_run(path), [args.measure]).items()}
              for mode, path in runs.items()}
    for mode in scores:  # a judged query the run does not rank scores 0, as in trec_eval's mean
        scores[mode] = {q: scores[mode].get(q, 0.0) for q in analyses}
    result = {"system": args.system, "dataset": args.dataset, "split": split, "measure": args.measure,
              "runs": {m: str(p) for m, p in runs.items()}, "analyses": str(analyses_path),
              **breakdown(scores["direct"], scores["reasoning"], analyses)}
    print(f"{args.system} on {args.dataset} {split}: {args.measure}, reasoning − direct, per query")
    print("| group | queries | direct | reasoning | difference | wins/ties/losses |")
    print("|---|---|---|---|---|---|")
    for name, g in result["groups"].items():
        if g["queries"]:
            print(f"| {name} | {g['queries']} | {g['direct']:.4f} | {g['reasoning']:.4f} | {g['difference']:+.4f} "
                  f"| {g['wins']}/{g['ties']}/{g['losses']} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
