"""``SFTContrastiveModule``: Stage 1 — teach the instruct model to emit ``<|embed_token|>`` and shape its state.

Loss = w_lm·LM + w_kl·KL + w_nce·InfoNCE + w_tri·triplet (the paper's plain sum by default, each term
logged on its own):

- LM: next-token cross-entropy on the assistant response of queries and documents
  ("The embedding is <|embed_token|>", ending at the token: see ``EmbeddingLM.direct_training_ids``)
  — the model must learn to write the token;
- KL(policy ‖ reference) per response token but the embed token (``ReferencePolicy.kl_mask``); the
  reference is the same model with the LoRA adapter disabled, so no second copy sits in memory;
- InfoNCE over cosine/τ: every query against all positives and hard negatives of the global batch (all
  ranks: cross-device negatives), minus the batch documents its qrels call relevant
  (``ContrastiveDataModule.mask_known_positives``);
- triplet margin (cosine distance) over (query, positive, hardest of its own negatives).

With ``cached: true`` the embedding losses go through GradCache (:func:`cached_embedding_loss`): the
batch (and so the number of negatives) is no longer bounded by activation memory, only by time.
Optimisation is manual so that both paths share one loop; checkpoints hold only the trainable
parameters (LoRA + token row), and the best adapter by validation nDCG@10 is saved where
``search-r3 test`` loads it (``EmbeddingLM(adapter=...)``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from search_r3.datamodules.contrastive import known_positive_mask
from search_r3.lightning_modules.adapter_training import AdapterTrainingModule
from search_r3.common.distributed import gather_objects, gather_with_grad, sum_over_ranks
from search_r3.lightning_modules.losses import (
    cached_embedding_loss,
    chunked_token_scores,
    info_nce_loss,
    masked_token_mean,
    triplet_margin_loss,
)
from search_r3.model.embedding_lm import EmbeddingLM


class SFTContrastiveModule(AdapterTrainingModule):
    """Args:
        encoder: the shared wrapper, with ``lora`` set (only LoRA + the token row train).
        lm_weight / kl_weight / nce_weight / triplet_weight: loss weights (1, 1, 1, 1 = the paper's sum).
        tau: InfoNCE temperature (0.05: common for LLM embedders; the paper's value is unknown).
        margin: triplet margin on the cosine distance (0.2).
        cached: GradCache for the embedding losses; ``chunk_size`` rows per re-embedding chunk.
        logit_chunk_rows: response positions projected to the vocabulary at a time (peak memory), as
            in :class:`~search_r3.lightning_modules.rl.RLModule`; None = all at once.
        lr / weight_decay / warmup_steps / gradient_clip / adapter_dir / token_lr: see
            :class:`AdapterTrainingModule`.
    """

    def __init__(self, encoder: EmbeddingLM, lm_weight: float = 1.0, kl_weight: float = 1.0, nce_weight: float = 1.0,
                 triplet_weight: float = 1.0, tau: float = 0.05, margin: float = 0.2, cached: bool = False,
                 chunk_size: int = 8, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 10,
                 gradient_clip: float = 1.0, adapter_dir: str = "runs/sft/adapter", token_lr: float | None = None,
                 logit_chunk_rows: int | None = 1024) -> None:
        super().__init__(encoder, lr, weight_decay, warmup_steps, gradient_clip, adapter_dir, token_lr=token_lr)
        self.logit_chunk_rows = logit_chunk_rows
        self.weights = {"lm": lm_weight, "kl": kl_weight, "nce": nce_weight, "triplet": triplet_weight}
        self.tau, self.margin, self.cached, self.chunk_size = tau, margin, cached, chunk_size
        self._relevant: dict[str, set[str]] | None = None
        self._masked = 0.0

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "collator"):
            datamodule.collator.encoder = self.encoder  # tokenise with exactly the model's prompts
            self._relevant = datamodule.collator.relevant  # the known-positive mask of the global batch

    # ------------------------------------------------------------------ losses
    def _lm_and_kl(self, side: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
        """Embeddings, LM loss and KL of one batch side, and its number of response tokens.

        Token log-probs and the exact KL come from the RL stage's chunked projection
        (:func:`~search_r3.lightning_modules.losses.chunked_token_scores`): one computation of both
        for both stages, and never a whole [tokens, vocabulary] block of logits at paper scale."""
        emb, hidden = self.encoder.embed_and_response_hidden(side["input_ids"], side["attention_mask"],
                                                             side["response_mask"])
        targets = side["input_ids"][side["response_mask"]]
        policy_ref = self.encoder.reference
        reference = None
        if self.weights["kl"]:
            reference = policy_ref.response_hidden(side["input_ids"], side["attention_mask"], side["response_mask"])
        tokens = chunked_token_scores(hidden, self.encoder.output_head, targets, 1.0, reference,
                                      policy_ref.logits, "exact", self.logit_chunk_rows)
        lm = masked_token_mean(-tokens.logp)
        kl = masked_token_mean(tokens.kl[policy_ref.kl_mask(targets)]) if reference is not None else lm.new_zeros(())
        return emb, lm, kl, int(targets.shape[0])

    def _global_embedding_losses(self, q: Tensor, d: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """InfoNCE and triplet over the *global* batch: every rank's queries against every rank's documents.

        Each rank gathers all embeddings (its own rows keep their gradient, see
        :func:`~search_r3.common.distributed.gather_with_grad`), places each query's positive and
        negatives by its rank's offset in the gathered documents, and builds the known-positive mask over
        the global batch from the gathered ids. With one process this is the local batch."""
        k = batch["num_negatives"]
        q_all, q_sizes = gather_with_grad(q)
        d_all, d_sizes = gather_with_grad(d)
        positive, negatives = [], []
        d_offset = 0
        for n_q, n_d in zip(q_sizes, d_sizes):
            rows = torch.arange(n_q)
            positive.append(d_offset + rows)
            negatives.append(d_offset + n_q + rows[:, None] * k + torch.arange(k))
            d_offset += n_d
        positive_index = torch.cat(positive).to(q.device)
        if len(q_sizes) == 1:
            exclude = batch.get("exclude")
        else:
            query_ids = [i for ids in gather_objects(batch["query_ids"]) for i in ids]
            doc_ids = [i for ids in gather_objects(batch["doc_ids"]) for i in ids]
            exclude = known_positive_mask(query_ids, doc_ids, positive_index.tolist(), self._relevant or {})
        if exclude is not None:
            exclude = exclude.to(q.device)
            self._masked = float(exclude.sum())
        out = {"nce": info_nce_loss(q_all, d_all, positive_index, self.tau, exclude=exclude)}
        if k > 0:
            out["triplet"] = triplet_margin_loss(q_all, d_all[positive_index], d_all[torch.cat(negatives).to(q.device)],
                                                 self.margin)
        else:
            out["triplet"] = q.new_zeros(())
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One optimizer step on the global batch.

        Under DDP every rank computes the embedding losses of the whole global batch and its share of the
        token-mean LM and KL (its token sums over the global token count); the objective it backpropagates
        is that times the world size, because DDP averages the ranks' gradients. The sum over ranks is then
        exactly the gradient one process computes on the global batch (the equivalence test checks it)."""
        self.optimizers().zero_grad()
        self._masked = 0.0
        world = self.trainer.world_size
        if self.cached:
            terms = self._cached_step(batch, world)
        else:
            q, lm_q, kl_q, n_q = self._lm_and_kl(batch["queries"])
            d, lm_d, kl_d, n_d = self._lm_and_kl(batch["documents"])
            n_all = sum_over_ranks(n_q + n_d, q.device)
            lm_sum, kl_sum = lm_q * n_q + lm_d * n_d, kl_q * n_q + kl_d * n_d
            terms = {"lm": lm_sum / n_all, "kl": kl_sum / n_all}  # this rank's share of the global means
            terms.update(self._global_embedding_losses(q, d, batch))
            self.manual_backward(world * sum(self.weights[name] * value for name, value in terms.items()))
            terms["lm"] = torch.tensor(sum_over_ranks(float(lm_sum.detach()), q.device) / n_all)
            terms["kl"] = torch.tensor(sum_over_ranks(float(kl_sum.detach()), q.device) / n_all)
        self.optimizer_step_now()
        terms = {name: value.detach() for name, value in terms.items()}
        total = sum(self.weights[name] * float(value) for name, value in terms.items())
        rows = len(batch["queries"]["input_ids"])
        self.log_dict({f"train/{name}": float(v) for name, v in terms.items()}, batch_size=rows)
        self.log("train/loss", total, prog_bar=True, batch_size=rows)
        # known positives of a query that sat in the global batch as another row's document
        self.log("train/masked_negatives", self._masked, batch_size=rows)
        return torch.tensor(total)

    def _cached_step(self, batch: dict[str, Any], world: int) -> dict[str, Tensor]:
        """Embedding losses through GradCache; the LM and KL terms of each chunk ride on its re-embedding
        forward (one graph pass per chunk, not two). Under DDP the chunk backwards accumulate locally and
        only the last one synchronises: one gradient all-reduce per step, not one per chunk."""
        sides = [batch["queries"], batch["documents"]]
        chunks = [{key: v[i : i + self.chunk_size] for key, v in side.items()}
                  for side in sides for i in range(0, side["input_ids"].shape[0], self.chunk_size)]
        n_local = sum(int(c["response_mask"].sum()) for c in chunks)
        n_all = sum_over_ranks(n_local, batch["queries"]["input_ids"].device)
        sums = {"lm": 0.0, "kl": 0.0}
        b = batch["queries"]["input_ids"].shape[0]
        parts: dict[str, Tensor] = {}

        def loss_fn(reps: Tensor) -> Tensor:
            losses = self._global_embedding_losses(reps[:b], reps[b:], batch)
            parts.update({name: v.detach() for name, v in losses.items()})
            return world * sum(self.weights[name] * v for name, v in losses.items())

        def embed(chunk: dict[str, Tensor]) -> Tensor:
            return self.encoder.embed_at_token(chunk["input_ids"], chunk["attention_mask"])

        def embed_with_lm(chunk: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            emb, lm, kl, n = self._lm_and_kl(chunk)
            sums["lm"] += float(lm.detach()) * n
            sums["kl"] += float(kl.detach()) * n
            # token-weighted over the global token count, so the chunk sums over all ranks equal the
            # global token mean
            return emb, world * (self.weights["lm"] * lm + self.weights["kl"] * kl) * (n / n_all)

        backward_calls = [0]

        def backward(loss: Tensor) -> None:
            backward_calls[0] += 1
            if backward_calls[0] < len(chunks):
                # ParallelStrategy only (DDP's no_sync); one process has nothing to block
                with getattr(self.trainer.strategy, "block_backward_sync", nullcontext)():
                    self.manual_backward(loss)
            else:
                self.manual_backward(loss)

        cached_embedding_loss(embed, chunks, loss_fn, backward=backward, embed_with_loss=embed_with_lm)
        device = batch["queries"]["input_ids"].device
        return {"lm": torch.tensor(sum_over_ranks(sums["lm"], device) / n_all),
                "kl": torch.tensor(sum_over_ranks(sums["kl"], device) / n_all), **parts}
