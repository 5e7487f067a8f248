"""Prompt templates: the one place where the chat prompts of search-r3 are defined.

Every stage (evaluation, SFT, RL) builds its token sequences through :class:`PromptTemplates`, so a
number measured with one prompt can never silently be compared with a model trained on another.
The strings follow the paper as far as it is known (``docs/paper_claims.yaml`` says from which sources);
the document prompt and the reasoning instruction are our choices, since the paper does not quote them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

EMBED_TOKEN = "<|embed_token|>"

Side = Literal["query", "document"]


@dataclass(frozen=True)
class PromptTemplates:
    """Chat-prompt strings, rendered with the tokenizer's own chat template (ChatML for SmolLM2).

    Args:
        query_system: system turn for queries (the paper's wording).
        document_system: system turn for passages; same shape as the query prompt (our choice).
        embed_response: the assistant turn in direct mode. Everything after the embed token is never
            fed to the model: with causal attention it cannot change the hidden state we read.
        reasoning_system: system turn in reasoning mode. It names the response format so that an
            instruction-tuned model has a chance to emit the token before any training.
        reasoning_close: appended after the generated analysis when the model stops (end of turn or
            the token cap) without emitting the embed token; the sample is then flagged.
        embed_token: the token whose hidden state is the embedding. Another string (a released
            checkpoint's own token) replaces ``<|embed_token|>`` in every prompt above.
    """

    query_system: str = "Please represent user queries."
    document_system: str = "Please represent documents."
    embed_response: str = f"The embedding is {EMBED_TOKEN}."
    reasoning_system: str = (
        "Please represent user queries. First briefly analyse what the query is looking for, "
        f"then finish with: The embedding is {EMBED_TOKEN}."
    )
    reasoning_close: str = f" The embedding is {EMBED_TOKEN}"
    embed_token: str = EMBED_TOKEN

    def __post_init__(self) -> None:
        if self.embed_token != EMBED_TOKEN:
            for name in ("embed_response", "reasoning_system", "reasoning_close"):
                object.__setattr__(self, name, getattr(self, name).replace(EMBED_TOKEN, self.embed_token))
        for name in ("embed_response", "reasoning_close"):
            if self.embed_token not in getattr(self, name):
                raise ValueError(f"PromptTemplates.{name} must contain {self.embed_token!r}: {getattr(self, name)!r}")

    def as_dict(self) -> dict[str, str]:
        """The strings, as saved with an adapter and hashed into :meth:`fingerprint`; the token is listed
        only when it is not the default, so adapters and caches from before the field keep their keys."""
        out = asdict(self)
        if out["embed_token"] == EMBED_TOKEN:
            del out["embed_token"]
        return out

    def system(self, side: Side) -> str:
        return self.query_system if side == "query" else self.document_system

    @property
    def closing_words(self) -> str:
        """The words before the embed token in ``reasoning_close`` ("The embedding is"): the format's
        closing sentence, not analysis. A response that is only these words and the token wrote none."""
        head, _, _ = self.reasoning_close.partition(self.embed_token)
        return head.strip()

    @property
    def embed_prefix(self) -> str:
        """The direct-mode assistant turn up to and including the embed token."""
        head, _, _ = self.embed_response.partition(self.embed_token)
        return head + self.embed_token

    def fingerprint(self) -> str:
        """Short stable hash: goes into cache keys and run parameters."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
