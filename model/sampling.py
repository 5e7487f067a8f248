"""The one decode loop of reasoning mode: every query of a batch (and all G copies of each) decoded
together, each sampled row drawing from its own random stream.

Written here rather than through ``transformers``' ``generate`` because ``generate`` draws every row from
one global stream: a row's tokens then depend on which other rows share its batch, so RL had to decode each
query alone (one ``generate`` per query) to keep a query's rollouts the same on any rank, in any batch and
after a resume. Here a row draws only from its own ``torch.Generator`` (seeded by the caller, e.g. from
seed, step, query id and copy), so the whole batch decodes in one loop with the key/value cache and the
prompt prefilled once per query, and a row's tokens do not depend on its neighbours (up to the numerics
of batched kernels: exactly, in fp32, for the models tested). The distribution sampled is
:func:`sampling_log_softmax`'s, the one the RL losses score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sampling_log_softmax(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Log-probs of the distribution the sampler draws from: ``logits / temperature``, then, if asked,
    top-k and top-p truncation renormalised, applied by transformers' own warpers in ``generate``'s
    order (temperature, top-k, top-p), so the scored policy is exactly the sampled one. Tokens cut off
    get ``-inf``."""
    scores = logits.float() / temperature
    if top_k or top_p < 1.0:
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
    return F.log_softmax(scores, dim=-1)


def row_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One random stream per row, on the device the logits live on."""
    return [torch.Generator(device=device).manual_seed(int(s) % (2**63)) for s in seeds]


def decode(lm: nn.Module, ids: Tensor, mask: Tensor, copies: int, max_new_tokens: int, stop_ids: set[int],
           pad_id: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generators: Sequence[torch.Generator] | None = None) -> list[list[int]]:
    """New tokens per row (``len(ids) * copies`` rows, a prompt's copies consecutive), each ending with the
    first stop token it wrote or at ``max_new_tokens``. Rows that have stopped leave the batch (once an
    eighth of it has), so the cost follows the live rows, not the longest one.

    ``ids``/``mask``: the left-padded prompts, once each; they are prefilled once and their cache repeated
    for the copies. Greedy unless ``do_sample``; sampled rows draw from ``generators[row]`` when given
    (one per row), else from torch's global stream. Call under ``torch.no_grad()``."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]
    if copies > 1:
        cache.batch_repeat_interleave(copies)
        logits, mask = logits.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
    rows = logits.shape[0]
    if generators is not None and len(generators) != rows:
        raise ValueError(f"{len(generators)} random streams for {rows} rows")
    next_position = mask.long().sum(-1, keepdim=True)
    written: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    alive = torch.arange(rows)  # the original row of each row still in the batch
    streams = list(generators) if generators is not None else None
    for step in range(max_new_tokens):
        tokens = _pick(logits, do_sample, temperature, top_k, top_p, streams).cpu()
        for i, r in enumerate(alive.tolist()):
            if not done[r]:
                written[r].append(int(tokens[i]))
                done[r] = int(tokens[i]) in stop_ids
        live = ~done[alive]
        if not bool(live.any()) or step == max_new_tokens - 1:
            break
        if int((~live).sum()) >= max(1, len(alive) // 8):
            # Drop finished rows from the batch (and their cache): at RL scale most rows stop well before
            # the cap, and decoding them on as padding would cost as much as the live ones. Not on every
            # finished row, as each drop copies the cache once.
            keep = live.nonzero().flatten()
            cache.batch_select_indices(keep.to(ids.device))
            mask, next_position, tokens = mask[keep.to(mask.device)], next_position[keep.to(mask.device)], tokens[keep]
            alive, live = alive[keep], live[keep]
            streams = [streams[i] for i in keep.tolist()] if streams is not None else None
        # a finished row still in the batch decodes pad tokens nobody reads: rows never attend to each other
        tokens = torch.where(live, tokens, torch.full_like(tokens, pad_id)).to(ids.device)
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        out = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position, cache=cache,
                 use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        next_position = next_position + 1
    return written


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
          generators: Sequence[torch.Generator] | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = sampling_log_softmax(logits, temperature, top_k, top_p).exp()
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])
