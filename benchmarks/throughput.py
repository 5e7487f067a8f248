"""Encoder throughput against a plain loop and the machine's own peak, and where training steps spend
their time (issue 21).

    .venv/bin/python benchmarks/throughput.py            # -> benchmarks/results/throughput.json
    .venv/bin/python benchmarks/throughput.py --quick    # tiny sizes, a rehearsal -> throughput_quick.json
    .venv/bin/python benchmarks/throughput.py --only rollouts   # re-measure one section into the JSON
    .venv/bin/python benchmarks/throughput.py --out benchmarks/results/throughput_gpu_h200.json   # on a GPU

Encoding (the first 64 SciFact documents in corpus order, at the evaluation truncation of 256 tokens, batches of 32;
every time is the median of ``--reps`` repetitions, the variants interleaved so drift hits all alike):

- ``EmbeddingLM.encode_documents`` (longest-first batches) against a plain Hugging Face loop over the
  same model, dtype and token ids (batches in corpus order, each padded to its longest row):
  ``encode_speedup_vs_plain_hf`` = plain time / ours (must not fall below 1.0);
- the committed Stage-1 adapter ``checkpoints/smollm2-sft-cpu``, merged for inference, against the bare
  model: ``adapter_encode_time_ratio`` (target <= 1.10);
- achieved FLOP/s (2 x non-embedding parameters x tokens) over the peak of a 2048^2 matmul in the same
  dtype measured in the same run: ``encode_fraction_of_matmul_peak`` (and ``_adapter``);
- all-MiniLM-L6-v2 through sentence-transformers, a tuned library's figure for reference.

Rollouts (``rollouts``): GRPO's sampling with one prefill shared by the G copies of a query against a
prefill per copy (``rollout_speedup_shared_prefill``), and with the embed-token row merged for the
generation against peft's per-call copy of the vocabulary matrix (``rollout_speedup_token_rows_merged``).

Step profiles: a few optimizer steps of ``configs/sft.yaml`` and ``configs/rl.yaml`` (small caps) with
every phase timed where it happens: generation (``Reasoner.generate``), environment refresh
(``step_refresh``), backward (``manual_backward``), optimizer (clip, step, schedule), validation; the
forward pass and the losses are the rest of the step. Times on a machine shared with other jobs are
only indicative; the JSON records the machine and what else was running is the reader's to know.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in ``dtype``: the ceiling an encoder in that dtype can approach."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    return 2 * n**3 / statistics.median(_timed(lambda: a @ b) for _ in range(reps))


def plain_hf_encode(model: Any, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    """The loop a user would write with transformers alone: batches in corpus order, right-padded to
    the batch's longest row, the hidden state read at the last embed token, normalised."""
    decoder, pad_id, token_id = model.decoder, model.tokenizer.pad_token_id, model.embed_token_id
    device = next(decoder.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start:start + batch_size]
            longest = max(map(len, batch))
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            last = ((ids == token_id) * torch.arange(longest, device=device)).argmax(dim=1)
            out.append(torch.nn.functional.normalize(hidden[torch.arange(len(batch)), last].float(), dim=-1).cpu())
    return torch.cat(out)


def non_embedding_parameters(model: Any) -> int:
    return sum(p.numel() for n, p in model.decoder.named_parameters() if "embed_tokens" not in n)


def encoding(quick: bool, reps: int) -> dict[str, Any]:
    from search_r3.datamodules.beir_files import find_file, iter_corpus
    from search_r3.evaluation.retrievers import SentenceTransformerRetriever
    from search_r3.model.embedding_lm import EmbeddingLM

    n_docs = 16 if quick else 64
    corpus = find_file(ROOT.parent / "shared" / "data" / "beir" / "scifact", "corpus.jsonl")
    texts = [text for _, (_, _, text) in zip(range(n_docs), iter_corpus(corpus))]
    settings = {"base_model": "smollm2-135m-instruct", "dtype": "auto", "max_document_tokens": 256,
                "batch_size": 32, "show_progress": False}
    bare = EmbeddingLM(**settings)
    adapter = EmbeddingLM(**settings, adapter=str(ROOT / "checkpoints" / "smollm2-sft-cpu"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for model in (bare, adapter):
        model.lm.to(device)
    minilm = SentenceTransformerRetriever()
    minilm.model.to(device)
    seqs = bare.direct_prompt_ids(texts, "document")
    tokens = sum(map(len, seqs))
    st_tokens = sum(min(len(ids), minilm.model.max_seq_length)
                    for ids in minilm.model.tokenizer(texts, add_special_tokens=True)["input_ids"])

    ours_emb = bare.encode_documents(texts)  # warm-up, and the equality check below
    plain_emb = plain_hf_encode(bare, seqs, 32)
    adapter.encode_documents(texts[:4])
    minilm.encode_documents(texts[:4])
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(reps):
        times["ours"].append(_timed(lambda: bare.encode_documents(texts)))
        times["plain_hf"].append(_timed(lambda: plain_hf_encode(bare, seqs, 32)))
        times["adapter_merged"].append(_timed(lambda: adapter.encode_documents(texts)))
        times["minilm"].append(_timed(lambda: minilm.encode_documents(texts)))
    median = {k: statistics.median(v) for k, v in times.items()}
    peak = matmul_peak_flops(bare.lm.dtype, device)
    flops_per_token = 2 * non_embedding_parameters(bare)
    return {
        "documents": n_docs, "tokens": tokens, "dtype": str(bare.lm.dtype), "device": str(device),
        "seconds_median": {k: round(v, 3) for k, v in median.items()},
        "seconds_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "tokens_per_second": {"ours": round(tokens / median["ours"], 1),
                              "plain_hf": round(tokens / median["plain_hf"], 1),
                              "adapter_merged": round(tokens / median["adapter_merged"], 1),
                              "minilm": round(st_tokens / median["minilm"], 1)},
        "minilm_documents_per_second": round(n_docs / median["minilm"], 1),
        "ours_equals_plain_hf_max_abs_diff": float((ours_emb - plain_emb).abs().max()),
        "matmul_peak_flops": round(peak),
        "flops_per_token": flops_per_token,
        "encode_speedup_vs_plain_hf": round(median["plain_hf"] / median["ours"], 3),
        "adapter_encode_time_ratio": round(median["adapter_merged"] / median["ours"], 3),
        "encode_fraction_of_matmul_peak": round(flops_per_token * tokens / median["ours"] / peak, 3),
        "encode_fraction_of_matmul_peak_adapter": round(flops_per_token * tokens / median["adapter_merged"] / peak, 3),
    }


def rollouts(quick: bool, reps: int) -> dict[str, Any]:
    """GRPO's sampling as ``configs/rl.yaml`` runs it: G = 4 tempered copies of each of the first SciFact queries,
    up to 32 new tokens, from the Stage-1 adapter (merged) under a fresh LoRA, one ``generate`` per query.
    Each query's copies sample the same tokens in every variant (same seed), so tokens/s compare like
    with like: ``rollout_speedup_shared_prefill`` = time with a prefill per copy / time with one shared;
    ``rollout_speedup_token_rows_merged`` = time with peft's per-call copy of the vocabulary matrix for
    the embed-token row / time with the row merged for the generation (both with a shared prefill)."""
    from search_r3.datamodules.beir_files import find_file, iter_jsonl
    from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

    n_queries, group = (2 if quick else 6), 4
    queries_file = find_file(ROOT.parent / "shared" / "data" / "beir" / "scifact", "queries.jsonl")
    queries = [obj["text"] for _, (_, obj) in zip(range(n_queries), iter_jsonl(queries_file))]
    model = EmbeddingLM(base_model="smollm2-135m-instruct", dtype="auto", max_query_tokens=64,
                        max_reasoning_tokens=32, show_progress=False,
                        adapter=str(ROOT / "checkpoints" / "smollm2-sft-cpu"),
                        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.lm.to(device)

    merge_rows = model._token_rows_merged

    def sample(shared: bool, merged_rows: bool) -> int:
        # merged_rows=False: peft's own path, a full copy of the vocabulary matrix per forward call
        model._token_rows_merged = merge_rows if merged_rows else contextlib.nullcontext  # type: ignore[method-assign]
        new_tokens = 0
        for i, query in enumerate(queries):
            torch.manual_seed(i)
            gen = model.reasoner.generate([query], copies=group, do_sample=True, temperature=1.0,
                                           share_prefill=shared)
            new_tokens += sum(len(r) for r in gen.responses)
        return new_tokens

    variants = {"shared_prefill": (True, True), "prefill_per_copy": (False, True),
                "shared_prefill_peft_token_rows": (True, False)}
    sample(True, True)  # warm-up
    times: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = {}
    for _ in range(reps):
        for name, (shared, merged_rows) in variants.items():
            start = time.perf_counter()
            counts[name] = sample(shared, merged_rows)
            _sync()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    prompt_tokens = sum(len(p) for p in model.reasoning_prompt_ids(queries))
    return {
        "queries": n_queries, "group_size": group, "max_new_tokens": 32, "prompt_tokens": prompt_tokens,
        "sampled_tokens": counts, "dtype": str(model.lm.dtype), "device": str(device),
        "seconds_median": {k: round(v, 3) for k, v in median.items()},
        "seconds_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "sampled_tokens_per_second": {k: round(counts[k] / median[k], 1) for k in median},
        "rollout_speedup_shared_prefill": round(median["prefill_per_copy"] / median["shared_prefill"], 3),
        "rollout_speedup_token_rows_merged": round(median["shared_prefill_peft_token_rows"] / median["shared_prefill"], 3),
    }


class PhaseTimer(L.Callback):
    """Wall time per phase of each optimizer step, by wrapping the methods where each phase happens."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.validation: list[float] = []
        self._t = 0.0
        self._wrapped = False

    def _wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _sync()
                self.current[phase] += time.perf_counter() - start

        setattr(owner, name, timed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._wrapped:  # after on_train_start: the RL environment exists by now
            self._wrap(pl_module, "manual_backward", "backward")
            self._wrap(pl_module, "optimizer_step_now", "optimizer")
            self._wrap(pl_module.encoder.reasoner, "generate", "generation")
            if getattr(pl_module, "env", None) is not None:
                self._wrap(pl_module.env, "step_refresh", "environment_refresh")
            self._wrapped = True
        self.current = defaultdict(float)
        _sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _sync()
        total = time.perf_counter() - self._t
        step = dict(self.current)
        step["forward_losses_other"] = total - sum(step.values())
        step["total"] = total
        self.steps.append(step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._v = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validation.append(time.perf_counter() - self._v)


def profile_stage(args: list[str]) -> dict[str, Any]:
    from search_r3.cli import run_cli

    cli = run_cli(args, run=False)
    timer = PhaseTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = timer.steps[1:] or timer.steps  # the first step pays for warm-up
    phases = sorted({k for s in steps for k in s})
    median = {k: round(statistics.median(s.get(k, 0.0) for s in steps), 3) for k in phases}
    return {"steps_measured": len(steps), "seconds_median": median,
            "share_of_step": {k: round(v / median["total"], 3) for k, v in median.items() if k != "total"},
            "validation_seconds": [round(v, 2) for v in timer.validation]}


def stage_args(quick: bool) -> dict[str, list[str]]:
    steps = "3" if quick else "4"
    common = ["--trainer.max_steps", steps, "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
              "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "auto",
              "--trainer.val_check_interval", steps, "--trainer.num_sanity_val_steps", "0"]
    return {
        "stage1": ["--config", "configs/sft.yaml", *common, "--data.init_args.val_queries", "8",
                   "--data.init_args.val_corpus_docs", "32" if quick else "64",
                   "--model.init_args.adapter_dir", "runs/bench-throughput/sft"]
        + (["--data.init_args.batch_size", "4"] if quick else []),
        "stage2": ["--config", "configs/rl.yaml", *common,
                   "--model.init_args.encoder.init_args.adapter", "checkpoints/smollm2-sft-cpu",
                   "--model.init_args.probe_every", "null", "--model.init_args.samples_every", "0",
                   "--data.init_args.max_corpus_docs", "16" if quick else "200", "--data.init_args.max_queries", "8",
                   "--data.init_args.val_queries", "8", "--data.init_args.val_corpus_docs", "32" if quick else "64",
                   "--model.init_args.adapter_dir", "runs/bench-throughput/rl"]
        # the environment keeps every judged train document (565): short ones keep a rehearsal short
        + (["--model.init_args.encoder.init_args.max_document_tokens", "32"] if quick else []),
    }


def update_section(out: Path, opts: argparse.Namespace, reps: int) -> None:
    """``--only rollouts``: measure one section and write it into ``out``, keeping the others; the section
    records its own command, date and machine, since it did not run with the rest."""
    result = json.loads(out.read_text()) if out.is_file() else {}
    start = time.perf_counter()
    section = rollouts(opts.quick, reps)
    section.update({
        "command": "python benchmarks/throughput.py --only rollouts" + (" --quick" if opts.quick else ""),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(), "repetitions": reps, "wall_seconds": round(time.perf_counter() - start, 1)})
    result["rollouts"] = section
    _headline(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in section.items() if k != "seconds_all"}))
    print(f"updated {out}")


HEADLINE = {"encoding": ("encode_speedup_vs_plain_hf", "adapter_encode_time_ratio", "encode_fraction_of_matmul_peak",
                         "encode_fraction_of_matmul_peak_adapter"),
            "rollouts": ("rollout_speedup_shared_prefill", "rollout_speedup_token_rows_merged")}


def _headline(result: dict[str, Any]) -> None:
    """The issue's keys at the top level of the JSON, copied from the sections that measured them."""
    for section, keys in HEADLINE.items():
        for key in keys:
            if key in result.get(section, {}):
                result[key] = result[section][key]


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: rehearse the script")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-profiles", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--only", choices=["rollouts"],
                        help="re-measure this section alone and update it in the existing JSON (its own "
                             "command and date are recorded in the section)")
    opts = parser.parse_args()
    os.chdir(ROOT)  # the recipes name paths relative to the repository
    reps = 2 if opts.quick else opts.reps
    out = Path(opts.out) if opts.out else ROOT / "benchmarks" / "results" / (
        "throughput_quick.json" if opts.quick else "throughput.json")
    if opts.only:
        update_section(out, opts, reps)
        return
    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/throughput.py" + (" --quick" if opts.quick else ""),
        "machine": _machine(),
        "torch": torch.__version__, "repetitions": reps,
        "encoding": encoding(opts.quick, reps),
    }
    result["rollouts"] = rollouts(opts.quick, reps)
    _headline(result)
    print(json.dumps({k: v for k, v in result.items() if k != "encoding"}), flush=True)
    if not opts.skip_profiles:
        result["step_profiles"] = {name: profile_stage(args) for name, args in stage_args(opts.quick).items()}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
