"""``search-r3-compare``: gather several MLflow test runs into one table (rows = systems, columns = datasets).

    search-r3-compare                                  # every finished run of experiment "search-r3"
    search-r3-compare --runs RUN_ID RUN_ID --measure R@100 --out docs/compare.md

Each command run's rows are read back from its child runs (see ``evaluation/mlflow_runs.py``; runs
logged before child runs existed are read from their ``test/<dataset>/<system>/<measure>`` keys); a
system measured in several runs is shown once per run (the run name is added to its label), so
nothing is silently averaged or overwritten.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from search_r3.evaluation.mlflow_runs import PARENT_TAG, rows_from_child_runs
from search_r3.evaluation.report import ResultRow, markdown_table, print_table
from search_r3.common.errors import report_user_errors

_LEGACY_KEY = re.compile(r"^test/(?P<task>[^/]+)/(?P<system>[^/]+)/(?P<measure>[^/]+)$")


def _legacy_rows(run: Any, measure: str) -> list[ResultRow]:
    """Runs logged before child runs existed kept every row on the parent, keyed by system name."""
    rows = []
    params = run.data.params
    for metric, value in sorted(run.data.metrics.items()):
        m = _LEGACY_KEY.match(metric)
        if not m or m["measure"] != measure.replace("@", "_at_"):
            continue
        retriever, _, mode = m["system"].partition(".")
        docs = int(params.get(f"data/{m['task']}/num_docs", 0))
        rows.append(ResultRow(
            retriever=retriever, mode=mode or None, checkpoint=None, dataset=m["task"], split="test",
            metrics={measure: value}, num_queries=int(params.get(f"data/{m['task']}/num_queries", 0)),
            num_docs=docs, corpus_size=int(params.get(f"data/{m['task']}/corpus_size", docs)), command="",
            wall_time_s=0.0,
        ))
    return rows


def rows_from_runs(client: Any, runs: list, measure: str) -> list[ResultRow]:
    """The rows of each command run (its child runs), a system seen in several runs once per run."""
    per_run = []
    for run in runs:
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}'")
        per_run.append((run, rows_from_child_runs(children, measure) if children else _legacy_rows(run, measure)))
    seen: dict[str, set[str]] = {}
    for run, rows in per_run:
        for row in rows:
            seen.setdefault(row.label, set()).add(run.info.run_id)
    out = []
    for run, rows in per_run:
        for row in sorted(rows, key=lambda r: (r.label, r.dataset)):
            if len(seen[row.label]) > 1:
                row.retriever = f"{row.retriever} ({run.info.run_name or run.info.run_id[:8]})"
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    report_user_errors(lambda: _main(argv), "search-r3-compare")


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="search-r3-compare", description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="search-r3")
    parser.add_argument("--runs", nargs="*", help="run ids (default: every finished run of the experiment)")
    parser.add_argument("--measure", default="nDCG@10")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    if args.runs:
        runs = [client.get_run(r) for r in args.runs]
    else:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            raise SystemExit(f"no experiment {args.experiment!r} in {args.tracking_uri}")
        runs = [r for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                              order_by=["attributes.start_time ASC"])
                if PARENT_TAG not in r.data.tags]  # command runs; their rows are child runs
    rows = rows_from_runs(client, runs, args.measure)
    if not rows:
        raise SystemExit(f"no test/<dataset>/<system>/{args.measure} metrics in the selected runs")
    print_table(rows, args.measure)
    if args.out:
        Path(args.out).write_text(f"## {args.measure}\n\n{markdown_table(rows, args.measure)}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
