"""TREC run files: the artifact that lets anyone re-score a ranking with trec_eval or ir-measures.

Beside each run file, ``<run>.meta.json`` records what the ranking was made over: the corpus (name,
documents searched, corpus size, content digest, capped or not) and the query set (split, count and
the ids). A run file alone cannot say either: a query with no hit leaves no line (BM25 on NFCorpus
ranks nothing for 15 of 323 queries), and a capped corpus looks like a full one. ``search-r3-paired``
reads the sidecar to score over the right queries (missing ones count 0, as the table counts them) and
to refuse pairing runs made over different corpora or query sets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from search_r3.evaluation.metrics import Run

META_SUFFIX = ".meta.json"


@dataclass(frozen=True)
class RunProvenance:
    """What a run file was made over (see the module docstring)."""

    dataset: str
    split: str
    corpus_documents: int  # documents searched
    corpus_size: int  # documents in the corpus file
    corpus_digest: str
    capped: bool
    query_ids: tuple[str, ...]  # the evaluated queries, all of them, hits or not

    @property
    def query_digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.query_ids)).encode()).hexdigest()[:16]

    def describe(self) -> str:
        cap = f"{self.corpus_documents} of {self.corpus_size} documents (capped)" if self.capped \
            else f"full corpus of {self.corpus_size} documents"
        return f"{self.dataset}/{self.split}: {cap}, digest {self.corpus_digest}; {len(self.query_ids)} queries"


def meta_path(run_path: str | Path) -> Path:
    return Path(f"{run_path}{META_SUFFIX}")


def write_trec_run(run: Run, path: str | Path, tag: str, provenance: RunProvenance | None = None) -> Path:
    """``qid Q0 docid rank score tag`` lines, best first per query, and the provenance sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (did, score) in enumerate(ranked, start=1):
                fh.write(f"{qid} Q0 {did} {rank} {score:.6f} {tag}\n")
    if provenance is not None:
        record = asdict(provenance) | {"query_ids": list(provenance.query_ids), "query_digest": provenance.query_digest,
                                       "run_file": path.name, "tag": tag}
        meta_path(path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def read_provenance(run_path: str | Path) -> RunProvenance | None:
    """The sidecar of a run file, or None for run files written before sidecars existed."""
    path = meta_path(run_path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    fields = RunProvenance.__dataclass_fields__
    return RunProvenance(**{k: (tuple(v) if k == "query_ids" else v) for k, v in record.items() if k in fields})
