"""Does a document's bf16 embedding depend on the batch it is encoded in, and is padding the cause?

    python benchmarks/bf16_batch_spread.py                     # 96 SciFact test documents, batch 1 / 8 / 32
    python benchmarks/bf16_batch_spread.py --docs 16 --batch-sizes 1 4   # a rehearsal

A diagnostic on a corpus subset, not the full-SciFact nDCG spread (that needs the whole corpus encoded
per setting). Each document is embedded with the committed Stage-1 adapter at every batch size, in the
machine's ``auto`` dtype and in fp32, and compared with its batch-1 embedding (no padding, no neighbours).
``EmbeddingLM.encode`` sorts by length, so a document in a batch is padded by the difference between
the batch's longest prompt and its own: the deviations are split by padded and unpadded documents, which
separates the padding (attention-mask) path from the batch-shape (kernel choice) path. Writes
``benchmarks/results/bf16_batch_spread.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_r3.datamodules.beir_files import find_file, iter_corpus  # noqa: E402
from search_r3.datamodules.sources import resolve_beir  # noqa: E402
from search_r3.model.embedding_lm import EmbeddingLM  # noqa: E402

from scale_results import add_common_args, provenance  # noqa: E402


def padding_per_document(lengths: list[int], batch_size: int) -> list[int]:
    """Pad tokens each document gets under ``EmbeddingLM.encode``'s longest-first batching."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    pad = [0] * len(lengths)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(lengths[i] for i in batch)
        for i in batch:
            pad[i] = longest - lengths[i]
    return pad


def deviation(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """1 - cosine per row."""
    return (1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)).tolist()


def summary(values: list[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "max": max(values) if values else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.set_defaults(out=str(ROOT / "benchmarks" / "results" / "bf16_batch_spread.json"))  # not scale.json
    args = p.parse_args()
    folder = resolve_beir(args.dataset, split="test")
    texts = [text for _, (_, _, text) in zip(range(args.docs), iter_corpus(find_file(folder, "corpus.jsonl")))]
    result: dict = {**provenance("python benchmarks/bf16_batch_spread.py " + " ".join(sys.argv[1:])),
                    "dataset": args.dataset, "documents": len(texts), "dtypes": {},
                    "adapter": str(Path(args.adapter).resolve().relative_to(ROOT))
                    if Path(args.adapter).resolve().is_relative_to(ROOT) else args.adapter}
    for dtype in ("auto", "float32"):
        model = EmbeddingLM(adapter=args.adapter, dtype=dtype, show_progress=False)
        lengths = [len(ids) for ids in model.direct_prompt_ids(texts, "document")]
        single = model.encode_documents(texts, batch_size=1)
        rows = {}
        for b in args.batch_sizes:
            if b == 1:
                continue
            dev = deviation(model.encode_documents(texts, batch_size=b), single)
            pad = padding_per_document(lengths, b)
            rows[str(b)] = {"all": summary(dev), "padded": summary([d for d, n in zip(dev, pad) if n > 0]),
                            "unpadded": summary([d for d, n in zip(dev, pad) if n == 0]),
                            "mean_pad_tokens": statistics.fmean(pad)}
        result["dtypes"][str(model.lm.dtype)] = {"against_batch_1": rows}
        print(str(model.lm.dtype), rows, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
