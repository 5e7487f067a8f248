"""Stage-2 telemetry of a training run, in blocks of steps, from the MLflow store (markdown table).

    python scripts/rl_telemetry.py --run-name rl-claim            # every run of that name, in order
    python scripts/rl_telemetry.py --run-name rl-claim --block 20

A run resumed before resumed runs continued their MLflow run (see docs/mlflow.md) is spread over
several runs of one name: they are read in start order and, for a step logged twice (steps redone
after a checkpoint), the later value counts. Means per block; the last line gives the median wall
time between consecutive steps.
"""

from __future__ import annotations

import argparse
import statistics

KEYS = {"mean reward": "train/reward_mean", "share ≥ 0.5": "train/reward_ge_0.5_step",
        "format failures": "train/format_failure_rate_step", "analysis tokens": "train/reasoning_tokens_step",
        "KL to Stage 1": "train/kl_step", "refresh s": "env/refresh_seconds", "re-encoded docs": "env/reencoded"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="search-r3")
    parser.add_argument("--run-name", default="rl-claim")
    parser.add_argument("--block", type=int, default=10)
    args = parser.parse_args(argv)

    from search_r3.evaluation.mlflow_runs import runs_named

    client, _, runs = runs_named(args.tracking_uri, args.experiment, args.run_name)
    series: dict[str, dict[int, tuple[float, int]]] = {k: {} for k in KEYS.values()}
    for run in runs:
        for key in KEYS.values():
            for m in client.get_metric_history(run.info.run_id, key):
                series[key][m.step] = (m.value, m.timestamp)
    steps = sorted(series["train/reward_mean"])
    if not steps:
        raise SystemExit("no train/reward_mean in these runs")
    print("| steps | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for lo in range(0, steps[-1] + 1, args.block):
        block = [s for s in steps if lo <= s < lo + args.block]
        cells = []
        for key in KEYS.values():
            values = [series[key][s][0] for s in block if s in series[key]]
            cells.append(f"{statistics.mean(values):.3g}" if values else "–")
        print(f"| {lo}–{min(lo + args.block, steps[-1] + 1) - 1} | " + " | ".join(cells) + " |")
    times = [series["train/reward_mean"][s][1] for s in steps]
    gaps = [(b - a) / 1000 for a, b, s0, s1 in zip(times, times[1:], steps, steps[1:]) if s1 == s0 + 1]
    print(f"\n{len(runs)} run(s), steps 0–{steps[-1]}; median wall time between consecutive steps "
          f"{statistics.median(gaps):.0f} s")


if __name__ == "__main__":
    main()
