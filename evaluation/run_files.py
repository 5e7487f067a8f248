"""TREC run files: the artifact that lets anyone re-score a ranking with trec_eval or ir-measures."""

from __future__ import annotations

from pathlib import Path

from search_r3.evaluation.metrics import Run


def write_trec_run(run: Run, path: str | Path, tag: str) -> Path:
    """``qid Q0 docid rank score tag`` lines, best first per query."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (did, score) in enumerate(ranked, start=1):
                fh.write(f"{qid} Q0 {did} {rank} {score:.6f} {tag}\n")
    return path
