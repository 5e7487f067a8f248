"""Stage 1 under DDP is the one-process computation: 2 gloo processes with batch B/2 each against one
process with batch B, plain and with GradCache, validation included.

What makes them equal (and what the test would catch if it went): the sampler packs the same global
batches and splits them by rank; every rank gathers all embeddings with its own rows differentiable,
offsets each query's positive by its rank's position in the gathered documents, masks known positives
over the global batch, and scales its objective by the world size because DDP averages gradients (AdamW
and clipping would hide a wrong scale in the updates, so the pre-clip gradient norm is compared too).

Tolerance 1e-5 (absolute; relative 1e-6 for the gradient norm, which is ~80): both runs compute the same
sums in float32 in another order (the gathered documents are a permutation of the one-process batch,
gradients are summed across ranks), which moves losses by a few ulps. AdamW turns a gradient into a step
of about ``lr`` per element whatever its size, so an element whose gradient is tiny carries its rounding
into the update almost unscaled: at lr 1e-2 the updates differed by up to 2.8e-6, at the lr 1e-3 used here
by about a tenth of that (``benchmarks/results/ddp_equivalence.json``). A wrong label offset, a missing
gather or a missing world-size scale moves the losses or the gradient norm by 1e-1 or more; a GradCache
without the blocked sync runs 3 to 8 all-reduces a step (each checked by breaking the code once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from search_r3.datamodules.contrastive import ContrastiveDataModule
from search_r3.lightning_modules.sft import SFTContrastiveModule
from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings

STEPS = 3
_ALLREDUCE_CALLS = [0]


def _counting_allreduce(state, bucket):  # module level: ddp_spawn pickles it into the workers
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    _ALLREDUCE_CALLS[0] += 1
    return allreduce_hook(state, bucket)


class _Record(L.Callback):
    """Per step: the logged losses and the gradient all-reduces DDP ran; rank 0 writes them at the end."""

    def __init__(self, out: Path) -> None:
        self.out, self.steps, self.calls = out, [], 0

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers DDP comm hooks on CUDA only; on gloo the test registers its counter itself.
        if trainer.world_size > 1:
            trainer.strategy.model.register_comm_hook(None, _counting_allreduce)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.steps.append({"loss": float(m["train/loss"]), "nce": float(m["train/nce"]),
                           "lm": float(m["train/lm"]), "triplet": float(m["train/triplet"]),
                           "masked": float(m["train/masked_negatives"]), "grad_norm": float(m["train/grad_norm"]),
                           "allreduce_calls": _ALLREDUCE_CALLS[0] - self.calls})
        self.calls = _ALLREDUCE_CALLS[0]

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            weights = {n: p.detach().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}
            torch.save({"steps": self.steps, "weights": weights,
                        "val": float(trainer.callback_metrics["val/nDCG_at_10"])}, self.out)


def _run(tiny_lm_dir: Path, root: Path, out: Path, processes: int, cached: bool) -> dict:
    torch.manual_seed(0)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_document_tokens=48, max_query_tokens=24)
    module = SFTContrastiveModule(encoder, adapter_dir=str(out.parent / f"adapter-{out.stem}"), warmup_steps=1,
                                  lr=1e-3, cached=cached, chunk_size=2)
    data = ContrastiveDataModule(data_root=str(root), train_files=["train/scifact_train_triples.jsonl.gz"],
                                 batch_size=8 // processes, num_negatives=2, val_queries=4,
                                 val_corpus_docs=30)
    strategy = DDPStrategy(start_method="spawn") if processes > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=processes, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(out.parent), num_sanity_val_steps=0, max_steps=STEPS,
                        val_check_interval=2, use_distributed_sampler=False, callbacks=[_Record(out)])
    trainer.fit(module, datamodule=data)
    return torch.load(out, weights_only=True)


def test_two_process_ddp_is_the_one_process_computation(tiny_lm_dir: Path, mini_train_root: Path,
                                                         tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = {n: p.detach().clone() for n, p in EmbeddingLM(
        base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0)).named_parameters() if p.requires_grad}
    measured: dict[str, float] = {}
    loss_diffs = []
    for cached in (False, True):
        kind = "cached" if cached else "plain"
        one = _run(tiny_lm_dir, mini_train_root, tmp_path / f"one-{kind}.pt", 1, cached)
        two = _run(tiny_lm_dir, mini_train_root, tmp_path / f"two-{kind}.pt", 2, cached)
        assert len(one["steps"]) == len(two["steps"]) == STEPS
        for a, b in zip(one["steps"], two["steps"]):
            for key in ("loss", "nce", "lm", "triplet", "masked"):
                loss_diffs.append(abs(a[key] - b[key]))
                assert b[key] == pytest.approx(a[key], abs=1e-5), (kind, key, one["steps"], two["steps"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), (kind, one["steps"], two["steps"])
        # One gradient all-reduce per step, also when GradCache runs one backward per chunk.
        assert [s["allreduce_calls"] for s in two["steps"]] == [1] * STEPS, (kind, two["steps"])
        assert two["val"] == pytest.approx(one["val"], abs=1e-6)  # validation gathered the sharded corpus
        names = [n for n in one["weights"] if n.split("lora_")[-1] != n or "trainable_tokens" in n]
        diffs = []
        for name in names:
            update_one = one["weights"][name] - initial[name.removeprefix("encoder.")]
            update_two = two["weights"][name] - initial[name.removeprefix("encoder.")]
            assert update_one.abs().max() > 1e-4, f"{name} did not train"  # the comparison means something
            diffs.append(float((update_one - update_two).abs().max()))
        measured[f"max_abs_update_diff_{kind}"] = max(diffs)
        assert max(diffs) < 1e-5, (kind, max(diffs))
    measured["max_abs_loss_diff"] = max(loss_diffs)
    if os.environ.get("DDP_EQUIVALENCE_OUT"):  # benchmarks/ddp_equivalence.py records the measurement
        Path(os.environ["DDP_EQUIVALENCE_OUT"]).write_text(json.dumps(measured, indent=2) + "\n")


class _SaveRL(L.Callback):
    """At the end, every rank writes its environment, its weights and the logged per-step losses."""

    def __init__(self, out: Path) -> None:
        self.out, self.steps, self.encoded = out, [], [0]

    def on_fit_start(self, trainer, pl_module) -> None:
        # Count the documents this rank encodes (the environment binds encode_documents when it is built).
        encode, encoded = pl_module.encoder.encode_documents, self.encoded

        def counting(texts, batch_size=None):
            encoded[0] += len(texts)
            return encode(texts, batch_size)

        pl_module.encoder.encode_documents = counting

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.steps.append({k: float(m[f"train/{k}"]) for k in ("loss", "policy_loss", "embed_loss", "reward_mean",
                                                                 "reward_std", "reasoning_tokens_p50",
                                                                 "reasoning_tokens_p90", "length_cap_rate",
                                                                 "advantage_abs_mean", "grad_norm")}
                          | {k: float(m[f"train/{k}_step"]) for k in ("kl", "reward", "reward_ge_0.5", "entropy",
                                                                       "reasoning_tokens", "format_failure_rate")})

    def on_fit_end(self, trainer, pl_module) -> None:
        env = pl_module.env
        torch.save({"vectors": env.vectors, "versions": env.versions, "steps": self.steps, "encoded": self.encoded[0],
                    "owned": (env.owned.start, env.owned.stop), "vector_bytes": env.vector_bytes(),
                    "weights": {n: p.detach().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}},
                   self.out.with_name(f"{self.out.stem}-rank{trainer.global_rank}.pt"))


def _run_rl(tiny_lm_dir: Path, root: Path, out: Path, processes: int, module_class: type,
            **module_args) -> list[dict]:
    from search_r3.datamodules.rl_queries import RLQueryDataModule
    from search_r3.environment import RefreshPolicy

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    encoder = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False, max_reasoning_tokens=6,
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_document_tokens=32, max_query_tokens=24)
    module = module_class(encoder, group_size=2, lr=1e-3, kl_weight=0.04, embed_weight=0.1, samples_every=0,
                      refresh=RefreshPolicy(top_l=5, settle_rounds=1), adapter_dir=str(out.parent / "adapter"),
                      **module_args)
    data = RLQueryDataModule(data_root=str(root), max_queries=8, batch_size=4 // processes, val_queries=4,
                             val_corpus_docs=30)
    strategy = DDPStrategy(start_method="spawn") if processes > 1 else "auto"
    L.Trainer(accelerator="cpu", devices=processes, strategy=strategy, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(out.parent),
              num_sanity_val_steps=0, max_steps=2, limit_val_batches=0, use_distributed_sampler=False,
              callbacks=[_SaveRL(out)]).fit(module, datamodule=data)
    return [torch.load(out.with_name(f"{out.stem}-rank{r}.pt"), weights_only=True) for r in range(processes)]


def test_two_process_rl_shares_one_environment_and_is_the_one_process_run(tiny_lm_dir: Path, mini_train_root: Path,
                                                                          tmp_path: Path,
                                                                          sampled_token_reward: type) -> None:
    """Stage 2 on 2 gloo processes (2 queries each) against one process (4 queries): every rank ends with
    the same environment (the union of touched documents re-encoded once, split across ranks), and that
    environment, the losses and the weights are the one-process run's. Rollouts are sampled per query
    from (seed, step, query id), so both runs sample the same trajectories. The reward is the sampled-token
    one (conftest): its groups are never all equal, so the policy term is on (with the KL and the
    embedding term), and its global normalisation is compared too."""
    (one,) = _run_rl(tiny_lm_dir, mini_train_root, tmp_path / "one" / "rl.pt", 1, sampled_token_reward)
    two = _run_rl(tiny_lm_dir, mini_train_root, tmp_path / "two" / "rl.pt", 2, sampled_token_reward)
    assert all(abs(s["policy_loss"]) > 0 for s in one["steps"])
    assert torch.equal(two[0]["vectors"], two[1]["vectors"]) and torch.equal(two[0]["versions"], two[1]["versions"])
    assert torch.equal(two[0]["versions"], one["versions"]) and int(one["versions"].max()) == 1
    # Each document the one process encoded was encoded once across the ranks, and they shared the work.
    assert two[0]["encoded"] + two[1]["encoded"] == one["encoded"]
    assert all(0.4 * one["encoded"] <= t["encoded"] <= 0.6 * one["encoded"] for t in two), \
        (one["encoded"], [t["encoded"] for t in two])
    env_diff = float((two[0]["vectors"] - one["vectors"]).abs().max())
    assert env_diff < 1e-5, env_diff
    for a, b in zip(one["steps"], two[0]["steps"]):
        for key, value in a.items():
            if key == "grad_norm":  # AdamW hides a wrongly scaled gradient in the updates; the norm does not
                assert b[key] == pytest.approx(value, rel=1e-5), (key, one["steps"], two[0]["steps"])
            else:  # reward_mean too: the per-step statistics are over every rank's rollouts
                assert b[key] == pytest.approx(value, abs=1e-5), (key, one["steps"], two[0]["steps"])
    diffs = [float((two[0]["weights"][n] - w).abs().max()) for n, w in one["weights"].items()]
    assert max(diffs) < 1e-5, max(diffs)
    if os.environ.get("DDP_EQUIVALENCE_OUT"):
        path = Path(os.environ["DDP_EQUIVALENCE_OUT"])
        measured = json.loads(path.read_text()) if path.is_file() else {}
        measured.update({"max_abs_env_diff": env_diff, "max_abs_update_diff_rl": max(diffs)})
        path.write_text(json.dumps(measured, indent=2) + "\n")


def test_two_process_rl_with_a_sharded_environment_is_the_one_process_run(tiny_lm_dir: Path, mini_train_root: Path,
                                                                          tmp_path: Path,
                                                                          sampled_token_reward: type) -> None:
    """The same Stage-2 run with ``shard_environment: true``: each rank holds half of the document vectors,
    searches are merged across ranks and refreshes run on the owners, and the per-step losses, rewards and
    weights are still the one-process run's; the two blocks together are its environment."""
    (one,) = _run_rl(tiny_lm_dir, mini_train_root, tmp_path / "one" / "rl.pt", 1, sampled_token_reward)
    two = _run_rl(tiny_lm_dir, mini_train_root, tmp_path / "two" / "rl.pt", 2, sampled_token_reward,
                  shard_environment=True)
    assert two[0]["owned"][0] == 0 and two[0]["owned"][1] == two[1]["owned"][0] and two[1]["owned"][1] == len(one["versions"])
    assert torch.equal(torch.cat([two[0]["versions"], two[1]["versions"]]), one["versions"])
    env_diff = float((torch.cat([two[0]["vectors"], two[1]["vectors"]]) - one["vectors"]).abs().max())
    assert env_diff < 1e-5, env_diff
    assert two[0]["encoded"] + two[1]["encoded"] == one["encoded"]  # each document encoded once, by its owner
    assert max(t["vector_bytes"] for t in two) <= 0.55 * one["vector_bytes"]
    for a, b in zip(one["steps"], two[0]["steps"]):
        for key, value in a.items():
            tolerance = {"rel": 1e-5} if key == "grad_norm" else {"abs": 1e-5}
            assert b[key] == pytest.approx(value, **tolerance), (key, one["steps"], two[0]["steps"])
    diffs = [float((two[0]["weights"][n] - w).abs().max()) for n, w in one["weights"].items()]
    assert max(diffs) < 1e-5, max(diffs)
