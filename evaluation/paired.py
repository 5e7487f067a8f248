"""``search-r3-paired``: is system A better than system B on the same queries, or is it noise?

    search-r3-paired --qrels ~/.cache/search_r3/data/beir/scifact/qrels/test.tsv \\
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

A two-adapter table (Stage 2 and Stage 1, each in direct and reasoning mode) asks for four tests per
dataset; ``--grid`` runs them all from the table's run directory, so no hand-typed path pairs the wrong
rows::

    search-r3-paired --grid runs/eval/<stamp> --system smollm2-rl-claim --baseline smollm2-sft-claim \
        --out docs/paired

reasoning vs direct under the system and under the baseline, and system vs baseline in each mode, for
every dataset the system has run files for; each lands as ``<out>/<dataset>.<A>-vs-<B>.json`` and one
markdown table line per test is printed for the docs. ``--baseline-runs`` reads the baseline from another
command's directory (an ablation table beside the claim table); the sidecars still guard the pairing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import ir_measures

from search_r3.datamodules.beir_files import DataFormatError, ReadReport, find_file, read_qrels
from search_r3.datamodules.sources import resolve_beir
from search_r3.evaluation.metrics import Qrels, Run, per_query
from search_r3.evaluation.run_files import RunProvenance, read_provenance
from search_r3.common.errors import report_user_errors


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


def compare_run_files(qrels_path: Path, run_a: str | Path, run_b: str | Path, measure: str = "nDCG@10",
                      force: bool = False) -> PairedComparison:
    """The paired comparison of two run files over the queries both were made for (their sidecars),
    refusing runs over different corpora or query sets unless ``force`` (then warning on stderr)."""
    qrels, _ = read_qrels(qrels_path, ReadReport(), "error")
    meta_a, meta_b = read_provenance(run_a), read_provenance(run_b)
    for reason in check_comparable(meta_a, meta_b, force):
        print(f"warning: {reason}", file=sys.stderr)
    queries_a, queries_b = scored_queries(qrels, meta_a), scored_queries(qrels, meta_b)
    if queries_a != queries_b and not force:
        raise DataFormatError(f"the runs were made for different queries ({len(queries_a)} vs {len(queries_b)}); "
                              f"--force pairs them over the qrels' judged queries")
    queries = queries_a if queries_a == queries_b else sorted(qrels)
    return paired_comparison(qrels, read_run(run_a), read_run(run_b), measure, queries)


def grid_run_file(directory: Path, dataset: str, system: str, mode: str) -> Path:
    path = directory / f"run.{dataset}.{system}.{mode}.trec"
    if not path.is_file():
        raise DataFormatError(f"{path} does not exist: was {system} scored on {dataset} in {mode} mode there?")
    return path


def grid_pairs(runs: Path, system: str, baseline: str, baseline_runs: Path | None = None
               ) -> list[tuple[str, str, Path, Path]]:
    """(dataset, test name, run A, run B) of every test a two-adapter table asks for, for each dataset
    ``system`` has run files for in ``runs`` (from the file names ``run.<dataset>.<system>.<mode>.trec``)."""
    base_dir = baseline_runs or runs
    datasets = sorted({p.name.split(".")[1] for p in runs.glob(f"run.*.{system}.*.trec")})
    if not datasets:
        raise DataFormatError(f"no run files of {system} in {runs} (run.<dataset>.{system}.<mode>.trec)")
    pairs = []
    for dataset in datasets:
        for name, directory in ((system, runs), (baseline, base_dir)):
            pairs.append((dataset, f"{name}.reasoning-vs-direct", grid_run_file(directory, dataset, name, "reasoning"),
                          grid_run_file(directory, dataset, name, "direct")))
        for mode in ("reasoning", "direct"):
            pairs.append((dataset, f"{mode}.{system}-vs-{baseline}", grid_run_file(runs, dataset, system, mode),
                          grid_run_file(base_dir, dataset, baseline, mode)))
    return pairs


def _markdown_line(name: str, res: PairedComparison) -> str:
    return (f"| {name} | {res.mean_a:.4f} | {res.mean_b:.4f} | {res.mean_difference:+.4f} ± {res.standard_error:.4f} "
            f"| {res.t_statistic:.2f} | {res.p_value:.3f} | {res.wins}/{res.ties}/{res.losses} | {res.num_queries} |")


def run_grid(args: argparse.Namespace) -> None:
    pairs = grid_pairs(args.grid, args.system, args.baseline, args.baseline_runs)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"| {args.measure}: A vs B | A | B | A − B ± s.e. | t | p | A wins/ties/loses | queries |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset, name, run_a, run_b in pairs:
        provenance = read_provenance(run_a)
        split = provenance.split if provenance is not None else "test"
        qrels = find_file(resolve_beir(f"beir/{dataset}", args.data_root, split) / "qrels", f"{split}.tsv")
        res = compare_run_files(qrels, run_a, run_b, args.measure, args.force)
        target = args.out / f"{dataset}.{name}.json"
        target.write_text(json.dumps({**asdict(res), "run_a": str(run_a), "run_b": str(run_b)}, indent=2) + "\n")
        print(_markdown_line(f"{dataset}: {name} (`{target}`)", res))


def main(argv: list[str] | None = None) -> None:
    report_user_errors(lambda: _main(argv), "search-r3-paired")


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="search-r3-paired", description=__doc__.split("\n")[0])
    parser.add_argument("run_a", nargs="?")
    parser.add_argument("run_b", nargs="?")
    parser.add_argument("--qrels", help="a BEIR qrels file (qrels/<split>.tsv); required for two run files")
    parser.add_argument("--measure", default="nDCG@10")
    parser.add_argument("--force", action="store_true", help="pair runs over different corpora or query sets")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    grid = parser.add_argument_group("grid", "every test of a two-adapter table (see the module docstring)")
    grid.add_argument("--grid", type=Path, metavar="RUNS", help="the runs/eval/<stamp> directory of the table")
    grid.add_argument("--system", help="retriever name of A (e.g. smollm2-rl-claim)")
    grid.add_argument("--baseline", help="retriever name of B (e.g. smollm2-sft-claim)")
    grid.add_argument("--baseline-runs", type=Path, help="where B's run files are (default: RUNS)")
    grid.add_argument("--data-root", type=Path, help="where beir/<dataset>/qrels/ is (default: found like any "
                      "named dataset: $SEARCH_R3_DATA, the offline mirrors, the cache, see docs/data.md)")
    grid.add_argument("--out", type=Path, default=Path("docs/paired"), help="where the JSON records go")
    args = parser.parse_args(argv)
    if args.grid is not None:
        if not (args.system and args.baseline) or args.run_a:
            parser.error("--grid takes --system and --baseline, and no run files")
        run_grid(args)
        return
    if not (args.run_a and args.run_b and args.qrels):
        parser.error("two run files and --qrels (or --grid RUNS --system A --baseline B)")
    res = compare_run_files(Path(args.qrels), args.run_a, args.run_b, args.measure, args.force)
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
