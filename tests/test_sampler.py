"""Reasoning rollouts sample the distribution RL scores: the full softmax at the temperature by default
(transformers would otherwise truncate to its default top-50), and, with ``top_k``/``top_p`` on, the same
truncated and renormalised distribution on both sides."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from search_r3.lightning_modules.losses import chunked_token_scores, sampling_log_softmax

QUERY = "who wrote Hamlet?"
DRAWS = 6000


def _first_token_distribution(model, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scored probabilities of the first reasoning token, the final hidden state that predicts it)."""
    prompt = torch.tensor([model.reasoning_prompt_ids([QUERY])[0]])
    with torch.no_grad():
        hidden = model.lm(input_ids=prompt, output_hidden_states=True).hidden_states[-1][0, -1:]
        logits = model.lm.get_output_embeddings()(hidden)
    return sampling_log_softmax(logits, temperature, top_k, top_p).exp()[0], hidden


def _draws(model, temperature: float, top_k: int, top_p: float) -> Counter[int]:
    torch.manual_seed(0)
    gen = model.reasoner.generate([QUERY], max_new_tokens=1, do_sample=True, temperature=temperature,
                                   copies=DRAWS, top_k=top_k, top_p=top_p)
    return Counter(stop if stop is not None else response[0] for response, stop in zip(gen.responses, gen.stop_tokens))


def _total_variation(counts: Counter[int], probs: torch.Tensor) -> tuple[float, float]:
    """(observed TV distance of the draws to ``probs``, the TV that sampling noise alone gives on average)."""
    empirical = torch.zeros_like(probs)
    for token, n in counts.items():
        empirical[token] = n / DRAWS
    observed = 0.5 * float((empirical - probs).abs().sum())
    noise = 0.5 * float(torch.sqrt(2 * probs * (1 - probs) / (math.pi * DRAWS)).sum())
    return observed, noise


def test_default_sampling_draws_the_full_scored_distribution(tiny_lm) -> None:
    probs, _ = _first_token_distribution(tiny_lm, 1.0, 0, 1.0)
    top50 = set(probs.topk(50).indices.tolist())
    outside = 1.0 - float(probs[list(top50)].sum())
    assert outside > 0.3, "the tiny model must put real mass outside any top-50 for this test to mean anything"
    counts = _draws(tiny_lm, 1.0, 0, 1.0)
    observed, noise = _total_variation(counts, probs)
    assert observed < 1.5 * noise + 0.01, (observed, noise)
    drawn_outside = sum(n for token, n in counts.items() if token not in top50) / DRAWS
    assert abs(drawn_outside - outside) < 0.03 and len(counts) > 50


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.3)])
def test_truncated_sampling_is_scored_under_the_same_truncation(tiny_lm, top_k: int, top_p: float) -> None:
    probs, hidden = _first_token_distribution(tiny_lm, 1.0, top_k, top_p)
    support = set(probs.nonzero().flatten().tolist())
    counts = _draws(tiny_lm, 1.0, top_k, top_p)
    assert set(counts) <= support and 1 < len(support) < probs.numel()
    observed, noise = _total_variation(counts, probs)
    assert observed < 1.5 * noise + 0.01, (observed, noise)
    # RL's per-token scoring of a drawn token is the log of that truncated, renormalised probability.
    head = tiny_lm.lm.get_output_embeddings()
    token = max(counts, key=counts.get)
    scores = chunked_token_scores(hidden, head, torch.tensor([token]), 1.0, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(scores.logp.exp(), probs[token:token + 1])
    assert torch.isfinite(scores.entropy).all()
