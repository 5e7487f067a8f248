"""Ranking rewards for RL rollouts: how well one query embedding ranks its relevant documents.

Written here rather than through ir-measures on purpose: a reward is computed for every rollout of
every step on small candidate sets, as tensors, and it has a continuous variant that is not an IR
metric. The evaluation path (``evaluation/metrics.py``) stays on ir-measures; a test checks that the
``"ndcg"`` reward equals ir-measures' nDCG@k on the same ranking.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

RewardKind = Literal["ndcg", "scaled_dcg"]


def dcg_reward(scores: Tensor, relevant: Tensor, k: int = 10, kind: RewardKind = "ndcg") -> Tensor:
    """Per-row reward in [0, 1] from candidate scores ``[R, C]`` and a relevance mask ``[R, C]``.

    ``ndcg``: binary-gain nDCG@k of the ranking by score (1 when the positives fill the top ranks).
    ``scaled_dcg``: each hit's gain is scaled by its cosine mapped to [0, 1], ``(1 + cos) / 2``, and the
    sum is divided by the ideal binary DCG: continuous in the embedding (our reading of the paper's
    "DCG_scaled"), still 1 only for positives at the top with cosine 1.
    Rows with no relevant candidate get 0.
    """
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevant.shape)} differ")
    k = min(k, scores.shape[1])
    top, order = scores.topk(k, dim=1)
    hits = relevant.gather(1, order).float()
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float32, device=scores.device))
    gains = hits if kind == "ndcg" else hits * ((1 + top.float().clamp(-1, 1)) / 2)
    dcg = (gains * discount).sum(1)
    n_rel = relevant.sum(1).clamp(max=k)
    ideal = torch.cumsum(discount, 0)[(n_rel - 1).clamp(min=0)] * (n_rel > 0)
    return torch.where(n_rel > 0, dcg / ideal.clamp(min=1e-12), torch.zeros_like(dcg))
