"""Stage-2 telemetry of a training run, in blocks of steps and per epoch, from the MLflow store.

    python scripts/rl_telemetry.py --run-name rl-claim            # markdown: blocks of 10 steps, epochs
    python scripts/rl_telemetry.py --run-name rl-claim --block 20
    python scripts/rl_telemetry.py --run-name rl-claim --json docs/telemetry/rl-claim.json   # also a JSON
    python scripts/rl_telemetry.py --run-name rl-claim --recount --json docs/telemetry/rl-claim.json

``--recount`` also re-measures the analyses in the run's sample tables (``rollouts/``: sampled, every
``samples_every`` steps; ``reasoning/``: greedy, at each validation) with the current definition of an
analysis (:meth:`Reasoner.analysis_length`: the closing words "The embedding is" are format, not
analysis). Runs logged before 2026-11-30 20:00 counted those words, so their ``analysis tokens`` and
``empty analyses`` step metrics overstate the reasoning; the recount is from re-tokenised text.

A run resumed before resumed runs continued their MLflow run (see docs/mlflow.md) is spread over
several runs of one name: they are read in start order and, for a step logged twice (steps redone
after a checkpoint), the later value counts. Epoch means are computed here from the per-step values
(every step weighs the same: each has the same number of rollouts), grouped by the logged ``epoch``:
runs logged before 2026-11-30 evening restarted their ``train/*_epoch`` aggregates on resume, so those
cover only the steps after it. The last line gives the median wall time between consecutive steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

KEYS = {"mean reward": "train/reward_mean", "share ≥ 0.5": "train/reward_ge_0.5_step",
        "format failures": "train/format_failure_rate_step", "analysis tokens": "train/reasoning_tokens_step",
        "empty analyses": "train/empty_reasoning_rate_step", "zero-variance groups": "train/zero_variance_groups_step",
        "KL to Stage 1": "train/kl_step", "entropy": "train/entropy_step",
        "copies the query": "train/copies_query_rate_step", "opens with the closing words": "train/begins_with_closing_rate_step",
        "capped": "train/capped_rate_step", "beats direct": "train/beats_direct_rate_step",
        "margin over direct": "train/margin_over_direct_step",
        "refresh s": "env/refresh_seconds", "re-encoded docs": "env/reencoded"}


def _mean(series: dict[int, tuple[float, int]], steps: list[int]) -> float | None:
    values = [series[s][0] for s in steps if s in series]
    return statistics.mean(values) if values else None


def recount_samples(client: Any, runs: list, base_model: str, epoch_of: dict[int, int],
                    min_tokens: int) -> dict[str, Any]:
    """Analysis lengths of every logged sample table: per table, per epoch and over all tables of a kind.
    A table logged at global step s holds the rollouts of step s - 1 (``epoch_of`` maps steps to epochs).
    ``share_at_least_min`` is the share with ``min_tokens`` or more (what a length condition would pass).
    The encoder is loaded for its tokenizer and prompts, the inputs of ``analysis_length``."""
    import tempfile

    from search_r3.model.embedding_lm import EmbeddingLM
    from search_r3.model.prompts import EMBED_TOKEN

    encoder = EmbeddingLM(base_model=base_model, dtype="float32", show_progress=False)
    column = {"rollouts": "reasoning", "reasoning": "analysis"}  # sampled responses; greedy analyses

    def length(text: str) -> int:
        head = text.split(EMBED_TOKEN)[0]
        return encoder.reasoner.analysis_length(encoder.tokenizer(head, add_special_tokens=False)["input_ids"])

    def summary(lengths: list[int]) -> dict[str, float]:
        n = len(lengths)
        return {"samples": n, "analysis_tokens_mean": round(sum(lengths) / n, 2),
                "empty_share": round(sum(x == 0 for x in lengths) / n, 3),
                "min_tokens": min_tokens, "share_at_least_min": round(sum(x >= min_tokens for x in lengths) / n, 3)}

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, col in column.items():
            tables: dict[int, list[int]] = {}
            for run in runs:  # later runs win for a step logged twice, as for the metrics
                for art in client.list_artifacts(run.info.run_id, kind):
                    table = json.loads(Path(client.download_artifacts(run.info.run_id, art.path, tmp)).read_text())
                    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
                    if rows:
                        tables[int(rows[0]["step"])] = [length(r[col]) for r in rows]
            if tables:
                by_epoch: dict[int, list[int]] = {}
                for step, lengths in tables.items():
                    by_epoch.setdefault(epoch_of.get(step - 1, -1) + 1, []).extend(lengths)
                out[kind] = {"per_step": {str(k): summary(v) for k, v in sorted(tables.items())},
                             "per_epoch": {str(e): summary(v) for e, v in sorted(by_epoch.items())},
                             "steps": [min(tables), max(tables)],
                             "all": summary([x for v in tables.values() for x in v])}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="search-r3")
    parser.add_argument("--run-name", default="rl-claim")
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--json", help="also write blocks, epochs and step times to this JSON file")
    parser.add_argument("--recount", action="store_true",
                        help="re-measure the analyses of the logged sample tables (see the module docstring)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct", help="tokenizer for --recount")
    parser.add_argument("--min-tokens", type=int, default=8,
                        help="--recount also reports the share of analyses at least this long")
    args = parser.parse_args(argv)

    from search_r3.evaluation.mlflow_runs import runs_named

    client, _, runs = runs_named(args.tracking_uri, args.experiment, args.run_name)
    series: dict[str, dict[int, tuple[float, int]]] = {k: {} for k in [*KEYS.values(), "epoch"]}
    for run in runs:
        for key in series:
            for m in client.get_metric_history(run.info.run_id, key):
                series[key][m.step] = (m.value, m.timestamp)
    steps = sorted(series["train/reward_mean"])
    if not steps:
        raise SystemExit("no train/reward_mean in these runs")

    def row(selected: list[int]) -> dict[str, float | None]:
        return {name: _mean(series[key], selected) for name, key in KEYS.items()}

    blocks = [{"steps": [lo, min(lo + args.block, steps[-1] + 1) - 1],
               **row([s for s in steps if lo <= s < lo + args.block])} for lo in range(0, steps[-1] + 1, args.block)]
    by_epoch: dict[int, list[int]] = {}
    for s in steps:
        by_epoch.setdefault(int(series["epoch"].get(s, (0, 0))[0]), []).append(s)
    epochs = [{"epoch": e, "steps": [min(ss), max(ss)], "num_steps": len(ss), **row(ss)} for e, ss in sorted(by_epoch.items())]
    times = [series["train/reward_mean"][s][1] for s in steps]
    gaps = [(b - a) / 1000 for a, b, s0, s1 in zip(times, times[1:], steps, steps[1:]) if s1 == s0 + 1]

    fmt = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731
    for title, rows, label in (("Blocks", blocks, "steps"), ("Epochs", epochs, "epoch")):
        print(f"{title}:\n\n| {label} | " + " | ".join(KEYS) + " |")
        print("|---" * (len(KEYS) + 1) + "|")
        for r in rows:
            name = f"{r['steps'][0]}–{r['steps'][1]}" if label == "steps" else f"{r['epoch'] + 1} (steps {r['steps'][0]}–{r['steps'][1]})"
            print(f"| {name} | " + " | ".join(fmt(r[k]) for k in KEYS) + " |")
        print()
    median_gap = statistics.median(gaps) if gaps else None
    print(f"{len(runs)} run(s), steps 0–{steps[-1]}; median wall time between consecutive steps "
          f"{median_gap:.0f} s" if median_gap is not None else "")
    epoch_of = {step: int(value) for step, (value, _) in series["epoch"].items()}
    samples = recount_samples(client, runs, args.base_model, epoch_of, args.min_tokens) if args.recount else {}
    for kind, what in (("rollouts", "sampled rollouts"), ("reasoning", "greedy validation analyses")):
        if kind in samples:
            a = samples[kind]["all"]
            print(f"{what}, recounted (steps {samples[kind]['steps'][0]}–{samples[kind]['steps'][1]}, "
                  f"{a['samples']} samples): mean {a['analysis_tokens_mean']} analysis tokens, "
                  f"{a['empty_share']:.0%} empty, {a['share_at_least_min']:.0%} with {args.min_tokens} or more")
            for epoch, e in samples[kind]["per_epoch"].items():
                print(f"  epoch {epoch}: {e['samples']} samples, mean {e['analysis_tokens_mean']}, "
                      f"{e['empty_share']:.0%} empty, {e['share_at_least_min']:.0%} with {args.min_tokens} or more")
    if args.json:
        out = {"command": "python scripts/rl_telemetry.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "run_name": args.run_name, "mlflow_runs": [r.info.run_id for r in runs], "last_step": steps[-1],
               "median_seconds_between_steps": median_gap, "blocks": blocks, "epochs": epochs,
               "first_epoch": epochs[0], "last_epoch": epochs[-1],
               "last_epoch_reward_ge_0.5": epochs[-1]["share ≥ 0.5"],
               **({"samples_recounted": samples} if samples else {})}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
