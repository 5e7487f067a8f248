"""``docs/results.json``: every retrieval number the project claims, with the command that made it.

Rows are written only when a run asks for it (``record_results``), never by default, and
``docs/results.md`` is regenerated from the JSON each time so the two cannot disagree.
A row is replaced when the same command records the same retriever, mode, checkpoint (path and content
digest), dataset, split, size (queries, documents) and compute dtype again, so a retrained adapter at the same
path adds
rows instead of overwriting the old adapter's; the same system measured by two different commands (say the
default run and the baselines run) keeps both rows, each with its own wall time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

from search_r3.common.digests import folder_digest

REQUIRED_KEYS = (
    "retriever", "mode", "checkpoint", "dataset", "split", "nDCG@10", "R@100", "RR@10", "command", "wall_time_s",
)
_IDENTITY = ("retriever", "mode", "checkpoint", "checkpoint_digest", "dataset", "split", "num_queries", "num_docs",
             "command", "precision")


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of result rows")
    return rows


def record_rows(new_rows: Iterable[dict[str, Any]], path: str | Path = "docs/results.json") -> Path:
    """Upsert ``new_rows`` into the JSON file and re-render the markdown next to it."""
    path = Path(path)
    new_rows = list(new_rows)
    for row in new_rows:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row lacks {missing}: {row}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two commands finishing at once must both keep their rows: read-modify-write under a lock file, and
    # each file replaced atomically, so a reader never sees half a file.
    with FileLock(str(path) + ".lock"):
        rows = load_rows(path)
        for row in new_rows:
            key = tuple(row.get(k) for k in _IDENTITY)
            rows = [r for r in rows if tuple(r.get(k) for k in _IDENTITY) != key] + [row]
        rows.sort(key=lambda r: (r["dataset"], r["split"], r["retriever"], str(r["mode"]), str(r["checkpoint"])))
        _replace(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        _replace(path.with_suffix(".md"), render_markdown(rows, source=path.name, root=path.resolve().parent.parent))
    return path


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _checkpoint(row: dict[str, Any]) -> str:
    if row.get("checkpoint") is None:
        return "–"
    digest = row.get("checkpoint_digest")
    note = f" ({row['note']})" if row.get("note") else ""  # what a reader must know about how it was trained
    return row["checkpoint"] + (f" @{digest[:8]}" if digest else "") + note


def mode_label(row: dict[str, Any]) -> str:
    """Reasoning rows say how much reasoning there was: greedy analysis tokens (mean) and the share of
    empty analyses; rows recorded before this was measured say so."""
    if row.get("mode") != "reasoning":
        return _fmt(row.get("mode"))
    if "reasoning_tokens_mean" not in row:
        return "reasoning (length not measured)"
    return f"reasoning ({row['reasoning_tokens_mean']:.1f} tokens, {100 * row['empty_reasoning_rate']:.0f}% empty)"


def _trained(row: dict[str, Any]) -> str:
    if not row.get("trained_on"):
        return "–"
    return f"{'+'.join(row['trained_on'])} train ({row.get('protocol', '?')})"


_CURRENT_IDENTITY = ("dataset", "split", "retriever", "mode", "checkpoint_digest", "num_queries", "num_docs",
                     "precision")


def current_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest row of each system as measured: one per dataset, split, retriever, mode, checkpoint
    (content digest, or path for rows without one), protocol (queries, documents searched) and dtype.
    Rows of one date keep file order (a later upsert of the same identity replaced the earlier one)."""
    latest: dict[tuple, tuple[str, int, dict[str, Any]]] = {}
    for i, r in enumerate(rows):
        key = tuple(r.get(k) if k != "checkpoint_digest" else (r.get(k) or r.get("checkpoint")) for k in _CURRENT_IDENTITY)
        stamp = (str(r.get("date", "")), i)
        if key not in latest or stamp >= latest[key][:2]:
            latest[key] = (*stamp, r)
    kept = [entry[2] for entry in latest.values()]
    kept.sort(key=lambda r: (r["dataset"], r["split"], str(r["mode"]), r["retriever"], str(r["checkpoint"])))
    return kept


_HEADER = [
    "| dataset | split | retriever | mode | checkpoint | trained on | nDCG@10 | R@100 | RR@10 | queries | docs | wall time (s) | where | date | command |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = list(_HEADER)
    for r in rows:
        docs = _fmt(r.get("num_docs"))
        if r.get("corpus_size") and r.get("num_docs") != r.get("corpus_size"):
            docs += f" of {r['corpus_size']}"
        cells = [
            r["dataset"], r["split"], r["retriever"], mode_label(r), _checkpoint(r), _trained(r),
            _fmt(r["nDCG@10"]), _fmt(r["R@100"]), _fmt(r["RR@10"]), _fmt(r.get("num_queries")), docs,
            f"{r['wall_time_s']:.0f}" + (" (docs cached)" if r.get("documents_from_cache") else ""),
            r.get("device", "–") + (f", {r['precision']}" if r.get("precision") else ""),
            str(r.get("date", "–")), f"`{r['command']}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reproducible(row: dict[str, Any], root: Path) -> bool:
    """A row a reader can re-score from the repository alone: its retriever needs no trained adapter, or its
    adapter is committed (``checkpoints/``) with the content digest the row was scored with."""
    checkpoint = row.get("checkpoint")
    if not checkpoint:
        return True
    folder = root / checkpoint
    if not checkpoint.startswith("checkpoints/") or not folder.is_dir():
        return False
    return row.get("checkpoint_digest") in (None, folder_digest(folder))


def render_markdown(rows: list[dict[str, Any]], source: str = "results.json", root: Path | None = None) -> str:
    """The page: the systems reproducible from the repository (``root``, default the working directory)
    first, then the latest row of every other system, then every row ever recorded."""
    current = current_rows(rows)
    root = root if root is not None else Path(".")
    here = [r for r in current if reproducible(r, root)]
    elsewhere = [r for r in current if not reproducible(r, root)]
    lines = [
        "# Measured retrieval results",
        "",
        f"Generated from `{source}`; do not edit by hand. Each row names the command that produced it.",
        "A row whose `docs` is smaller than the corpus was run on a capped corpus (fewer distractors,",
        "so its scores are higher than a full-corpus run would give). `trained on` names the train splits",
        "an adapter was fitted on: *in-domain* rows share the corpus (not BEIR's zero-shot protocol),",
        "*cross-domain* rows do not. `@digest` after a checkpoint is the content digest of the adapter",
        "folder that was loaded: the same path with another digest is another (retrained) adapter.",
        "`where` is the device and, for neural retrievers, the compute dtype: bf16 and fp32 runs of one",
        "command are separate rows (the dtype changes scores and, on CPUs without native bf16, wall times many-fold).",
        "A reasoning-mode row gives the mean length of its greedy analyses and the share of empty ones (the",
        "embed token written at once): with no analysis, reasoning mode is direct mode under another prompt.",
        "",
        f"## Reproducible from this repository ({len(here)} systems)",
        "",
        "The latest row of each system that needs no trained adapter or whose adapter is committed under",
        "`checkpoints/` with the digest it was scored with: its command re-scores it from a clone. One row per",
        "dataset, split, retriever, mode, checkpoint digest, protocol (queries and documents searched) and dtype;",
        "the same measurement made by several commands is shown once.",
        "",
        *_table(here),
        "",
        f"## Earlier systems ({len(elsewhere)} systems)",
        "",
        "The latest row of each system whose adapter is not in the repository (a `runs/` folder of an earlier",
        "training run): a record of what was measured; retraining its recipe gives a new adapter and new numbers.",
        "",
        *_table(elsewhere),
        "",
        f"## Full history ({len(rows)} rows)",
        "",
        *_table(rows),
    ]
    return "\n".join(lines) + "\n"
