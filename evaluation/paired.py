"""``search-r3-paired``: is system A better than system B on the same queries, or is it noise?

    search-r3-paired --qrels ../shared/data/beir/scifact/qrels/test.tsv \\
        runs/eval/<stamp>/run.scifact.smollm2-rl.reasoning.trec runs/eval/<stamp>/run.scifact.smollm2-rl.direct.trec

Reads two TREC run files (the ones ``search-r3 test`` writes under ``runs/eval/``), scores each query
with ir-measures, and reports the mean per-query difference A - B, its standard error, a paired t-test
(scipy) and wins/ties/losses. Mean differences of a few hundredths on 100 queries are common between
identical systems with different seeds; this is the check before calling one of them better.

Which queries count: the run's recorded query set (its ``.meta.json`` sidecar, see
:mod:`~search_r3.evaluation.run_files`) or, for a run file without one, every judged query of the
qrels. A query the run file has no line for (no hit) scores 0, exactly as the results table counts it,
and the number of such queries is printed. Two runs over different corpora (digest, cap) or query sets
are refused unless ``--force``: their difference would not be the systems' difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import ir_measures

from search_r3.datamodules.beir_files import DataFormatError, ReadReport, read_qrels
from search_r3.evaluation.metrics import Qrels, Run, per_query
from search_r3.evaluation.run_files import RunProvenance, read_provenance
from search_r3.model.errors import report_user_errors


@dataclass
class PairedComparison:
    measure: str
    num_queries: int
    missing_a: int  # scored queries with no line in run A (counted as 0)
    missing_b: int
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
        raise DataFormatError(f"run file {path} does not exist")
    run: dict[str, dict[str, float]] = {}
    try:
        for r in ir_measures.read_trec_run(str(path)):
            run.setdefault(r.query_id, {})[r.doc_id] = float(r.score)
    except (ValueError, IndexError) as err:
        raise DataFormatError(f"{path}: not a TREC run file (qid Q0 docid rank score tag): {err}") from err
    if not run:
        raise DataFormatError(f"run file {path} has no rankings")
    return run


def scored_queries(qrels: Qrels, provenance: RunProvenance | None) -> list[str]:
    """The queries a run is scored over: its recorded query set (judged ones), else all judged queries."""
    if provenance is None:
        return sorted(qrels)
    unjudged = [q for q in provenance.query_ids if q not in qrels]
    if unjudged:
        raise DataFormatError(f"{len(unjudged)} queries of the run (e.g. {unjudged[:3]}) are not in these qrels: "
                              f"is --qrels the split the run was made on ({provenance.split})?")
    return sorted(provenance.query_ids)


def check_comparable(a: RunProvenance | None, b: RunProvenance | None, force: bool = False) -> list[str]:
    """Reasons the two runs are not over the same corpus and queries; raises unless ``force``."""
    if a is None or b is None:
        return ["a run file has no .meta.json sidecar: its corpus and query set are unknown"]
    reasons = []
    if (a.dataset, a.corpus_digest, a.corpus_documents) != (b.dataset, b.corpus_digest, b.corpus_documents):
        reasons.append(f"different corpora: A = {a.describe()}; B = {b.describe()}")
    if a.query_digest != b.query_digest:
        reasons.append(f"different query sets: A {len(a.query_ids)} queries, B {len(b.query_ids)} (digests "
                       f"{a.query_digest} vs {b.query_digest})")
    if reasons and not force:
        raise DataFormatError("; ".join(reasons) + ": their difference is not the systems' difference (--force "
                              "pairs them anyway)")
    return reasons


def paired_comparison(qrels: Qrels, run_a: Run, run_b: Run, measure: str = "nDCG@10",
                      queries: list[str] | None = None) -> PairedComparison:
    """Per-query ``measure`` of A and B over ``queries`` (default: every judged query); a query a run
    does not rank scores 0, as in the results table."""
    from scipy.stats import ttest_rel

    queries = sorted(qrels) if queries is None else queries
    if len(queries) < 2:
        raise DataFormatError(f"{len(queries)} queries to compare: a paired comparison needs at least 2")
    subset = {q: qrels[q] for q in queries}
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
        measure=measure, num_queries=n, missing_a=sum(not run_a.get(q) for q in subset),
        missing_b=sum(not run_b.get(q) for q in subset), mean_a=sum(a) / n, mean_b=sum(b) / n,
        mean_difference=mean, standard_error=sd / math.sqrt(n), t_statistic=t, p_value=p,
        wins=sum(d > 0 for d in diff), ties=sum(d == 0 for d in diff), losses=sum(d < 0 for d in diff),
    )


def main(argv: list[str] | None = None) -> None:
    report_user_errors(lambda: _main(argv), "search-r3-paired")


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="search-r3-paired", description=__doc__.split("\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--qrels", required=True, help="a BEIR qrels file (qrels/<split>.tsv)")
    parser.add_argument("--measure", default="nDCG@10")
    parser.add_argument("--force", action="store_true", help="pair runs over different corpora or query sets")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    qrels, _ = read_qrels(Path(args.qrels), ReadReport(), "error")
    meta_a, meta_b = read_provenance(args.run_a), read_provenance(args.run_b)
    for reason in check_comparable(meta_a, meta_b, args.force):
        print(f"warning: {reason}", file=sys.stderr)
    queries_a, queries_b = scored_queries(qrels, meta_a), scored_queries(qrels, meta_b)
    if queries_a != queries_b and not args.force:
        raise DataFormatError(f"the runs were made for different queries ({len(queries_a)} vs {len(queries_b)}); "
                              f"--force pairs them over the qrels' judged queries")
    queries = queries_a if queries_a == queries_b else sorted(qrels)
    res = paired_comparison(qrels, read_run(args.run_a), read_run(args.run_b), args.measure, queries)
    if args.json:
        print(json.dumps(asdict(res), indent=2))
        return
    print(f"{res.measure} over {res.num_queries} queries (no ranking, counted as 0: A {res.missing_a}, "
          f"B {res.missing_b}): A {res.mean_a:.4f}, B {res.mean_b:.4f}, "
          f"A - B {res.mean_difference:+.4f} (standard error {res.standard_error:.4f}); "
          f"paired t = {res.t_statistic:.2f}, p = {res.p_value:.3f}; A wins {res.wins}, ties {res.ties}, "
          f"loses {res.losses}")


if __name__ == "__main__":
    main()
