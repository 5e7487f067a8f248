"""``RLModule``: Stage 2 — GRPO over reasoning rollouts, rewarded by retrieval in the environment.

Per step, for B queries the policy samples G reasoning trajectories each (reasoning mode, ending in
``<|embed_token|>``); one forward pass gives every trajectory's token log-probabilities and its
embedding at the token. The environment is refreshed selectively around those embeddings (see
:mod:`search_r3.environment.env`), each embedding is rewarded by how it ranks the query's positives, and

    loss = policy (GRPO) + β · KL(policy ‖ reference) + λ · InfoNCE(rollout embeddings)

Our choices where the paper is silent, each with its reason, are the rows of ``docs/design.md`` (GRPO
policy loss, advantage baseline, analysis measures, format reward, KL, memory). In short: the reference
is where Stage 2 starts (the Stage-1 adapter merged, a fresh LoRA on top, so KL is 0 at step 0);
updates are strictly on-policy and without dropout; log-probs are those of the distribution sampled
(temperature, and ``top_k``/``top_p`` truncation only when set); ``loss_norm`` averages as published
(``grpo``, ``dapo``, ``dr_grpo``) or over informative groups only (``sequence``, ``token``,
``constant``), with β·KL per token inside it (``kl_placement``); ``advantage_baseline: direct`` pays a
rollout against its query's direct embedding; policy tokens are the sampled ones (a failed trajectory
keeps the stop token it sampled, the appended fix-up gets no gradient); logits are projected in
checkpointed chunks (:func:`~search_r3.lightning_modules.losses.chunked_token_scores`); λ · InfoNCE of
each rollout embedding against its environment candidates moves the embedding directly (λ = 0: pure
GRPO); a trajectory failing the format gets ``failure_reward`` or, with ``format_penalty``, its retrieval
reward minus the penalty; ``min_reasoning_tokens`` guards against reasoning collapsing to the format.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from search_r3.environment import ExactIndex, HNSWIndex, RefreshPolicy, RetrievalEnvironment
from search_r3.environment.rewards import RewardKind
from search_r3.common.distributed import gather_objects, sum_over_ranks, world_and_rank
from search_r3.lightning_modules.adapter_training import AdapterTrainingModule
from search_r3.lightning_modules.losses import (
    INFORMATIVE_ONLY,
    KLEstimator,
    LossNorm,
    TokenScores,
    aggregate_tokens,
    chunked_token_scores,
    grpo_policy_loss,
    group_advantages,
    direct_advantages,
    informative_groups,
    masked_token_mean,
    multi_positive_info_nce,
    policy_rows,
    reference_token_logp,
)
from search_r3.model.embedding_lm import EmbeddingLM
from search_r3.lightning_modules.rollout import Rollout, lay_out

log = logging.getLogger(__name__)


def _stream_seed(seed: int, step: int, query_id: str) -> int:
    return int(hashlib.sha256(f"{seed}|{step}|{query_id}".encode()).hexdigest()[:15], 16)


class EpochMeans:
    """Per-epoch means of per-step telemetry that a checkpoint carries, so a resumed epoch reports all
    of its steps.

    Lightning's ``on_epoch`` aggregation starts empty in every process: an epoch that spans a resume
    reported only the steps after it (the claim run's first epoch read steps 60-99 of 0-99). The step
    values added here are already means over every rank, weighted by the step's rollouts, so all ranks
    hold the same sums and rank 0's checkpoint restores every rank. Sums of another epoch (a checkpoint
    taken on an epoch's last step) are dropped when the next epoch adds its first step.
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, epoch: int, values: dict[str, float], weight: float) -> None:
        if epoch != self.epoch:
            self.epoch, self.sums, self.weight = epoch, {}, 0.0
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weight += weight

    def means(self) -> dict[str, float]:
        return {key: total / self.weight for key, total in self.sums.items()} if self.weight else {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "sums": dict(self.sums), "weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.sums, self.weight = int(state["epoch"]), dict(state["sums"]), float(state["weight"])


class RLModule(AdapterTrainingModule):
    """Args:
        encoder: the shared wrapper loading the Stage-1 adapter with new ``lora`` settings (Stage 1 is
            merged and frozen as the reference; a fresh LoRA trains on top).
        group_size: trajectories per query (G).
        temperature / top_k / top_p / max_new_tokens: sampling of the trajectories; ``top_k: 0`` and
            ``top_p: 1.0`` (defaults) sample the full distribution (``max_new_tokens`` ``None``: the
            encoder's cap).
        loss_norm: how the policy term averages over tokens: ``grpo``, ``dapo``, ``dr_grpo`` (as published),
            or their informative-groups-only variants ``sequence``, ``token``, ``constant``.
        kl_placement: ``per_token`` (β·KL inside the policy normalisation, TRL) or ``token_mean`` (a
            separate mean over policy tokens); ``None``: per_token for the published norms.
        kl_estimator: ``exact`` (KL over the vocabulary) or ``k3`` (GRPO's sample estimator).
        logit_chunk_rows: response positions projected to the vocabulary at a time (peak memory); None =
            all at once, logits kept for backward (the unchunked baseline).
        kl_weight: β. embed_weight: λ (0 = pure GRPO). embed_advantage_weighted: weight InfoNCE rows by
            max(advantage, 0). tau: InfoNCE temperature.
        scale_rewards: divide advantages by the group's std; ``None``: not for ``dr_grpo``, else yes.
        advantage_baseline: ``group`` (GRPO: the group's mean) or ``direct`` (each rollout's reward minus
            that of its query's direct-mode embedding under the current policy, unscaled; see
            :func:`~search_r3.lightning_modules.losses.direct_advantages`).
        reward_kind / reward_k: ``ndcg`` or ``scaled_dcg`` at cut-off k. failure_reward: reward of a
            trajectory that fails the format. format_penalty: if set, such a trajectory is rewarded by its
            (fixed-up) embedding's retrieval minus this instead (``failure_reward`` unused).
        min_reasoning_tokens: analyses shorter than this fail the format (0: any analysis, even none).
        refresh: the environment's refresh policy. index: ``exact`` or ``hnsw``.
        shard_environment: under DDP each rank keeps 1/N of the document vectors, searched by a sharded
            top-k (same rewards as replicated; see :mod:`search_r3.environment.env`). A checkpoint then
            names per-rank block files, which each rank writes to ``environment/`` beside ``adapter_dir``.
        environment_dtype: storage dtype of the document vectors (``bfloat16``/``float16`` halve them).
        probe_every: steps between fidelity probes on the validation queries (``None`` = never; each
            probe encodes the whole environment corpus once).
        sample_texts: held-out queries whose greedy reasoning is written per validation.
        samples_every: steps between tables of training rollouts (query, reasoning, reward) in MLflow.
        lr / weight_decay / warmup_steps / gradient_clip / adapter_dir: see :class:`AdapterTrainingModule`.
        val_modes: query modes scored at validation (the first selects the adapter).
        seed: base of the per-query sampling streams (see :meth:`rollout`).
    """

    def __init__(self, encoder: EmbeddingLM, group_size: int = 4, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int | None = None, loss_norm: LossNorm = "grpo",
                 kl_weight: float = 0.04, kl_estimator: KLEstimator = "exact", logit_chunk_rows: int | None = 1024,
                 embed_weight: float = 0.1, embed_advantage_weighted: bool = False,
                 tau: float = 0.05, scale_rewards: bool | None = None, reward_kind: RewardKind = "ndcg", reward_k: int = 10,
                 failure_reward: float = 0.0, format_penalty: float | None = None, min_reasoning_tokens: int = 0,
                 refresh: RefreshPolicy | None = None, index: Literal["exact", "hnsw"] = "exact",
                 probe_every: int | None = None, sample_texts: int = 4, samples_every: int = 8,
                 lr: float = 1e-5, weight_decay: float = 0.0, warmup_steps: int = 0, gradient_clip: float = 1.0,
                 adapter_dir: str = "runs/rl/adapter", val_modes: list[Literal["direct", "reasoning"]] | None = None,
                 seed: int = 0, top_k: int = 0,
                 kl_placement: Literal["per_token", "token_mean"] | None = None,
                 advantage_baseline: Literal["group", "direct"] = "group", shard_environment: bool = False,
                 environment_dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> None:
        super().__init__(encoder, lr, weight_decay, warmup_steps, gradient_clip, adapter_dir,
                         val_modes or ["reasoning", "direct"])
        if group_size < 2:
            raise ValueError("group_size must be at least 2: GRPO's advantage compares rollouts of one query")
        if temperature <= 0:
            raise ValueError("temperature must be positive: GRPO samples its rollouts")
        if top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 (0: off) and top_p in (0, 1] (1: off), got {top_k}, {top_p}")
        self.group_size, self.temperature, self.top_p, self.max_new_tokens = group_size, temperature, top_p, max_new_tokens
        self.top_k = top_k
        self.loss_norm, self.kl_estimator, self.logit_chunk_rows = loss_norm, kl_estimator, logit_chunk_rows
        self.kl_weight, self.embed_weight, self.embed_advantage_weighted, self.tau = \
            kl_weight, embed_weight, embed_advantage_weighted, tau
        if scale_rewards is None:
            scale_rewards = loss_norm != "dr_grpo"
        if kl_placement is None:
            kl_placement = "token_mean" if loss_norm in INFORMATIVE_ONLY else "per_token"
        self.kl_placement = kl_placement
        if advantage_baseline not in ("group", "direct"):
            raise ValueError(f"advantage_baseline must be 'group' or 'direct', got {advantage_baseline!r}")
        self.advantage_baseline = advantage_baseline
        self.scale_rewards, self.reward_kind, self.reward_k, self.failure_reward = \
            scale_rewards, reward_kind, reward_k, failure_reward
        self.format_penalty, self.min_reasoning_tokens = format_penalty, min_reasoning_tokens
        self.refresh_policy = refresh or RefreshPolicy()
        self.index_kind = index
        self.shard_environment, self.environment_dtype = shard_environment, getattr(torch, environment_dtype)
        self.probe_every, self.sample_texts, self.samples_every = probe_every, sample_texts, samples_every
        self.env: RetrievalEnvironment | None = None
        self._saved_env: dict[str, Any] | None = None
        self.last_rollouts: list[tuple[str, str, float]] = []
        self.seed = seed
        self.rollout_stats = torch.nn.ModuleDict({key: MeanMetric(dist_sync_on_step=True) for key in (
            "reward", "reward_ge_0_5", "format_failure_rate", "missing_token_rate", "zero_variance_groups",
            "entropy", "reasoning_tokens", "empty_reasoning_rate", "copies_query_rate", "begins_with_closing_rate",
            "capped_rate", "beats_direct_rate", "margin_over_direct")})
        self.epoch_means = EpochMeans()

    @property
    def cap(self) -> int:
        return self.max_new_tokens or self.encoder.max_reasoning_tokens

    # ------------------------------------------------------------------ environment
    def build_environment(self, texts: list[str], doc_ids: list[str],
                          state: dict[str, Any] | None = None) -> RetrievalEnvironment:
        """Index the corpus with the current weights (a full encode: the only one unless the policy asks),
        or, resuming, with the stale vectors the checkpoint saved (``state``)."""
        index = HNSWIndex() if self.index_kind == "hnsw" else ExactIndex()
        self.env = RetrievalEnvironment(texts, self.encoder.encode_documents, self.refresh_policy, index, doc_ids,
                                        shard=self.shard_environment, storage_dtype=self.environment_dtype)
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
            # Every rank calls this (Lightning dumps on all ranks, rank 0 writes): replicated, rank 0's copy
            # equals every rank's; sharded, each rank writes its block to a file the checkpoint names.
            # Each rank restores its part.
            folder = Path(self.adapter_dir).parent / "environment" if self.env.shard else None
            checkpoint["environment"] = self.env.state_dict(folder)
        checkpoint["epoch_means"] = self.epoch_means.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._saved_env = checkpoint.get("environment")
        if "epoch_means" in checkpoint:
            self.epoch_means.load_state_dict(checkpoint["epoch_means"])

    # ------------------------------------------------------------------ rollouts
    def rollout(self, queries: list[str], query_ids: list[str] | None = None) -> Rollout:
        """Sample G trajectories per query and lay them out for one training forward pass.

        All queries of the batch and their G copies decode together (:mod:`search_r3.model.sampling`), each
        row drawing from its own random stream, seeded by (``seed``, step, query id, copy): a rollout then
        does not depend on which other queries share the batch or the rank, so a run on N processes samples
        what one process samples for the same global batch, and a resumed run what the uninterrupted one
        sampled.

        ``policy`` marks the positions whose token the policy chose (``targets`` holds it: the sampled
        token, or, where a failed trajectory's fix-up text starts, the stop token it sampled there)."""
        texts = [q for q in queries for _ in range(self.group_size)]
        ids_of = query_ids or queries
        seeds = [_stream_seed(self.seed, self.global_step, f"{qid}#{copy}")
                 for qid in ids_of for copy in range(self.group_size)]
        gen = self.encoder.reasoner.generate(queries, copies=self.group_size, max_new_tokens=self.max_new_tokens,
                                             do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                             top_k=self.top_k, seeds=seeds)
        return lay_out(gen, texts, self.encoder, self.min_reasoning_tokens)

    def _forward(self, r: Rollout) -> tuple[Tensor, Tensor, TokenScores]:
        """Embeddings [R, d], per-token log-probs [R, T] of the policy tokens at the sampling temperature
        (0 elsewhere), and the per-token scores of those n tokens (log-prob, KL to the reference when
        ``kl_weight`` is on, entropy), projected to the vocabulary in chunks."""
        targets = r.targets[r.policy]
        head, policy_ref = self.encoder.output_head, self.encoder.reference
        reference, reference_head = None, None
        if self.kl_weight:  # the reference: once per rollout batch, no gradient, no dropout
            ref_hidden = policy_ref.response_hidden(r.input_ids, r.attention_mask, r.policy)
            if self.kl_estimator == "k3":
                with torch.no_grad():
                    reference = reference_token_logp(ref_hidden, policy_ref.logits, targets, self.temperature,
                                                     self.logit_chunk_rows)
            else:
                reference, reference_head = ref_hidden, policy_ref.logits
        with self.encoder.eval_mode():  # no dropout: see the module docstring
            emb, hidden = self.encoder.embed_and_response_hidden(r.input_ids, r.attention_mask, r.policy)
            tokens = chunked_token_scores(hidden, head, targets, self.temperature, reference, reference_head,
                                          self.kl_estimator, self.logit_chunk_rows, self.top_k, self.top_p)
        logp = torch.zeros(r.policy.shape, dtype=tokens.logp.dtype, device=tokens.logp.device)
        logp = logp.masked_scatter(r.policy, tokens.logp)
        return emb, logp, tokens


    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> Tensor:
        env = self.env
        assert env is not None, "the environment is built in on_train_start"
        positives = [env.positions(p) for p in batch["positives"] for _ in range(self.group_size)]
        r = self.rollout(batch["query"], batch.get("query_id"))
        env.set_step(self.global_step)  # model version = optimizer steps taken
        # Forward *and* backward without dropout: with gradient checkpointing, backward recomputes the
        # forward, which must see the same deterministic model (see EmbeddingLM.eval_mode).
        with self.encoder.eval_mode():
            emb, logp, tokens = self._forward(r)
            direct = self.direct_embeddings(batch["query"]) if self.advantage_baseline == "direct" else None
            query_positives = positives[:: self.group_size]
            touched = emb.detach() if direct is None else torch.cat([emb.detach(), direct])
            stats = env.step_refresh(touched, positives + (query_positives if direct is not None else []))
            rewards = self.rollout_rewards(r, emb.detach(), positives).to(self.device)
            if direct is None:
                advantages = group_advantages(rewards, self.group_size, self.scale_rewards)
            else:
                r.direct_rewards = self.direct_rewards(direct, query_positives).to(self.device)
                advantages = direct_advantages(rewards, r.direct_rewards, self.group_size)
            terms = self.losses(r.policy, emb, logp, tokens, advantages, positives, rewards)
            total = terms["policy"] + self.kl_weight * terms["kl"] + self.embed_weight * terms["embed"]
            self.optimizers().zero_grad()
            # Each term is this rank's share of the global mean (normalised by counts summed over ranks);
            # DDP averages gradients, so the world size restores the sum: N processes compute one
            # process's step.
            self.manual_backward(world_and_rank()[0] * total)
        self.optimizer_step_now()
        terms = {name: torch.tensor(sum_over_ranks(float(v.detach()), self.device)) for name, v in terms.items()}
        total = terms["policy"] + self.kl_weight * terms["kl"] + self.embed_weight * terms["embed"]
        self._log_step(r, rewards, advantages, terms, total, stats, tokens.entropy)
        self.last_rollouts = [(t, self.encoder.tokenizer.decode(resp), float(rw))
                              for t, resp, rw in zip(r.texts, r.responses, rewards)]
        if self.samples_every and self.global_step % self.samples_every == 0:
            self._log_samples()
        if self.probe_every and (self.global_step % self.probe_every == 0):
            self._probe()
        return total.detach()

    def losses(self, policy: Tensor, emb: Tensor, logp: Tensor, tokens: TokenScores, advantages: Tensor,
               positives: list[list[int]], rewards: Tensor) -> dict[str, Tensor]:
        """The three terms, unweighted (``policy``, ``kl``, ``embed``); ``policy`` is the rollouts' policy-token
        mask (:attr:`Rollout.policy`)."""
        # a group whose rewards are all equal still carries signal against a direct baseline
        informative = informative_groups(rewards, self.group_size) | (advantages != 0)
        reduce = lambda count: sum_over_ranks(count, self.device)  # noqa: E731  (identity on one process)
        terms = {"policy": grpo_policy_loss(logp, advantages, policy, informative, self.loss_norm, self.cap,
                                            reduce=reduce)}
        if not self.kl_weight:
            terms["kl"] = logp.new_zeros(())
        elif self.kl_placement == "per_token":  # β·KL per token, inside the policy term's normalisation
            kl = torch.zeros(policy.shape, dtype=tokens.kl.dtype, device=tokens.kl.device)
            kl = kl.masked_scatter(policy, tokens.kl)
            terms["kl"] = aggregate_tokens(kl, policy, policy_rows(policy, informative, self.loss_norm),
                                           self.loss_norm, self.cap, reduce)
        else:
            terms["kl"] = masked_token_mean(tokens.kl, reduce)
        if self.embed_weight:
            idx, ok, relevant = self.env.candidates(emb.detach(), positives)
            docs = self.env.vectors_at(idx).to(emb.device)
            weights = advantages.clamp(min=0) if self.embed_advantage_weighted else None
            terms["embed"] = multi_positive_info_nce(emb, docs, relevant.to(emb.device), ok.to(emb.device), self.tau,
                                                     weights, reduce=reduce)
        else:
            terms["embed"] = emb.new_zeros(())
        return terms

    @torch.no_grad()
    def direct_embeddings(self, queries: list[str]) -> Tensor:
        """The current policy's direct-mode embeddings of the step's queries (one forward, no sampling):
        the baseline an analysis must beat under ``advantage_baseline: direct``."""
        ids, mask = self.encoder.pad(self.encoder.direct_prompt_ids(queries, "query"))
        return self.encoder.embed_at_token(ids, mask).detach()

    def direct_rewards(self, direct: Tensor, positives: list[list[int]]) -> Tensor:
        """Per query: the retrieval reward of its direct-mode embedding in the environment."""
        assert self.env is not None, "the environment is built in on_train_start"
        return self.env.reward(direct, positives, k=self.reward_k, kind=self.reward_kind)

    def rollout_rewards(self, r: Rollout, emb: Tensor, positives: list[list[int]]) -> Tensor:
        """Per trajectory: retrieval reward in the environment, with the format rule for failed ones."""
        assert self.env is not None, "the environment is built in on_train_start"
        failed = r.format_failed.cpu().bool()
        if self.format_penalty is None:
            return self.env.reward(emb, positives, k=self.reward_k, kind=self.reward_kind, valid=~failed,
                                   failure_reward=self.failure_reward)
        return self.env.reward(emb, positives, k=self.reward_k, kind=self.reward_kind) - self.format_penalty * failed.float()

    # ------------------------------------------------------------------ telemetry
    def _log_step(self, r: Rollout, rewards: Tensor, advantages: Tensor, terms: dict[str, Tensor],
                  total: Tensor, stats: Any, entropy: Tensor) -> None:
        """Per step and, averaged, per epoch: what the paper reports of RL (the share of rewards >= 0.5)
        and what shows a run going wrong (format failures, reasoning length and collapse to no analysis,
        all-equal groups, KL, entropy)."""
        n = rewards.numel()
        length = r.analysis_tokens.float()
        # torchmetrics means: under DDP each step's value and each epoch's are over every rank's rollouts
        # (synchronised), not rank 0's alone.
        values = {
            "reward": rewards.float(),
            "reward_ge_0.5": (rewards >= 0.5).float(),
            "format_failure_rate": r.format_failed.float(),
            "missing_token_rate": r.missing.float(),
            "zero_variance_groups": 1.0 - informative_groups(rewards, self.group_size)[:: self.group_size].float(),
            "entropy": entropy,
            "reasoning_tokens": length,
            "empty_reasoning_rate": (length == 0).float(),
            # what the analyses are (search_r3.model.analysis_measures): copies of the query, template openers
            "copies_query_rate": r.copies_query.float(),
            "begins_with_closing_rate": r.begins_with_closing.float(),
            "capped_rate": r.capped.float(),
        }
        if r.direct_rewards is not None:  # does writing an analysis beat writing none, and by how much
            direct = r.direct_rewards.repeat_interleave(self.group_size).to(rewards.device)
            values["beats_direct_rate"] = (rewards > direct).float()
            values["margin_over_direct"] = (rewards - direct).float()
        step: dict[str, float] = {}
        for key, value in values.items():
            metric = self.rollout_stats[key.replace(".", "_")]
            step[key] = float(metric(value.to(self.device)))  # this step's mean over every rank's rollouts
            metric.reset()
        # already the mean over every rank's tokens (the loss normalises by the summed count)
        step["kl"] = float(terms["kl"])
        self.log("train/reward_step", step["reward"], batch_size=n, prog_bar=True)
        self.log_dict({f"train/{k}_step": v for k, v in step.items() if k != "reward"}, batch_size=n)
        self.epoch_means.add(self.current_epoch, step, weight=n * self.trainer.world_size)
        # Every rank's rollouts (one gather a step): these statistics are not means a metric can sync.
        parts = gather_objects((rewards.detach().float().cpu(), length.cpu(), r.capped.float().cpu(),
                                advantages.detach().float().abs().cpu()))
        all_rewards, all_length, all_capped, all_advantage = (torch.cat(column) for column in zip(*parts))
        per_step = {
            "train/reward_mean": float(all_rewards.mean()),
            "train/reward_std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
            "train/reasoning_tokens_p10": float(all_length.quantile(0.1)),
            "train/reasoning_tokens_p50": float(all_length.quantile(0.5)),
            "train/reasoning_tokens_p90": float(all_length.quantile(0.9)),
            "train/policy_loss": float(terms["policy"]), "train/embed_loss": float(terms["embed"]),
            "train/loss": float(total), "train/length_cap_rate": float(all_capped.mean()),
            "train/advantage_abs_mean": float(all_advantage.mean()),
        }
        per_step.update(stats.metrics("env/"))
        self.log_dict(per_step, batch_size=n)

    def on_train_epoch_end(self) -> None:
        self.log_dict({f"train/{k}_epoch": v for k, v in self.epoch_means.means().items()})

    def _log_samples(self) -> None:
        """The last rollouts as a table (query, reasoning, reward) that MLflow's UI shows."""
        if not self.trainer.is_global_zero or not self.last_rollouts:
            return
        self._write_table({"step": [self.global_step] * len(self.last_rollouts),
                           "query": [q for q, _, _ in self.last_rollouts],
                           "reasoning": [t for _, t, _ in self.last_rollouts],
                           "reward": [w for _, _, w in self.last_rollouts]},
                          f"rollouts/step_{self.global_step:06d}.json")

    def _probe(self) -> None:
        dm = self.trainer.datamodule
        texts = [q for task in dm.validation.tasks for q in task.queries.values()]
        probe = self.env.fidelity_probe(self.encoder.encode_queries(texts), k=10)
        self.log_dict(probe.metrics("env/probe_"))

    # ------------------------------------------------------------------ validation extras
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        dm = self.trainer.datamodule
        queries = [q for task in dm.validation.tasks for q in task.queries.values()][: self.sample_texts]
        if queries:
            out = self.encoder.reasoner.reason(queries)
            self._write_table({"step": [self.global_step] * len(queries), "query": queries, "analysis": out.texts,
                               "analysis_tokens": out.analysis_tokens.tolist(),
                               "embed_token_appended": out.missing_embed_token.tolist()},
                              f"reasoning/step_{self.global_step:06d}.json")
        if self.env is not None:
            staleness = self.env.staleness()
            self._write_table({"steps_since_encoding": list(staleness), "documents": list(staleness.values())},
                              f"environment/staleness_step_{self.global_step:06d}.json")

    def _write_table(self, table: dict[str, list], name: str) -> None:
        """An MLflow table (shown in the UI) when an MLflow logger is attached, else JSON beside the adapters."""
        logger = self.logger
        if logger is not None and type(logger).__name__ == "MLFlowLogger":
            logger.experiment.log_table(logger.run_id, data=table, artifact_file=name)
            return
        path = Path(self.adapter_dir).parent / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
