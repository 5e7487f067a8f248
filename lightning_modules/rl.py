"""``RLModule``: Stage 2 — GRPO over reasoning rollouts, rewarded by retrieval in the environment.

Per step, for B queries the policy samples G reasoning trajectories each (reasoning mode, ending in
``<|embed_token|>``); one forward pass gives every trajectory's token log-probabilities and its
embedding at the token. The environment is refreshed selectively around those embeddings (see
:mod:`search_r3.environment.env`), each embedding is rewarded by how it ranks the query's positives, and

    loss = policy (clipped surrogate, GRPO) + β · KL(policy ‖ reference) + λ · InfoNCE(rollout embeddings)

Our choices where the paper is silent (``docs/design.md``), with why:

- **Advantages**: ``(r − mean_group) / (std_group + 1e-6)`` (GRPO's normalisation; ``scale_rewards:
  false`` gives the unscaled Dr.-GRPO variant). A group with equal rewards gets 0 exactly; the
  fraction of such groups is logged because rank rewards saturate (all 0 or all 1).
- **Policy loss**: PPO-clip per token, averaged per trajectory then over trajectories. Rollouts are
  used for ``inner_epochs`` updates (1 = strictly on-policy: the ratio is 1 and the clip inactive).
  The tokens appended by the format fix-up (a trajectory that never wrote the token) were not sampled
  and are masked out, as are prompt tokens.
- **KL**: exact per-token KL over the vocabulary against the reference = the same model with the
  adapter disabled (no second copy), not GRPO's k3 sample estimator: both distributions are in
  memory anyway, and the exact value has no variance. Taken on every sampled token but the embed
  token (``EmbeddingLM.kl_targets``): the reference cannot write it, so a KL there would fight the
  format reward.
- **Embedding term**: GRPO's gradient only reaches sampled tokens; the embedding is a hidden state,
  so λ · InfoNCE of each rollout embedding against its environment candidates (top-L ∪ positives,
  the documents' current vectors, no gradient through them) moves it directly; ``embed_advantage_weighted``
  weights rows by their positive advantage. λ = 0 is pure GRPO.
- **Format**: a trajectory without the token (end of turn or length cap) gets ``failure_reward``; or,
  with ``format_penalty`` set, the retrieval reward of its fixed-up embedding (the appended
  " The embedding is <|embed_token|>") minus the penalty. Our deviation for weak starting points: a
  Stage-1 model trained on direct-mode responses almost never emits the token by itself, so with a
  constant failure reward every group is all-equal, every advantage is zero and nothing is learned
  (seen in our first CPU run: format-failure rate 1.0, reward 0 for 21 steps). The penalty keeps the
  retrieval signal while still paying trajectories that end properly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from search_r3.environment import ExactIndex, HNSWIndex, RefreshPolicy, RetrievalEnvironment
from search_r3.environment.rewards import RewardKind
from search_r3.lightning_modules.adapter_training import AdapterTrainingModule
from search_r3.model.embedding_lm import EmbeddingLM
from search_r3.lightning_modules.losses import clipped_policy_loss, group_advantages, multi_positive_info_nce, token_kl

log = logging.getLogger(__name__)


class RLModule(AdapterTrainingModule):
    """Args:
        encoder: the shared wrapper, normally loading the Stage-1 adapter (``adapter`` + ``lora`` set,
            so it keeps training).
        group_size: trajectories per query (G).
        temperature / top_p / max_new_tokens: sampling of the trajectories (``None``: the encoder's cap).
        clip_eps: PPO clip range. inner_epochs: updates per batch of rollouts.
        kl_weight: β. embed_weight: λ (0 = pure GRPO). embed_advantage_weighted: weight InfoNCE rows by
            max(advantage, 0). tau: InfoNCE temperature.
        scale_rewards: divide advantages by the group's std (GRPO) or not (Dr. GRPO).
        reward_kind / reward_k: ``ndcg`` or ``scaled_dcg`` at cut-off k. failure_reward: reward of a
            trajectory that never emitted the embed token. format_penalty: if set, such a trajectory is
            rewarded by its fixed-up embedding's retrieval minus this instead (``failure_reward`` unused).
        refresh: the environment's refresh policy. index: ``exact`` or ``hnsw``.
        probe_every: steps between fidelity probes on the validation queries (``None`` = never; each
            probe encodes the whole environment corpus once).
        sample_texts: reasoning texts written per validation as an artifact.
        lr / weight_decay / warmup_steps / gradient_clip / adapter_dir: see :class:`AdapterTrainingModule`.
        val_modes: query modes scored at validation (the first selects the adapter).
    """

    def __init__(self, encoder: EmbeddingLM, group_size: int = 4, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int | None = None, clip_eps: float = 0.2, inner_epochs: int = 1,
                 kl_weight: float = 0.04, embed_weight: float = 0.1, embed_advantage_weighted: bool = False,
                 tau: float = 0.05, scale_rewards: bool = True, reward_kind: RewardKind = "ndcg", reward_k: int = 10,
                 failure_reward: float = 0.0, format_penalty: float | None = None,
                 refresh: RefreshPolicy | None = None, index: Literal["exact", "hnsw"] = "exact",
                 probe_every: int | None = None, sample_texts: int = 4,
                 lr: float = 1e-5, weight_decay: float = 0.0, warmup_steps: int = 0, gradient_clip: float = 1.0,
                 adapter_dir: str = "runs/rl/adapter", val_modes: list[Literal["direct", "reasoning"]] | None = None) -> None:
        super().__init__(encoder, lr, weight_decay, warmup_steps, gradient_clip, adapter_dir,
                         val_modes or ["reasoning", "direct"])
        if group_size < 2:
            raise ValueError("group_size must be at least 2: GRPO's advantage compares rollouts of one query")
        if inner_epochs < 1:
            raise ValueError("inner_epochs must be at least 1")
        self.group_size, self.temperature, self.top_p, self.max_new_tokens = group_size, temperature, top_p, max_new_tokens
        self.clip_eps, self.inner_epochs = clip_eps, inner_epochs
        self.kl_weight, self.embed_weight, self.embed_advantage_weighted, self.tau = \
            kl_weight, embed_weight, embed_advantage_weighted, tau
        self.scale_rewards, self.reward_kind, self.reward_k, self.failure_reward = \
            scale_rewards, reward_kind, reward_k, failure_reward
        self.format_penalty = format_penalty
        self.refresh_policy = refresh or RefreshPolicy()
        self.index_kind = index
        self.probe_every, self.sample_texts = probe_every, sample_texts
        self.env: RetrievalEnvironment | None = None
        self._saved_env: dict[str, Any] | None = None
        self.last_rollouts: list[tuple[str, str, float]] = []

    # ------------------------------------------------------------------ environment
    def build_environment(self, texts: list[str], doc_ids: list[str],
                          state: dict[str, Any] | None = None) -> RetrievalEnvironment:
        """Index the corpus with the current weights (a full encode: the only one unless the policy asks),
        or, resuming, with the stale vectors the checkpoint saved (``state``)."""
        index = HNSWIndex() if self.index_kind == "hnsw" else ExactIndex()
        self.env = RetrievalEnvironment(texts, self.encoder.encode_documents, self.refresh_policy, index, doc_ids)
        if state is not None:
            try:
                self.env.load_state_dict(state)
                log.info("environment: %d document vectors restored from the checkpoint (step %d)", len(texts),
                         self.env.step)
                return self.env
            except ValueError as err:
                log.warning("%s; encoding the corpus afresh instead (the resumed run is not exact)", err)
        self.env.set_step(self.global_step)
        stats = self.env.full_refresh()
        log.info("environment: %d documents encoded in %.1f s", len(texts), stats.seconds)
        return self.env

    def on_train_start(self) -> None:
        # Built here, not in on_fit_start: some strategies (FSDP, DeepSpeed) restore the checkpoint
        # after on_fit_start, and the environment must be encoded with (or restored for) those weights.
        if self.env is None:
            dm = self.trainer.datamodule
            self.build_environment(dm.corpus_texts, dm.corpus_ids, self._saved_env)
            self._saved_env = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.env is not None and self.env.vectors is not None:
            # Under DDP this is rank 0's copy; every rank restores it (each had refreshed its own).
            checkpoint["environment"] = self.env.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._saved_env = checkpoint.get("environment")

    # ------------------------------------------------------------------ rollouts
    def rollout(self, queries: list[str]) -> dict[str, Tensor | list]:
        """Sample G trajectories per query and lay them out for one training forward pass."""
        texts = [q for q in queries for _ in range(self.group_size)]
        prompts, responses, missing = self.encoder.generate_reasoning(
            texts, max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature, top_p=self.top_p)
        close = len(self.encoder.tokenizer(self.encoder.prompts.reasoning_close, add_special_tokens=False)["input_ids"])
        ids, mask = self.encoder.pad([p + r for p, r in zip(prompts, responses)])
        sampled = torch.zeros_like(mask, dtype=torch.bool)
        for i, (p, r, miss) in enumerate(zip(prompts, responses, missing)):
            sampled[i, len(p): len(p) + len(r) - (close if miss else 0)] = True
        cap = self.max_new_tokens or self.encoder.max_reasoning_tokens
        lengths = sampled.sum(1)
        return {"texts": texts, "input_ids": ids, "attention_mask": mask, "sampled": sampled,
                "missing": torch.tensor(missing), "capped": (lengths >= cap) & torch.tensor(missing),
                "lengths": lengths, "responses": responses}

    def _forward(self, r: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings [R, d], per-token log-probs [R, T] of the sampled tokens, and their logits [n, V]."""
        emb, logits = self.encoder.embed_and_response_logits(r["input_ids"], r["attention_mask"], r["sampled"])
        targets = r["input_ids"][r["sampled"]]
        token_logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        logp = torch.zeros(r["sampled"].shape, dtype=token_logp.dtype, device=token_logp.device)
        logp = logp.masked_scatter(r["sampled"], token_logp)
        return emb, logp, logits

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> Tensor:
        env = self.env
        assert env is not None, "the environment is built in on_train_start"
        positives = [env.positions(p) for p in batch["positives"] for _ in range(self.group_size)]
        r = self.rollout(batch["query"])
        env.set_step(self.global_step)  # model version = optimizer steps taken
        emb, logp, logits = self._forward(r)
        old_logp = logp.detach()
        stats = env.step_refresh(emb.detach(), positives)
        rewards = self.rollout_rewards(emb.detach(), positives, r["missing"]).to(self.device)
        advantages = group_advantages(rewards, self.group_size, self.scale_rewards)
        for epoch in range(self.inner_epochs):
            if epoch:
                emb, logp, logits = self._forward(r)
            terms = self.losses(r, emb, logp, old_logp, logits, advantages, positives)
            total = terms["policy"] + self.kl_weight * terms["kl"] + self.embed_weight * terms["embed"]
            self.optimizers().zero_grad()
            self.manual_backward(total)
            self.optimizer_step_now()
        self._log_step(r, rewards, advantages, terms, total, stats)
        self.last_rollouts = [(t, self.encoder.tokenizer.decode(resp), float(rw))
                              for t, resp, rw in zip(r["texts"], r["responses"], rewards)]
        if self.probe_every and (self.global_step % self.probe_every == 0):
            self._probe()
        return total.detach()

    def losses(self, r: dict[str, Any], emb: Tensor, logp: Tensor, old_logp: Tensor, logits: Tensor,
               advantages: Tensor, positives: list[list[int]]) -> dict[str, Tensor]:
        """The three terms, unweighted (``policy``, ``kl``, ``embed``)."""
        terms = {"policy": clipped_policy_loss(logp, old_logp, advantages, r["sampled"], self.clip_eps)}
        if self.kl_weight:
            with torch.no_grad(), self.encoder.lm.disable_adapter():
                _, ref_logits = self.encoder.embed_and_response_logits(r["input_ids"], r["attention_mask"], r["sampled"])
            terms["kl"] = token_kl(logits, ref_logits, self.encoder.kl_targets(r["input_ids"][r["sampled"]]))
        else:
            terms["kl"] = logits.new_zeros(())
        if self.embed_weight:
            idx, ok, relevant = self.env.candidates(emb.detach(), positives)
            docs = self.env.vectors[idx].to(emb.device)
            weights = advantages.clamp(min=0) if self.embed_advantage_weighted else None
            terms["embed"] = multi_positive_info_nce(emb, docs, relevant.to(emb.device), ok.to(emb.device), self.tau,
                                                     weights)
        else:
            terms["embed"] = emb.new_zeros(())
        return terms

    def _log_step(self, r: dict[str, Any], rewards: Tensor, advantages: Tensor, terms: dict[str, Tensor],
                  total: Tensor, stats: Any) -> None:
        groups = rewards.view(-1, self.group_size)
        n = rewards.numel()
        metrics = {
            "train/reward_mean": float(rewards.mean()), "train/reward_std": float(rewards.std()) if n > 1 else 0.0,
            "train/reward_ge_0.5": float((rewards >= 0.5).float().mean()),
            "train/zero_advantage_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
            "train/policy_loss": float(terms["policy"]), "train/kl": float(terms["kl"]),
            "train/embed_loss": float(terms["embed"]), "train/loss": float(total),
            "train/reasoning_tokens": float(r["lengths"].float().mean()),
            "train/format_failure_rate": float(r["missing"].float().mean()),
            "train/length_cap_rate": float(r["capped"].float().mean()),
            "train/advantage_abs_mean": float(advantages.abs().mean()),
        }
        metrics.update(stats.metrics("env/"))
        self.log_dict(metrics, batch_size=n)
        # Also averaged per epoch: with a few queries per step the step values are noisy, the epoch
        # mean over the same queries shows whether the reward rises.
        self.log("train/reward", metrics["train/reward_mean"], prog_bar=True, batch_size=n, on_step=True, on_epoch=True)

    def _probe(self) -> None:
        dm = self.trainer.datamodule
        texts = [q for task in dm.validation.tasks for q in task.queries.values()]
        probe = self.env.fidelity_probe(self.encoder.encode_queries(texts), k=10)
        self.log_dict(probe.metrics("env/probe_"))

    def rollout_rewards(self, emb: Tensor, positives: list[list[int]], missing: Tensor) -> Tensor:
        """Per trajectory: retrieval reward in the environment, with the format rule for ``missing`` ones."""
        assert self.env is not None, "the environment is built in on_train_start"
        missing = missing.cpu().bool()
        if self.format_penalty is None:
            return self.env.reward(emb, positives, k=self.reward_k, kind=self.reward_kind, valid=~missing,
                                   failure_reward=self.failure_reward)
        return self.env.reward(emb, positives, k=self.reward_k, kind=self.reward_kind) - self.format_penalty * missing.float()

    # ------------------------------------------------------------------ validation extras
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        dm = self.trainer.datamodule
        queries = [q for task in dm.validation.tasks for q in task.queries.values()][: self.sample_texts]
        out = self.encoder.reason(queries) if queries else None
        lines = [f"# step {self.global_step}: greedy reasoning on held-out queries"]
        if out is not None:
            for q, text, miss in zip(queries, out.texts, out.missing_embed_token.tolist()):
                lines += [f"## query: {q}", text + ("  [embed token appended]" if miss else ""), ""]
        lines.append("# last training rollouts (query, response, reward)")
        for q, resp, rw in self.last_rollouts[: self.sample_texts * self.group_size]:
            lines += [f"## {q} (reward {rw:.3f})", resp, ""]
        if self.env is not None:
            lines.append(f"# environment staleness (steps since encoding -> documents): {self.env.staleness()}")
        self._write_artifact("\n".join(lines), f"reasoning/step_{self.global_step:06d}.txt")

    def _write_artifact(self, text: str, name: str) -> None:
        """MLflow text artifact when an MLflow logger is attached, else a file beside the adapters."""
        logger = self.logger
        if logger is not None and type(logger).__name__ == "MLFlowLogger":
            logger.experiment.log_text(logger.run_id, text, name)
            return
        path = Path(self.adapter_dir).parent / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
