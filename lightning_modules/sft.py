"""``SFTContrastiveModule``: Stage 1 — teach the instruct model to emit ``<|embed_token|>`` and shape its state.

Loss = w_lm·LM + w_kl·KL + w_nce·InfoNCE + w_tri·triplet (the paper's plain sum by default, each term
logged on its own):

- LM: next-token cross-entropy on the assistant response of queries and documents
  ("The embedding is <|embed_token|>", ending at the token: see ``EmbeddingLM.direct_training_ids``)
  — the model must learn to write the token;
- KL(policy ‖ reference) per response token but the embed token (``EmbeddingLM.kl_targets``); the
  reference is the same model with the LoRA adapter disabled, so no second copy sits in memory;
- InfoNCE over cosine/τ: every query against all positives and hard negatives of the batch, minus the
  batch documents its qrels call relevant (``ContrastiveDataModule.mask_known_positives``);
- triplet margin (cosine distance) over (query, positive, hardest of its own negatives).

With ``cached: true`` the embedding losses go through GradCache (:func:`cached_embedding_loss`): the
batch (and so the number of negatives) is no longer bounded by activation memory, only by time.
Optimisation is manual so that both paths share one loop; checkpoints hold only the trainable
parameters (LoRA + token row), and the best adapter by validation nDCG@10 is saved where
``search-r3 test`` loads it (``EmbeddingLM(adapter=...)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from search_r3.lightning_modules.adapter_training import AdapterTrainingModule
from search_r3.model.embedding_lm import EmbeddingLM
from search_r3.lightning_modules.losses import (
    cached_embedding_loss,
    info_nce_loss,
    response_lm_loss,
    token_kl,
    triplet_margin_loss,
)



class SFTContrastiveModule(AdapterTrainingModule):
    """Args:
        encoder: the shared wrapper, with ``lora`` set (only LoRA + the token row train).
        lm_weight / kl_weight / nce_weight / triplet_weight: loss weights (1, 1, 1, 1 = the paper's sum).
        tau: InfoNCE temperature (0.05: common for LLM embedders; the paper's value is unknown).
        margin: triplet margin on the cosine distance (0.2).
        cached: GradCache for the embedding losses; ``chunk_size`` rows per re-embedding chunk.
        lr / weight_decay / warmup_steps / gradient_clip / adapter_dir / token_lr: see
            :class:`AdapterTrainingModule`.
    """

    def __init__(self, encoder: EmbeddingLM, lm_weight: float = 1.0, kl_weight: float = 1.0, nce_weight: float = 1.0,
                 triplet_weight: float = 1.0, tau: float = 0.05, margin: float = 0.2, cached: bool = False,
                 chunk_size: int = 8, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 10,
                 gradient_clip: float = 1.0, adapter_dir: str = "runs/sft/adapter", token_lr: float | None = None) -> None:
        super().__init__(encoder, lr, weight_decay, warmup_steps, gradient_clip, adapter_dir, token_lr=token_lr)
        self.weights = {"lm": lm_weight, "kl": kl_weight, "nce": nce_weight, "triplet": triplet_weight}
        self.tau, self.margin, self.cached, self.chunk_size = tau, margin, cached, chunk_size

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "collator"):
            datamodule.collator.encoder = self.encoder  # tokenise with exactly the model's prompts

    # ------------------------------------------------------------------ losses
    def _lm_and_kl(self, side: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
        """Embeddings, LM loss and KL of one batch side, and its number of response tokens."""
        emb, logits = self.encoder.embed_and_response_logits(side["input_ids"], side["attention_mask"],
                                                             side["response_mask"])
        targets = side["input_ids"][side["response_mask"]]
        every = torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
        lm = response_lm_loss(logits, targets, every)
        kl = logits.new_zeros(())
        if self.weights["kl"]:
            with torch.no_grad(), self.encoder.lm.disable_adapter():
                _, ref = self.encoder.embed_and_response_logits(side["input_ids"], side["attention_mask"],
                                                                side["response_mask"])
            kl = token_kl(logits, ref, self.encoder.kl_targets(targets))
        return emb, lm, kl, int(targets.shape[0])

    def _embedding_losses(self, q: Tensor, d: Tensor, num_negatives: int, exclude: Tensor | None) -> dict[str, Tensor]:
        b = q.shape[0]
        positives = torch.arange(b, device=q.device)
        out = {"nce": info_nce_loss(q, d, positives, self.tau, exclude=exclude)}
        if num_negatives > 0:
            negs = d[b:].view(b, num_negatives, -1)
            out["triplet"] = triplet_margin_loss(q, d[:b], negs, self.margin)
        else:
            out["triplet"] = q.new_zeros(())
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.optimizers().zero_grad()
        k = batch["num_negatives"]
        if self.cached:
            terms = self._cached_step(batch, k)
        else:
            q, lm_q, kl_q, n_q = self._lm_and_kl(batch["queries"])
            d, lm_d, kl_d, n_d = self._lm_and_kl(batch["documents"])
            terms = {"lm": (lm_q * n_q + lm_d * n_d) / (n_q + n_d), "kl": (kl_q * n_q + kl_d * n_d) / (n_q + n_d)}
            terms.update(self._embedding_losses(q, d, k, batch.get("exclude")))
            total = sum(self.weights[name] * value for name, value in terms.items())
            self.manual_backward(total)
        self.optimizer_step_now()
        terms = {name: value.detach() for name, value in terms.items()}
        total = sum(self.weights[name] * float(value) for name, value in terms.items())
        self.log_dict({f"train/{name}": float(v) for name, v in terms.items()}, batch_size=len(batch["queries"]["input_ids"]))
        self.log("train/loss", total, prog_bar=True, batch_size=len(batch["queries"]["input_ids"]))
        if "exclude" in batch:  # known positives of a query that sat in the batch as another row's document
            self.log("train/masked_negatives", float(batch["exclude"].sum()), batch_size=len(batch["queries"]["input_ids"]))
        return torch.tensor(total)

    def _cached_step(self, batch: dict[str, Any], k: int) -> dict[str, Tensor]:
        """Embedding losses through GradCache; the LM and KL terms of each chunk ride on its re-embedding
        forward (one graph pass per chunk, not two)."""
        sides = [batch["queries"], batch["documents"]]
        chunks = [{key: v[i : i + self.chunk_size] for key, v in side.items()}
                  for side in sides for i in range(0, side["input_ids"].shape[0], self.chunk_size)]
        n_total = sum(int(c["response_mask"].sum()) for c in chunks)
        sums = {"lm": 0.0, "kl": 0.0}
        b = batch["queries"]["input_ids"].shape[0]
        parts: dict[str, Tensor] = {}

        def loss_fn(reps: Tensor) -> Tensor:
            losses = self._embedding_losses(reps[:b], reps[b:], k, batch.get("exclude"))
            parts.update({name: v.detach() for name, v in losses.items()})
            return sum(self.weights[name] * v for name, v in losses.items())

        def embed(chunk: dict[str, Tensor]) -> Tensor:
            return self.encoder.embed_at_token(chunk["input_ids"], chunk["attention_mask"])

        def embed_with_lm(chunk: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            emb, lm, kl, n = self._lm_and_kl(chunk)
            sums["lm"] += float(lm.detach()) * n
            sums["kl"] += float(kl.detach()) * n
            # token-weighted, so the chunk sum equals the full-batch token mean
            return emb, (self.weights["lm"] * lm + self.weights["kl"] * kl) * (n / n_total)

        cached_embedding_loss(embed, chunks, loss_fn, backward=self.manual_backward, embed_with_loss=embed_with_lm)
        return {"lm": torch.tensor(sums["lm"] / n_total), "kl": torch.tensor(sums["kl"] / n_total), **parts}
