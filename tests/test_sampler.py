"""Reasoning rollouts sample the distribution RL scores: the full softmax at the temperature by default
(transformers would otherwise truncate to its default top-50), and, with ``top_k``/``top_p`` on, the same
truncated and renormalised distribution on both sides."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from search_r3.lightning_modules.losses import chunked_token_scores
from search_r3.model.sampling import sampling_log_softmax

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


def test_a_seeded_row_samples_the_same_tokens_alone_or_in_any_batch(tiny_lm_dir) -> None:
    """Every query of an RL batch and its G copies decode together, each row from its own random stream:
    a row's tokens must not depend on the rows beside it (fp32), or a rollout would change with the batch,
    the rank or a resume. Drawing from one shared stream instead (as ``generate`` does) fails this."""
    from search_r3.model.embedding_lm import EmbeddingLM

    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", max_reasoning_tokens=8, show_progress=False)
    queries = ["Who wrote Hamlet?", "vitamin D deficiency in elderly patients", "do statins cause diabetes"]
    copies = 2
    seeds = {q: [1000 * i + c for c in range(copies)] for i, q in enumerate(queries)}

    def sample(batch: list[str]) -> list[list[int]]:
        torch.manual_seed(123)  # the global stream, which seeded rows must not read
        gen = model.reasoner.generate(batch, do_sample=True, temperature=1.3, copies=copies,
                                      seeds=[s for q in batch for s in seeds[q]])
        return gen.responses

    alone = {q: sample([q]) for q in queries}
    for batch in (queries, queries[::-1], queries[1:]):
        assert sample(batch) == [row for q in batch for row in alone[q]], batch
    assert len({tuple(r) for rows in alone.values() for r in rows}) > 1  # the streams differ


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_lm_dir) -> None:
    """Rows that stop are dropped from the decode batch (and its cache): fewer rows are forwarded, and
    every row's tokens are still exactly those it samples alone (fp32). Keeping finished rows in the batch
    forwards ``rows x longest`` rows and fails the count."""
    from search_r3.model.embedding_lm import EmbeddingLM
    from search_r3.model.sampling import decode, row_generators

    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False)
    ids, mask = model.pad(model.reasoning_prompt_ids(["Who wrote Hamlet?", "do statins cause diabetes"]), side="left")
    copies, steps = 4, 12
    stops = set(range(0, model.tokenizer.vocab_size, 9))  # about one token in nine stops a row: rows end at various steps
    seeds = list(range(2 * copies))
    forwarded: list[int] = []
    hook = model.lm.register_forward_pre_hook(lambda _m, _a, kw: forwarded.append(kw["input_ids"].shape[0]),
                                              with_kwargs=True)
    with torch.no_grad():
        together = decode(model.lm, ids, mask, copies, steps, stops, model.tokenizer.pad_token_id, do_sample=True,
                          temperature=1.5, generators=row_generators(seeds, ids.device))
        decode_rows = sum(forwarded[1:])  # after the prefill
        hook.remove()
        alone = [decode(model.lm, ids[q : q + 1], mask[q : q + 1], 1, steps, stops, model.tokenizer.pad_token_id,
                        do_sample=True, temperature=1.5, generators=row_generators([seeds[q * copies + c]], ids.device))[0]
                 for q in range(2) for c in range(copies)]
    assert together == alone
    lengths = [len(r) for r in together]
    assert min(lengths) < max(lengths)  # rows did end at different steps
    # a row is forwarded once after each token it writes but its last: with 8 rows, one finished row is
    # enough to compact, so the count is exact
    assert decode_rows == sum(n - 1 for n in lengths), (decode_rows, lengths)
