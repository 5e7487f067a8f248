"""Which compute dtype is fast on this machine, and what ``dtype: auto`` picks.

On CPUs with AVX512-BF16/AMX, bf16 is the fast path; on AVX2-only CPUs PyTorch has no native bf16
GEMM and falls back to a reference kernel tens of times slower than fp32. ``EmbeddingLM(dtype="auto")``
asks oneDNN which case holds. This script measures both sides in one run, so the choice is checked
rather than assumed:

* **GEMM**: GFLOP/s of a ``[tokens x 576] @ [576 x 1536]`` product (SmolLM2's MLP shape), median of
  ``--repeats``, per dtype;
* **encoder**: documents/s and tokens/s of the wrapper encoding the first ``--documents`` SciFact
  documents (direct mode, ``--max-tokens`` cap), median of ``--repeats`` after one warm-up, per dtype.
  The slow dtype encodes ``--slow-documents`` documents cut at ``--slow-max-tokens``, once and without
  warm-up: on an AVX2-only CPU one 256-token document would take many minutes in bf16.

    python benchmarks/cpu_dtype.py

Writes ``benchmarks/results/cpu_dtype.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_r3.datamodules.beir_files import find_file, iter_corpus  # noqa: E402
from search_r3.model.embedding_lm import EmbeddingLM, resolve_dtype  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    p.add_argument("--documents", type=int, default=32, help="documents per encoder timing in the fast dtype")
    p.add_argument("--slow-documents", type=int, default=2, help="documents encoded in the slow dtype")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--slow-max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_dtype.json"))
    return p.parse_args()


def gemm_gflops(dtype: torch.dtype, repeats: int, rows: int = 1024) -> float:
    a, b = torch.randn(rows, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * rows * 576 * 1536 / statistics.median(times) / 1e9


def encoder_speed(dtype: str, texts: list[str], max_tokens: int, repeats: int, warm_up: bool) -> dict[str, float]:
    model = EmbeddingLM(dtype=dtype, max_document_tokens=max_tokens, batch_size=8, show_progress=False)
    tokens = sum(len(s) for s in model.direct_prompt_ids(texts, "document"))
    with model.inference():
        if warm_up:
            model.encode(texts[:2], "document")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode(texts, "document")
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"documents": len(texts), "max_tokens": max_tokens, "tokens": tokens, "seconds_median": seconds,
            "documents_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds}


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f")))


def main() -> None:
    args = parse_args()
    auto = resolve_dtype("auto")
    fast = "bfloat16" if auto is torch.bfloat16 else "float32"
    texts = [text for _, (_, _, text) in zip(range(args.documents), iter_corpus(find_file(Path(args.dataset), "corpus.jsonl")))]
    rows = {}
    for name, dtype in DTYPES.items():
        if name == fast:
            speed = encoder_speed(name, texts, args.max_tokens, args.repeats, warm_up=True)
        else:
            speed = encoder_speed(name, texts[: args.slow_documents], args.slow_max_tokens, 1, warm_up=False)
        rows[name] = {"gemm_gflops": gemm_gflops(dtype, 5), **speed}
    ratio = rows[fast]["tokens_per_s"] / rows["bfloat16" if fast == "float32" else "float32"]["tokens_per_s"]
    table = Table(title=f"dtype on this CPU (auto -> {fast}; {platform.processor() or platform.machine()})")
    for col in ("dtype", "GEMM GFLOP/s", "documents x token cap", "tokens/s (median)"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name + (" (auto)" if name == fast else ""), f"{r['gemm_gflops']:.1f}",
                      f"{r['documents']} x {r['max_tokens']}", f"{r['tokens_per_s']:.1f}")
    Console().print(table)
    Console().print(f"auto's dtype encodes {ratio:.1f}x the tokens/s of the other")
    result = {
        "command": "python benchmarks/cpu_dtype.py " + " ".join(sys.argv[1:]),
        "auto_dtype": fast, "auto_speedup_tokens_per_s": ratio, "per_dtype": rows,
        "max_tokens": args.max_tokens, "repeats": args.repeats,
        "machine": {"processor": platform.processor(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
