"""One Stage-2 step's rollouts laid out for a single training forward pass.

:func:`lay_out` turns the sampled trajectories (:class:`~search_r3.model.reasoning.Generated`) into
right-padded token ids with the mask of the positions the policy chose: the sampled tokens and, where a
trajectory ended its turn without the embed token, the stop token it sampled there (the fix-up text
appended after it is not the policy's). Everything the losses and the telemetry read travels in one
typed :class:`Rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from search_r3.model.embedding_lm import EmbeddingLM
from search_r3.model.reasoning import Generated


@dataclass
class Rollout:
    """R = queries x G rows (a query's G copies consecutive)."""

    texts: list[str]  # the query of each row
    input_ids: Tensor  # [R, T] prompt + response, right-padded
    attention_mask: Tensor  # [R, T]
    policy: Tensor  # [R, T] bool: positions whose token (``targets``) the policy chose
    targets: Tensor  # [R, T] the chosen tokens: ``input_ids`` but the sampled stop token where a fix-up starts
    missing: Tensor  # [R] bool: no embed token written; the fix-up appended it
    capped: Tensor  # [R] bool: ran to the length cap (missing, and no stop token sampled)
    analysis_tokens: Tensor  # [R] analysis length without template phrases
    responses: list[list[int]]  # response ids per row (for the samples table)
    copies_query: Tensor  # [R] bool: the analysis mostly copies the query
    begins_with_closing: Tensor  # [R] bool: the analysis opens with the closing phrase's words
    format_failed: Tensor  # [R] bool: missing, or shorter than ``min_reasoning_tokens``
    direct_rewards: Tensor | None = None  # [queries] reward of each query's direct embedding (direct baseline)


def lay_out(gen: Generated, texts: list[str], encoder: EmbeddingLM, min_reasoning_tokens: int) -> Rollout:
    """The training layout of sampled trajectories (see the module docstring)."""
    close = len(encoder.reasoner.close_ids)
    ids, mask = encoder.pad([p + r for p, r in zip(gen.prompts, gen.responses)])
    policy = torch.zeros_like(mask, dtype=torch.bool)
    targets = ids.clone()
    for i, (p, r, miss, stop) in enumerate(zip(gen.prompts, gen.responses, gen.missing, gen.stop_tokens)):
        end = len(p) + len(r) - (close if miss else 0)  # end of what was sampled before any fix-up
        policy[i, len(p): end] = True
        if stop is not None:  # the turn ended here: the sampled stop token is the action to score
            policy[i, end] = True
            targets[i, end] = stop
    analysis_len = torch.tensor(gen.analysis_tokens)  # without the closing words (Reasoner.analysis_length)
    missing = torch.tensor(gen.missing)
    return Rollout(texts=texts, input_ids=ids, attention_mask=mask, policy=policy, targets=targets, missing=missing,
                   capped=missing & torch.tensor([s is None for s in gen.stop_tokens]),
                   analysis_tokens=analysis_len, responses=gen.responses,
                   copies_query=torch.tensor([m.copies_query for m in gen.measures]),
                   begins_with_closing=torch.tensor([m.begins_with_closing for m in gen.measures]),
                   format_failed=missing | (analysis_len < min_reasoning_tokens))
