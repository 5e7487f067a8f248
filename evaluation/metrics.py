"""Retrieval metrics through ir-measures (pytrec_eval backend): the one metric path of the project.

Nothing here computes nDCG by hand: ir-measures gives trec_eval's definitions (linear gain, graded
relevance), the ones BEIR, MTEB and pyserini's regressions report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import ir_measures

DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@10", "R@100", "RR@10")

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def build_run(
    query_ids: list[str], doc_ids: list[str], scores: Iterable, indices: Iterable, ignore_identical_ids: bool = True
) -> dict[str, dict[str, float]]:
    """Turn top-k (scores, indices) rows into an ir-measures run.

    ``ignore_identical_ids`` drops a document whose id equals the query id, as BEIR's evaluator does
    by default (it matters for ArguAna/Quora, where queries are also corpus documents).
    """
    run: dict[str, dict[str, float]] = {}
    for qid, row_s, row_i in zip(query_ids, scores, indices):
        ranked = run.setdefault(qid, {})
        for s, i in zip(row_s.tolist(), row_i.tolist()):
            did = doc_ids[i]
            if ignore_identical_ids and did == qid:
                continue
            ranked[did] = float(s)
    return run


def evaluate_run(qrels: Qrels, run: Run, measures: Iterable[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure over the judged queries. Every judged query must be in the run: a query
    missing from a run would silently drop out of pytrec_eval's mean and inflate it."""
    missing = [q for q in qrels if q not in run]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no ranking (e.g. {missing[:3]})")
    parsed = [ir_measures.parse_measure(m) for m in measures]
    qrels_in = {q: dict(d) for q, d in qrels.items()}
    run_in = {q: dict(d) for q, d in run.items() if q in qrels}
    agg = ir_measures.calc_aggregate(parsed, qrels_in, run_in)
    return {str(m): float(agg[m]) for m in parsed}


def per_query(qrels: Qrels, run: Run, measures: Iterable[str] = DEFAULT_MEASURES) -> dict[str, dict[str, float]]:
    parsed = [ir_measures.parse_measure(m) for m in measures]
    out: dict[str, dict[str, float]] = {}
    for m in ir_measures.iter_calc(parsed, {q: dict(d) for q, d in qrels.items()}, {q: dict(d) for q, d in run.items()}):
        out.setdefault(m.query_id, {})[str(m.measure)] = float(m.value)
    return out
