"""``search-r3-compare``: gather several MLflow test runs into one table (rows = systems, columns = datasets).

    search-r3-compare                                  # every finished run of experiment "search-r3"
    search-r3-compare --runs RUN_ID RUN_ID --measure R@100 --out docs/compare.md

Metrics are read back from the ``test/<dataset>/<retriever>[.<mode>]/<measure>`` keys that
``RetrievalEvalModule`` logs; a system measured in several runs is shown once per run (the run name
is added to its label), so nothing is silently averaged or overwritten.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from search_r3.evaluation.report import ResultRow, markdown_table, print_table
from search_r3.model.errors import report_user_errors

_KEY = re.compile(r"^test/(?P<task>[^/]+)/(?P<system>[^/]+)/(?P<measure>[^/]+)$")


def rows_from_runs(runs: list, measure: str) -> list[ResultRow]:
    key = measure.replace("@", "_at_")
    runs_per_system: dict[str, set[str]] = {}
    for run in runs:
        for metric in run.data.metrics:
            m = _KEY.match(metric)
            if m and m["measure"] == key:
                runs_per_system.setdefault(m["system"], set()).add(run.info.run_id)
    rows: list[ResultRow] = []
    for run in runs:
        for metric, value in sorted(run.data.metrics.items()):
            m = _KEY.match(metric)
            if not m or m["measure"] != key:
                continue
            retriever, _, mode = m["system"].partition(".")
            params = run.data.params
            docs = int(params.get(f"data/{m['task']}/num_docs", 0))
            rows.append(ResultRow(
                retriever=retriever if len(runs_per_system[m["system"]]) == 1
                else f"{retriever} ({run.info.run_name or run.info.run_id[:8]})",
                mode=mode or None, checkpoint=None, dataset=m["task"], split="test", metrics={measure: value},
                num_queries=int(params.get(f"data/{m['task']}/num_queries", 0)), num_docs=docs,
                corpus_size=int(params.get(f"data/{m['task']}/corpus_size", docs)), command="", wall_time_s=0.0,
            ))
    return rows


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
        runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time ASC"])
    rows = rows_from_runs(runs, args.measure)
    if not rows:
        raise SystemExit(f"no test/<dataset>/<system>/{args.measure} metrics in the selected runs")
    print_table(rows, args.measure)
    if args.out:
        Path(args.out).write_text(f"## {args.measure}\n\n{markdown_table(rows, args.measure)}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
