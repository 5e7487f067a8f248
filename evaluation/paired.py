"""``search-r3-paired``: is system A better than system B on the same queries, or is it noise?

    search-r3-paired --qrels ../shared/data/beir/scifact/qrels/test.tsv \\
        runs/eval/<stamp>/run.scifact.smollm2-rl.reasoning.trec runs/eval/<stamp>/run.scifact.smollm2-rl.direct.trec

Reads two TREC run files (the ones ``search-r3 test`` writes under ``runs/eval/``), scores each judged
query with ir-measures, and reports the mean per-query difference A - B, its standard error, a paired
t-test (scipy) and wins/ties/losses. Mean differences of a few hundredths on 100 queries are common
between identical systems with different seeds; this is the check before calling one of them better.
Only judged queries ranked by the runs count: a run made with ``max_queries`` covers a subset, and
both runs must cover the same one, since comparing means over different queries is meaningless.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import ir_measures

from search_r3.datamodules.beir_files import ReadReport, read_qrels
from search_r3.evaluation.metrics import Qrels, Run, per_query


@dataclass
class PairedComparison:
    measure: str
    num_queries: int
    mean_a: float
    mean_b: float
    mean_difference: float  # A - B
    standard_error: float
    t_statistic: float
    p_value: float  # two-sided paired t-test
    wins: int  # queries where A > B
    ties: int
    losses: int


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run file {path} does not exist")
    run: dict[str, dict[str, float]] = {}
    for r in ir_measures.read_trec_run(str(path)):
        run.setdefault(r.query_id, {})[r.doc_id] = float(r.score)
    if not run:
        raise ValueError(f"run file {path} has no rankings")
    return run


def paired_comparison(qrels: Qrels, run_a: Run, run_b: Run, measure: str = "nDCG@10") -> PairedComparison:
    """Per-query ``measure`` of A and B over the judged queries both runs rank."""
    from scipy.stats import ttest_rel

    judged_a = {q for q in run_a if q in qrels}
    judged_b = {q for q in run_b if q in qrels}
    if judged_a != judged_b:
        only_a, only_b = sorted(judged_a - judged_b), sorted(judged_b - judged_a)
        raise ValueError(f"the runs rank different judged queries ({len(only_a)} only in A, e.g. {only_a[:3]}; "
                         f"{len(only_b)} only in B, e.g. {only_b[:3]}): a paired comparison needs the same ones")
    if len(judged_a) < 2:
        raise ValueError(f"{len(judged_a)} judged queries in common: a paired comparison needs at least 2")
    subset = {q: qrels[q] for q in sorted(judged_a)}
    scores_a, scores_b = per_query(subset, run_a, [measure]), per_query(subset, run_b, [measure])
    a = [scores_a.get(q, {}).get(measure, 0.0) for q in subset]
    b = [scores_b.get(q, {}).get(measure, 0.0) for q in subset]
    diff = [x - y for x, y in zip(a, b)]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1))
    if sd == 0.0:  # identical per-query scores: the t-test is undefined, and there is no difference
        t, p = 0.0, 1.0
    else:
        res = ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    return PairedComparison(
        measure=measure, num_queries=n, mean_a=sum(a) / n, mean_b=sum(b) / n, mean_difference=mean,
        standard_error=sd / math.sqrt(n), t_statistic=t, p_value=p,
        wins=sum(d > 0 for d in diff), ties=sum(d == 0 for d in diff), losses=sum(d < 0 for d in diff),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="search-r3-paired", description=__doc__.split("\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--qrels", required=True, help="a BEIR qrels file (qrels/<split>.tsv)")
    parser.add_argument("--measure", default="nDCG@10")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    qrels, _ = read_qrels(Path(args.qrels), ReadReport(), "error")
    res = paired_comparison(qrels, read_run(args.run_a), read_run(args.run_b), args.measure)
    if args.json:
        print(json.dumps(asdict(res), indent=2))
        return
    print(f"{res.measure} over {res.num_queries} queries: A {res.mean_a:.4f}, B {res.mean_b:.4f}, "
          f"A - B {res.mean_difference:+.4f} (standard error {res.standard_error:.4f}); "
          f"paired t = {res.t_statistic:.2f}, p = {res.p_value:.3f}; A wins {res.wins}, ties {res.ties}, "
          f"loses {res.losses}")


if __name__ == "__main__":
    main()
