"""How much does a bf16 ``search-r3 test`` score move with the batch size and the number of processes?

    python benchmarks/bf16_eval_spread.py                          # full SciFact, batch 32/8/64, 1 and 2 processes
    python benchmarks/bf16_eval_spread.py --max-queries 10 --max-corpus-docs 200 --batch-sizes 4 8   # a rehearsal

Each setting is one real ``search-r3 test`` of the committed Stage-1 adapter (direct mode, documents cut
at 256 tokens, the machine's ``auto`` dtype), with its own output and embedding-cache folder under
``--work`` so that no setting reuses another's embeddings. Settings already finished are read back, and
an interrupted one resumes from its partial files: the script can be rerun until it completes. The
batch size is set for both the data module and the encoder, so it is the forward pass's batch.

Writes section ``bf16_eval_spread`` of ``benchmarks/results/scale.json``: every setting's nDCG@10,
``bf16_eval_ndcg_spread`` (largest minus smallest nDCG@10 over all settings), the spread over batch sizes
alone and over process counts alone, the ranked positions (of the top 100 per query) that differ from the
first setting, and how far the document embeddings moved (1 - cos against the first setting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale_results import SCALE_JSON, provenance, write_section  # noqa: E402


def encoder_args(batch: int, args: argparse.Namespace) -> dict:
    """The encoder of every setting (and of the thread check), ``batch`` texts per forward pass."""
    return {"base_model": "smollm2-135m-instruct", "dtype": "auto", "max_document_tokens": 256,
            "adapter": args.adapter, "batch_size": batch, "show_progress": False}


def setting_config(batch: int, processes: int, work: Path, args: argparse.Namespace) -> dict:
    """The ``search-r3 test`` config of one setting (every path relative to the repository root)."""
    folder = work / f"b{batch}-p{processes}"
    encoder = encoder_args(batch, args)
    data = {"datasets": [args.dataset], "split": "test", "batch_size": batch}
    if args.max_queries:
        data["max_queries"] = args.max_queries
    if args.max_corpus_docs:
        data["max_corpus_docs"] = args.max_corpus_docs
    trainer = {"accelerator": "cpu", "devices": processes, "enable_model_summary": False,
               "logger": {"init_args": {"run_name": f"bf16-spread-b{batch}-p{processes}"}}}
    if processes > 1:
        trainer["strategy"] = "ddp"  # gloo on CPU
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "search_r3.lightning_modules.RetrievalEvalModule", "init_args": {
            "retrievers": [{"class_path": "search_r3.evaluation.retrievers.EmbeddingLMRetriever", "init_args": {
                "name": "smollm2-sft-claim", "modes": ["direct"],
                "encoder": {"class_path": "search_r3.model.EmbeddingLM", "init_args": encoder}}}],
            "top_k": 100, "output_dir": str(folder / "runs"), "embedding_cache_dir": str(folder / "cache")}},
        "data": {"class_path": "search_r3.datamodules.BEIRDataModule", "init_args": data},
    }


def run_setting(batch: int, processes: int, work: Path, args: argparse.Namespace) -> Path:
    """The run folder of one setting, running ``search-r3 test`` unless a finished one exists."""
    folder = work / f"b{batch}-p{processes}"
    finished = sorted((folder / "runs").glob("*/metrics.json"))
    if finished:
        print(f"b{batch}-p{processes}: read back {finished[-1].parent}", flush=True)
        return finished[-1].parent
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(setting_config(batch, processes, work, args), sort_keys=False))
    cli = Path(sys.executable).with_name("search-r3")
    print(f"b{batch}-p{processes}: {cli.name} test --config {config}", flush=True)
    subprocess.run([str(cli), "test", "--config", str(config)], cwd=ROOT, check=True, env=dict(os.environ))
    return sorted((folder / "runs").glob("*/metrics.json"))[-1].parent


def read_run(folder: Path) -> tuple[float, dict[str, list[str]]]:
    """nDCG@10 of the setting's one row, and its ranking (document ids in rank order) per query."""
    row = json.loads((folder / "metrics.json").read_text())[0]
    ranking: dict[str, list[tuple[int, str]]] = {}
    for line in next(folder.glob("run.*.trec")).read_text().splitlines():
        qid, _, did, rank, *_ = line.split()
        ranking.setdefault(qid, []).append((int(rank), did))
    return row["nDCG@10"], {q: [d for _, d in sorted(rows)] for q, rows in ranking.items()}


def positions_differing(a: dict[str, list[str]], b: dict[str, list[str]]) -> int:
    """Ranked positions (query, rank) holding another document in ``b`` than in ``a``."""
    return sum(x != y for q in a for x, y in zip(a[q], b.get(q, []))) + sum(abs(len(a[q]) - len(b.get(q, []))) for q in a)


def document_matrix(work: Path, batch: int, processes: int) -> torch.Tensor:
    """The setting's cached document embeddings (the whole corpus, in corpus order)."""
    files = [p for p in (work / f"b{batch}-p{processes}" / "cache").glob("*.pt") if "partial" not in p.name]
    return torch.load(files[0], weights_only=True).float()


def threads_per_process(processes: int) -> int:
    """What Lightning gives each process (``OMP_NUM_THREADS`` if set, else the cores shared out): on a CPU,
    small bf16 batches can split a matrix product's reduction over threads, so the count matters."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // processes))


def rescored_with_threads(work: Path, batch: int, threads: int, args: argparse.Namespace) -> float:
    """nDCG@10 of the reference setting's documents with the queries encoded again in this process on
    ``threads`` threads, the count each of the multi-process run's processes had: if it equals that run's,
    the multi-process difference is the thread count (small bf16 products split their sums over threads),
    not the sharding."""
    from search_r3.datamodules.beir import BEIRDataModule
    from search_r3.evaluation.dense_eval import score_task
    from search_r3.model.embedding_lm import EmbeddingLM

    data = BEIRDataModule(datasets=[args.dataset], max_queries=args.max_queries, max_corpus_docs=args.max_corpus_docs)
    data.setup("test")
    task = data.tasks[0]
    encoder = EmbeddingLM(**encoder_args(batch, args))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    texts = list(task.queries.values())
    queries = torch.cat([encoder.encode_queries(texts[i : i + batch]) for i in range(0, len(texts), batch)])
    torch.set_num_threads(before)
    metrics, _ = score_task(task, document_matrix(work, batch, 1), queries, 100, ["nDCG@10"])
    return round(metrics["nDCG@10"], 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="beir/scifact")
    p.add_argument("--adapter", default="checkpoints/smollm2-sft-cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 8, 64],
                   help="the first is also run on --processes processes and is the reference setting")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--max-queries", type=int, default=None)
    p.add_argument("--max-corpus-docs", type=int, default=None)
    p.add_argument("--work", default="runs/bf16-spread", help="output and cache folders, one per setting")
    p.add_argument("--out", default=str(SCALE_JSON))
    args = p.parse_args()
    work = Path(args.work)
    reference = args.batch_sizes[0]
    settings = [(reference, 1), (reference, args.processes)] + [(b, 1) for b in args.batch_sizes[1:]]
    folders = {s: run_setting(*s, work, args) for s in settings}
    scores = {s: read_run(f) for s, f in folders.items()}
    ref_ndcg, ref_ranking = scores[(reference, 1)]
    ref_docs = document_matrix(work, reference, 1)
    rows = {}
    for (batch, processes), (ndcg, ranking) in scores.items():
        docs = document_matrix(work, batch, processes)
        moved = 1 - torch.nn.functional.cosine_similarity(docs, ref_docs, dim=-1)
        rows[f"b{batch}-p{processes}"] = {
            "batch_size": batch, "processes": processes, "threads_per_process": threads_per_process(processes),
            "nDCG@10": ndcg, "nDCG@10_minus_reference": round(ndcg - ref_ndcg, 4),
            "ranked_positions_differing": positions_differing(ref_ranking, ranking),
            "ranked_positions": sum(len(r) for r in ref_ranking.values()),
            "documents_identical_to_reference": bool(torch.equal(docs, ref_docs)),
            "document_1_minus_cos_mean": float(moved.mean()), "document_1_minus_cos_max": float(moved.max()),
            "run_folder": str(folders[(batch, processes)]),
        }
    by_batch = [scores[(b, 1)][0] for b in args.batch_sizes]
    by_processes = [scores[(reference, 1)][0], scores[(reference, args.processes)][0]]
    every = [s for s, _ in scores.values()]
    threads = threads_per_process(args.processes)
    check = {"threads": threads, "nDCG@10": rescored_with_threads(work, reference, threads, args),
             "multi_process_nDCG@10": scores[(reference, args.processes)][0],
             "what": f"the b{reference}-p1 documents, the queries encoded again in one process on the {threads} "
                     f"thread(s) each process of b{reference}-p{args.processes} had"}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    section = {
        **provenance("python benchmarks/bf16_eval_spread.py " + " ".join(sys.argv[1:]), cpu=cpu,
                     bf16_isa=[f for f in ("amx_bf16", "avx512_bf16") if f in flags]),
        "dataset": args.dataset, "adapter": args.adapter, "mode": "direct",
        "max_document_tokens": encoder_args(reference, args)["max_document_tokens"],
        "max_queries": args.max_queries, "max_corpus_docs": args.max_corpus_docs,
        "reference": f"b{reference}-p1",
        "bf16_eval_ndcg_spread": round(max(every) - min(every), 4),
        "spread_over_batch_sizes": round(max(by_batch) - min(by_batch), 4),
        "spread_over_processes": round(max(by_processes) - min(by_processes), 4),
        "target": 0.002,
        "one_process_with_the_multi_process_threads": check,
        "settings": rows,
    }
    print(json.dumps({k: v for k, v in section.items() if k != "settings"}, indent=1))
    print(f"wrote {write_section(args.out, 'bf16_eval_spread', section)} (section bf16_eval_spread)")


if __name__ == "__main__":
    main()
