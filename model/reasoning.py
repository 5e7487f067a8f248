"""Reasoning mode: the model writes an analysis of the query, then the embed token.

:class:`Reasoner` samples (or greedily decodes) the analysis (:mod:`search_r3.model.sampling`),
fixes up the format where the model never wrote the embed token, measures what the analysis is, and reads
the embedding from a re-forward of the whole sequence. It *returns* what it wrote (one
:class:`ReasoningRecord` per query) instead of keeping a log on the model: an evaluation collects the
records of the queries it encoded, and a training step gets its rollouts' token layout
(:class:`Generated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from search_r3.model.analysis_measures import AnalysisMeasures, measure_analysis, strip_closing_tail, strip_templates
from search_r3.model.sampling import decode, row_generators

if TYPE_CHECKING:
    from search_r3.model.embedding_lm import EmbeddingLM


@dataclass
class Generated:
    """Sampled reasoning, per row: the prompt ids, the response ids (ending with the embed token, appended
    by the format fix-up where ``missing``), and the stop token the model sampled where it ended its turn
    without the embed token (``None`` where it emitted the token or hit the length cap)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    missing: list[bool]
    stop_tokens: list[int | None]
    analysis_tokens: list[int]
    measures: list[AnalysisMeasures]  # what each analysis is (see search_r3.model.analysis_measures)


@dataclass(frozen=True)
class ReasoningRecord:
    """One reasoning-mode query as encoded: what the model wrote before its embedding. Kept for every
    query so a result can say how much reasoning there was and show it (MLflow tables)."""

    query: str
    analysis: str
    tokens: int  # analysis tokens, without any template phrase (0: nothing but "The embedding is" and the token)
    appended: bool  # the model never wrote the embed token within the budget; it was appended
    measures: AnalysisMeasures | None = None


@dataclass
class ReasoningOutput:
    """What reasoning mode produced for a batch of queries.

    ``input_ids``/``attention_mask`` hold the full right-padded sequences (prompt + analysis + embed
    token) that the embeddings were read from, and ``prompt_lengths`` where each response starts, so
    that a policy-gradient step can score exactly these tokens.
    """

    embeddings: Tensor  # [B, d] fp32, unit norm
    texts: list[str]  # the generated analysis, without the closing sentence ("The embedding is ...")
    missing_embed_token: Tensor  # [B] bool: the model never emitted the token; it was appended
    analysis_tokens: Tensor  # [B] generated tokens before the closing sentence (0: no analysis at all)
    input_ids: Tensor
    attention_mask: Tensor
    prompt_lengths: Tensor  # [B]
    records: list[ReasoningRecord]  # one per query, in order


def close_response(
    generated: list[int], embed_token_id: int, stop_ids: set[int], close_ids: list[int]
) -> tuple[list[int], bool, int | None]:
    """Cut a generated row right after its first embed token; if there is none, cut at the first
    stop/pad token (or keep the capped row) and append ``close_ids``.

    Returns (response, appended, the stop token cut at: ``None`` when the row emitted the embed token or
    ran to the cap). RL scores that stop token: it is the sampled action that failed the format."""
    if embed_token_id in generated:
        return generated[: generated.index(embed_token_id) + 1], False, None
    cut = next((i for i, t in enumerate(generated) if t in stop_ids), len(generated))
    return generated[:cut] + close_ids, True, generated[cut] if cut < len(generated) else None


class Reasoner:
    """Reasoning mode of one :class:`~search_r3.model.embedding_lm.EmbeddingLM` (``model.reasoner``).

    Holds no state but the tokenised closing phrase: every call returns what it produced."""

    def __init__(self, model: EmbeddingLM) -> None:
        self.model = model
        self._close_ids: list[int] | None = None

    @property
    def close_ids(self) -> list[int]:
        """Token ids of ``prompts.reasoning_close`` (the fix-up appended to a trajectory without the
        token), tokenised once: every rollout needs them."""
        if self._close_ids is None:
            self._close_ids = self.model.tokenizer(self.model.prompts.reasoning_close,
                                                   add_special_tokens=False)["input_ids"]
        return self._close_ids

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def analysis_length(self, written: list[int]) -> int:
        """How many of the tokens a model wrote before its embed token are analysis: the tokens of what is
        left once every template phrase ("The embedding is", anywhere, any case) is removed.

        Those words are the response format, not reasoning. Counted, a collapsed policy that answers
        every query with "The embedding is <|embed_token|>" (direct mode under another prompt) would be
        reported as writing 4 tokens of reasoning, and "The embedding is X. The embedding is Y" would meet
        ``min_reasoning_tokens`` with the format. Matched on decoded text, so any split of the words into
        tokens is found (:mod:`search_r3.model.analysis_measures`)."""
        own = strip_templates(self.model.tokenizer.decode(written, skip_special_tokens=False), self.model.prompts)
        return self.count_tokens(own) if own else 0

    def generate(
        self,
        texts: Sequence[str],
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        copies: int = 1,
        share_prefill: bool = True,
        top_k: int = 0,
        seeds: Sequence[int] | None = None,
    ) -> Generated:
        """Write an analysis for each query (greedy, or sampled with ``do_sample``), closed by the embed
        token (see :class:`Generated`). All queries and copies decode together in one loop
        (:func:`~search_r3.model.sampling.decode`).

        Sampling draws from ``softmax(logits / temperature)`` over the whole vocabulary unless ``top_k``
        (> 0) or ``top_p`` (< 1) truncates it: :func:`~search_r3.model.sampling.sampling_log_softmax`, the
        distribution the RL losses score. ``seeds`` (one per row) gives every row its own random stream,
        so a row's tokens do not depend on the rows beside it; without them rows draw from torch's global
        stream.

        ``copies`` samples each query that many times (rows ``i * copies ... (i + 1) * copies - 1``
        belong to query ``i``), as GRPO's groups need. With ``share_prefill`` each prompt is run through
        the model once and its key/value cache repeated for the copies, instead of prefilling every copy
        again: the same computation, the prompt's FLOPs paid once per query instead of G times.
        """
        model, tokenizer = self.model, self.model.tokenizer
        if any(not t.strip() for t in texts):
            raise ValueError("reasoning mode got an empty query")
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        unique = model.reasoning_prompt_ids(texts)
        prompts = [p for p in unique for _ in range(copies)]
        stops = {model.embed_token_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        ids, mask = model.pad(unique if share_prefill else prompts, side="left")
        with model.inference():
            generators = row_generators(seeds, ids.device) if seeds is not None and do_sample else None
            new = decode(model.lm, ids, mask, copies if share_prefill else 1,
                         max_new_tokens or model.max_reasoning_tokens, stops, tokenizer.pad_token_id,
                         do_sample, temperature, top_k, top_p, generators)
        close_ids = self.close_ids
        finished = [close_response(row, model.embed_token_id, stops | {tokenizer.pad_token_id}, close_ids)
                    for row in new]
        responses = [r for r, _, _ in finished]
        missing = [m for _, m, _ in finished]
        stop_tokens = [s for _, _, s in finished]
        written = [tokenizer.decode(r[: len(r) - (len(close_ids) if m else 1)], skip_special_tokens=False)
                   for r, m in zip(responses, missing)]
        queries = [t for t in texts for _ in range(copies)]
        measures = [measure_analysis(w, q, self.count_tokens, model.prompts, capped=m and s is None)
                    for w, q, m, s in zip(written, queries, missing, stop_tokens)]
        return Generated(prompts, responses, missing, stop_tokens, [m.tokens for m in measures], measures)

    def reason(self, texts: Sequence[str], **generation: object) -> ReasoningOutput:
        """Generate, then re-forward the full sequence and read the embed token.

        The re-forward (instead of one extra cached decoding step) gives exactly the hidden state a
        training step will see for the same tokens, which the RL stage relies on."""
        model = self.model
        gen = self.generate(texts, **generation)  # type: ignore[arg-type]
        ids, mask = model.pad([p + r for p, r in zip(gen.prompts, gen.responses)])
        with model.inference():
            emb = model.embed_at_token(ids, mask).cpu()
        # the analysis as written: the response less the embed token and a closing sentence at its end
        close = len(self.close_ids)
        analyses = [strip_closing_tail(model.tokenizer.decode(resp[: len(resp) - (close if miss else 1)],
                                                              skip_special_tokens=False), model.prompts)
                    for resp, miss in zip(gen.responses, gen.missing)]
        records = [ReasoningRecord(q, a, n, m, measures) for q, a, n, m, measures
                   in zip(texts, analyses, gen.analysis_tokens, gen.missing, gen.measures)]
        return ReasoningOutput(
            embeddings=emb,
            texts=analyses,
            missing_embed_token=torch.tensor(gen.missing),
            analysis_tokens=torch.tensor(gen.analysis_tokens),
            input_ids=ids,
            attention_mask=mask,
            prompt_lengths=torch.tensor([len(p) for p in gen.prompts]),
            records=records,
        )

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> tuple[Tensor, list[ReasoningRecord]]:
        """Reasoning-mode embeddings ``[len(texts), d]`` (fp32, CPU) in input order, and what the model wrote
        for each query."""
        batch_size = batch_size or self.model.batch_size
        outputs = [self.reason(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)]
        if not outputs:
            return torch.empty((0, self.model.hidden_size)), []
        return torch.cat([o.embeddings for o in outputs]), [r for o in outputs for r in o.records]
