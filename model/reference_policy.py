"""The frozen reference policy both training stages take their KL against.

It is the model with its trainable adapter switched off: in Stage 1 the base model (with the embed-token
row it was given), in Stage 2 the Stage-1 policy, which was merged into the weights under the new LoRA
(see :class:`~search_r3.model.embedding_lm.EmbeddingLM`). One object gives both stages the reference's
forward, its output head and the positions the KL is taken on, so no stage reaches into the peft model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from search_r3.model.embedding_lm import EmbeddingLM


class ReferencePolicy:
    """The reference of ``model`` (``model.reference``)."""

    def __init__(self, model: EmbeddingLM) -> None:
        self.model = model

    @contextmanager
    def active(self) -> Iterator[None]:
        """No gradient, no dropout, the trainable adapter off: inside, the model *is* the reference."""
        with torch.no_grad(), self.model.eval_mode(), self.model.lm.disable_adapter():
            yield

    def response_hidden(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
        """The reference's final hidden states at the positions that predict the masked response tokens
        (as :meth:`EmbeddingLM.embed_and_response_hidden <search_r3.model.embedding_lm.EmbeddingLM.embed_and_response_hidden>`)."""
        with self.active():
            return self.model.embed_and_response_hidden(input_ids, attention_mask, response_mask)[1]

    def logits(self, hidden: Tensor) -> Tensor:
        """The reference's output projection: where the output row of the embed token is untied and
        trained, the reference keeps its own."""
        with self.model.lm.disable_adapter():
            return self.model.output_head(hidden)

    def kl_mask(self, targets: Tensor) -> Tensor:
        """Mask of the response targets on which a KL to the reference is taken: all but the embed token.

        The reference was never trained to write the token, so its probability there stays that of a
        fresh row. Penalising the divergence on that one position fights the very thing the LM loss (and
        RL's format reward) teaches: with Stage 1's equal weights, -log p + KL is minimised near
        p(token) = 0.06, which is where our first runs' LM loss stalled (3.2 nats per token)."""
        return targets != self.model.embed_token_id
