"""Does a Stage-1 adapter write ``<|embed_token|>``, and is its embedding space spread out?

Three checks per adapter, all cheap (a minute each on 2 CPU cores):

* **direct response NLL**: per-token negative log-likelihood of the direct response
  ("The embedding is <|embed_token|>") after the query prompt, mean over queries; the embed token's own
  NLL is what the LM loss must drive to 0 for reasoning mode to end with the token;
* **reasoning emission**: share of greedy reasoning generations (``--max-new-tokens``) that write the
  token themselves instead of needing the format fix-up (the RL stage's format-failure rate);
* **spread**: mean pairwise cosine of document embeddings (a value near 1 means every document maps
  to nearly one direction: the collapse we saw in an NFCorpus-trained adapter).

    python benchmarks/stage1_token.py --adapter none --adapter runs/sft/adapter/best

Writes ``benchmarks/results/stage1_token.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search_r3.datamodules.beir_files import find_file, iter_corpus, iter_jsonl  # noqa: E402
from search_r3.model.embedding_lm import EmbeddingLM  # noqa: E402
from search_r3.model.prompts import EMBED_TOKEN  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", action="append", required=True,
                   help="adapter folder, or 'none' for the untrained wrapper (repeatable)")
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"),
                   help="BEIR folder: queries and corpus")
    p.add_argument("--queries", type=int, default=16, help="queries for the NLL and emission checks")
    p.add_argument("--documents", type=int, default=64, help="documents for the spread check")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/stage1_token.json"))
    return p.parse_args()


def response_nll(model: EmbeddingLM, queries: list[str]) -> list[tuple[str, float]]:
    """Mean NLL of each direct-response token over the queries, in response order."""
    seqs, starts = model.direct_training_ids(queries, "query")
    ids, mask = model.pad(seqs)
    with model.inference():
        logp = torch.log_softmax(model.lm(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    width = len(seqs[0]) - starts[0]  # the response has the same tokens in every row
    nll = torch.zeros(width)
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        for j, t in enumerate(range(start, len(seq))):
            nll[j] -= logp[row, t - 1, seq[t]] / len(seqs)
    tokens = [model.tokenizer.decode([tok]) for tok in seqs[0][starts[0]:]]
    return list(zip(tokens, nll.tolist()))


def main() -> None:
    args = parse_args()
    dataset = Path(args.dataset)
    queries = [obj["text"] for _, obj in iter_jsonl(find_file(dataset, "queries.jsonl"))][: args.queries]
    documents = []
    for _, _, text in iter_corpus(find_file(dataset, "corpus.jsonl")):
        documents.append(text)
        if len(documents) == args.documents:
            break
    rows = []
    for adapter in args.adapter:
        model = EmbeddingLM(base_model="smollm2-135m-instruct", dtype="float32", show_progress=False,
                            adapter=None if adapter == "none" else adapter, max_document_tokens=128)
        nll = response_nll(model, queries)
        gen = model.reasoner.generate(queries, max_new_tokens=args.max_new_tokens)
        responses, missing = gen.responses, gen.missing
        emb = model.encode(documents, "document")
        cos = emb @ emb.T
        off = cos[~torch.eye(len(documents), dtype=torch.bool)]
        rows.append({
            "adapter": adapter,
            "response_nll": [{"token": t, "nll": round(v, 4)} for t, v in nll],
            "embed_token_nll": round(nll[-1][1], 4),
            "reasoning_emission_rate": 1 - sum(missing) / len(missing),
            "example_response": model.tokenizer.decode(responses[0]),
            "doc_mean_pairwise_cosine": round(float(off.mean()), 4),
            "doc_pairwise_cosine_std": round(float(off.std()), 4),
        })
        print(f"{adapter}: token NLL {rows[-1]['embed_token_nll']:.2f}, emission {rows[-1]['reasoning_emission_rate']:.2f}, "
              f"mean cosine {rows[-1]['doc_mean_pairwise_cosine']:.3f}", flush=True)
    table = Table(title=f"Stage-1 adapters: the embed token and the spread of the space ({dataset.name})")
    for col in ("adapter", f"NLL of {EMBED_TOKEN} (direct)", "reasoning: token written", "doc mean cosine (std)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["adapter"], f"{r['embed_token_nll']:.2f}", f"{r['reasoning_emission_rate']:.2f}",
                      f"{r['doc_mean_pairwise_cosine']:.3f} ({r['doc_pairwise_cosine_std']:.3f})")
    Console().print(table)
    out = {"command": "python benchmarks/stage1_token.py " + " ".join(sys.argv[1:]), "dataset": str(dataset),
           "queries": len(queries), "documents": len(documents), "max_new_tokens": args.max_new_tokens,
           "adapters": rows, "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
