"""Result rows and how they are shown: console table, markdown tables and a bar chart.

Tables have one row per retriever (and query mode) and one column per dataset, with the mean last,
so the systems of one run, or of several gathered runs, read side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ResultRow:
    retriever: str
    mode: str | None
    checkpoint: str | None
    dataset: str
    split: str
    metrics: dict[str, float]
    num_queries: int
    num_docs: int
    corpus_size: int
    command: str
    wall_time_s: float
    device: str = "cpu"
    documents_from_cache: bool = False  # wall time then excludes encoding the corpus
    trained_on: list[str] | None = None  # datasets whose train split the model was fitted on
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))
    checkpoint_digest: str | None = None  # content digest of the checkpoint folder as loaded
    precision: str | None = None  # compute dtype of a neural retriever (bf16 / fp32)
    # Reasoning mode only: how much analysis the greedy outputs held (reasoning_length_stats). A reasoning
    # row whose analyses are empty is direct mode under another prompt, so every such row says it.
    reasoning: dict[str, float] | None = None

    @property
    def protocol(self) -> str | None:
        """``in-domain`` (trained on this dataset's train split), ``cross-domain``, or None (not ours)."""
        if not self.trained_on:
            return None
        return "in-domain" if self.dataset in self.trained_on else "cross-domain"

    @property
    def label(self) -> str:
        return self.retriever if self.mode is None else f"{self.retriever}.{self.mode}"

    def record(self) -> dict[str, Any]:
        """The flat form stored in ``docs/results.json``."""
        out: dict[str, Any] = {"retriever": self.retriever, "mode": self.mode, "checkpoint": self.checkpoint,
                               "dataset": self.dataset, "split": self.split}
        if self.checkpoint_digest:
            out["checkpoint_digest"] = self.checkpoint_digest
        out.update(self.metrics)
        out.update({"num_queries": self.num_queries, "num_docs": self.num_docs, "corpus_size": self.corpus_size,
                    "command": self.command, "wall_time_s": self.wall_time_s,
                    "documents_from_cache": self.documents_from_cache, "device": self.device, "date": self.date})
        if self.precision:
            out["precision"] = self.precision
        if self.reasoning:
            out.update(self.reasoning)
        if self.trained_on:
            out.update({"trained_on": self.trained_on, "protocol": self.protocol})
        return out


def reasoning_length_stats(lengths: list[int], missing: int) -> dict[str, float]:
    """Greedy analysis length of a reasoning-mode run: mean, median, 90th percentile, the share of empty
    analyses (the token written at once) and the share of queries whose embed token had to be appended."""
    if not lengths:
        return {}
    ordered_lengths = sorted(lengths)
    n = len(ordered_lengths)
    return {"reasoning_queries": n, "reasoning_tokens_mean": round(sum(ordered_lengths) / n, 2),
            "reasoning_tokens_p50": float(ordered_lengths[n // 2]),
            "reasoning_tokens_p90": float(ordered_lengths[min(n - 1, int(0.9 * n))]),
            "empty_reasoning_rate": round(sum(x == 0 for x in ordered_lengths) / n, 4),
            "missing_embed_token_rate": round(missing / n, 4)}


def pivot(rows: list[ResultRow], measure: str) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(row labels, dataset columns, value by (label, dataset)); labels and columns in first-seen order."""
    labels: list[str] = []
    datasets: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for r in rows:
        ds = r.dataset if r.num_docs == r.corpus_size else f"{r.dataset} (capped)"
        labels += [r.label] if r.label not in labels else []
        datasets += [ds] if ds not in datasets else []
        values[(r.label, ds)] = r.metrics[measure]
    return labels, datasets, values


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def table_cells(rows: list[ResultRow], measure: str) -> tuple[list[str], list[list[str]]]:
    labels, datasets, values = pivot(rows, measure)
    header = ["retriever", *datasets] + (["mean"] if len(datasets) > 1 else [])
    body = []
    for label in labels:
        vals = [values.get((label, d)) for d in datasets]
        cells = [f"{v:.4f}" if v is not None else "–" for v in vals]
        if len(datasets) > 1:
            m = _mean(vals)
            cells.append(f"{m:.4f}" if m is not None else "–")
        body.append([label, *cells])
    return header, body


def markdown_table(rows: list[ResultRow], measure: str) -> str:
    header, body = table_cells(rows, measure)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def write_markdown_tables(rows: list[ResultRow], measures: list[str], path: Path) -> Path:
    parts = [f"## {m}\n\n{markdown_table(rows, m)}\n" for m in measures]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def print_table(rows: list[ResultRow], measure: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    header, body = table_cells(rows, measure)
    table = Table(title=measure)
    for col in header:
        table.add_column(col, justify="left" if col == "retriever" else "right")
    for r in body:
        table.add_row(*(escape(c) for c in r))
    Console(width=max(100, 14 * len(header) + 30)).print(table)


def write_bar_chart(rows: list[ResultRow], measure: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, datasets, values = pivot(rows, measure)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(datasets) * max(1, len(labels) / 2)), 3.5))
    for j, label in enumerate(labels):
        xs = [i + j * width for i in range(len(datasets))]
        ys = [values.get((label, d), 0.0) for d in datasets]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(datasets))], datasets)
    ax.set_ylabel(measure)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
