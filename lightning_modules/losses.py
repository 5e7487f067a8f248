"""Every training loss of search-r3, in one module: Stage 1's LM, KL, InfoNCE and triplet terms (with
GradCache for big batches), and Stage 2's GRPO policy term, its advantages (group or direct baseline) and
normalisers, which reuse the token scores, the KL and a multi-positive InfoNCE.

Conventions: embeddings are unit-norm, so cosine = dot product; temperature ``tau`` divides the
cosine (``tau = 0.05`` is sentence-transformers' ``scale = 20``). Token-level terms take a boolean
``mask`` selecting the positions that count (assistant-response tokens), already aligned with the
logits that predict them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from search_r3.model.sampling import sampling_log_softmax


def info_nce_loss(queries: Tensor, documents: Tensor, positive_index: Tensor, tau: float = 0.05,
                  exclude: Tensor | None = None) -> Tensor:
    """InfoNCE over cosine/τ with the positive in the denominator (the paper's formula).

    Args:
        queries: ``[B, d]`` unit-norm query embeddings.
        documents: ``[N, d]`` unit-norm candidates: every query's positive and hard negatives, so each
            query also sees the other queries' documents (in-batch negatives).
        positive_index: ``[B]`` row of ``documents`` holding each query's positive.
        exclude: optional ``[B, N]`` bool, True where a document is known to be relevant to the query
            but is not its positive (another row's positive that the qrels also judge relevant here).
            Such a document is dropped from that query's denominator instead of being pushed away as a
            negative; a query's own positive is never excluded.

    Requirements: no document may appear twice in ``documents`` (a duplicate of a query's positive
    would be counted as its negative); the training batch sampler guarantees it.
    """
    logits = queries @ documents.T / tau
    if exclude is not None:
        keep_positive = torch.zeros_like(exclude)
        keep_positive[torch.arange(exclude.shape[0], device=exclude.device), positive_index] = True
        logits = logits.masked_fill(exclude & ~keep_positive, float("-inf"))
    return F.cross_entropy(logits, positive_index)


def triplet_margin_loss(queries: Tensor, positives: Tensor, negatives: Tensor, margin: float = 0.2) -> Tensor:
    """mean(max(0, d(q, p) − d(q, n) + margin)) with the cosine distance d = 1 − cos.

    ``negatives`` is ``[B, d]`` (one negative per query, usually the hardest) or ``[B, K, d]``, in which
    case the hardest (most similar) of the K is used.
    """
    if negatives.ndim == 3:
        sims = torch.einsum("bd,bkd->bk", queries, negatives)
        negatives = negatives[torch.arange(queries.shape[0], device=queries.device), sims.argmax(dim=1)]
    return F.triplet_margin_with_distance_loss(
        queries, positives, negatives, distance_function=lambda a, b: 1 - F.cosine_similarity(a, b), margin=margin
    )


KLEstimator = Literal["exact", "k3"]


@dataclass
class TokenScores:
    """Per-token quantities of a batch of response tokens, all ``[n]``.

    ``logp``: log-probability of each target token (with gradient); ``kl``: KL(policy ‖ reference) at
    that position (with gradient; zeros without a reference); ``entropy``: policy entropy (no gradient)."""

    logp: Tensor
    kl: Tensor
    entropy: Tensor


def chunked_token_scores(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor,
                         temperature: float = 1.0, reference: Tensor | None = None,
                         reference_head: Callable[[Tensor], Tensor] | None = None,
                         estimator: KLEstimator = "exact", chunk_rows: int | None = 1024,
                         top_k: int = 0, top_p: float = 1.0) -> TokenScores:
    """Token log-probs, KL and entropy from final hidden states, never holding more than ``chunk_rows``
    positions × vocabulary of logits at once (a selective log-softmax).

    Why our own: at paper scale the response tokens of one RL batch times Qwen2.5's 151,936-word
    vocabulary are tens of GB in fp32. Each chunk projects its hidden states to logits, takes what the
    losses need and drops the logits; under autograd the chunk is checkpointed, so backward recomputes
    its logits instead of keeping them.

    Args:
        hidden: ``[n, d]`` policy hidden states at the positions that predict ``targets``.
        head: the output projection (hidden → logits).
        targets: ``[n]`` token ids.
        temperature / top_k / top_p: the sampler's distribution (:func:`sampling_log_softmax`); under
            truncation the entropy and the exact KL are those of the truncated policy (0·log 0 = 0), the
            reference staying the full distribution at the temperature.
        reference: for ``estimator="exact"``, ``[n, d]`` reference hidden states (their logits are
            recomputed per chunk through ``reference_head``); for ``"k3"``, ``[n]`` reference log-probs
            of the targets (see :func:`reference_token_logp`). None: no KL.
        estimator: ``exact`` = KL over the whole vocabulary (no variance); ``k3`` = GRPO's sample
            estimator ``exp(q - p) - (q - p) - 1`` (needs only the reference's log-prob of each target).
        chunk_rows: positions per chunk; None = all at once and no checkpoint (the plain computation,
            kept as the baseline ``benchmarks/memory.py`` measures against).
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1 (or None: no chunking)")
    n = targets.shape[0]
    if n == 0:
        zero = hidden.sum() * 0.0
        return TokenScores(zero.reshape(1)[:0], zero.reshape(1)[:0], zero.detach().reshape(1)[:0])

    truncated = bool(top_k) or top_p < 1.0

    def one_chunk(h: Tensor, tgt: Tensor, ref: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        logp_all = sampling_log_softmax(head(h), temperature, top_k, top_p)
        logp = logp_all.gather(1, tgt[:, None]).squeeze(1)
        support = torch.isfinite(logp_all) if truncated else None  # where the truncated policy has mass
        with torch.no_grad():
            terms = logp_all.exp() * (logp_all if support is None else logp_all.where(support, 0.0))
            entropy = -terms.sum(-1)
        if ref is None:
            kl = logp.new_zeros(logp.shape)
        elif estimator == "exact":
            assert reference_head is not None, "the exact KL needs the reference's output projection"
            with torch.no_grad():
                logq_all = F.log_softmax(reference_head(ref).float() / temperature, dim=-1)
            diff = logp_all - logq_all
            kl = (logp_all.exp() * (diff if support is None else diff.where(support, 0.0))).sum(-1)
        else:
            log_ratio = ref.float() - logp
            kl = log_ratio.exp() - log_ratio - 1.0
        return logp, kl, entropy

    parts = []
    step = chunk_rows or n
    for start in range(0, n, step):
        piece = slice(start, start + step)
        ref = None if reference is None else reference[piece]
        if chunk_rows is not None and torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(one_chunk, hidden[piece], targets[piece], ref,
                                                           use_reentrant=False))
        else:
            parts.append(one_chunk(hidden[piece], targets[piece], ref))
    logp, kl, entropy = (torch.cat(column) for column in zip(*parts))
    return TokenScores(logp, kl, entropy.detach())


@torch.no_grad()
def reference_token_logp(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor,
                         temperature: float = 1.0, chunk_rows: int | None = 1024) -> Tensor:
    """``[n]`` log-probs of ``targets`` under the reference, chunked: all the k3 KL keeps of it."""
    chunk_rows = chunk_rows or max(1, targets.shape[0])
    out = [F.log_softmax(head(hidden[s: s + chunk_rows]).float() / temperature, dim=-1)
           .gather(1, targets[s: s + chunk_rows, None]).squeeze(1) for s in range(0, targets.shape[0], chunk_rows)]
    return torch.cat(out) if out else hidden.new_zeros((0,))


def masked_token_mean(values: Tensor, reduce: Callable[[float], float] | None = None) -> Tensor:
    """Sum of ``values`` over this rank's tokens divided by the token count: ``reduce`` maps this rank's
    count to the one the mean divides by (under DDP the sum over ranks, so the ranks' shares add up to
    the global mean; it is called on every rank, empty or not); 0 without tokens, not the NaN of an
    empty mean."""
    count = float(values.numel())
    total = reduce(count) if reduce is not None else count
    if total == 0 or count == 0:
        return values.sum() * 0.0
    return values.sum() / total


def multi_positive_info_nce(queries: Tensor, candidates: Tensor, relevant: Tensor, valid: Tensor, tau: float = 0.05,
                            weights: Tensor | None = None, reduce: Callable[[float], float] | None = None) -> Tensor:
    """InfoNCE against each row's own candidate set, with every relevant candidate in the numerator.

    Stage 2 scores each rollout embedding against the environment's candidates of *its* query (top-L
    plus positives), so candidate sets differ per row and a query may have several positives:
    ``-log(sum_pos exp(s/τ) / sum_valid exp(s/τ))``. Rows without a relevant candidate are skipped.

    Args:
        queries: ``[R, d]`` unit-norm embeddings (with grad).
        candidates: ``[R, C, d]`` unit-norm document vectors (usually detached environment vectors).
        relevant / valid: ``[R, C]`` bool masks (``valid`` False marks padding).
        weights: optional ``[R]`` non-negative row weights (e.g. positive advantages); normalised to sum 1.
        reduce: maps this batch's weight sum to the normaliser (under DDP the sum over ranks), as in
            :func:`masked_token_mean`.
    """
    logits = torch.einsum("rd,rcd->rc", queries, candidates.to(queries.dtype)) / tau
    logits = logits.masked_fill(~valid, float("-inf"))
    numerator = logits.masked_fill(~(relevant & valid), float("-inf")).logsumexp(1)
    has_positive = (relevant & valid).any(1)
    per_row = (logits.logsumexp(1) - numerator).masked_fill(~has_positive, 0.0)
    w = has_positive.float() if weights is None else weights.float() * has_positive
    local = float(w.sum())
    total = reduce(local) if reduce is not None else local
    if total == 0.0 or local == 0.0:
        return queries.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact
    return (per_row * w).sum() / total


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std when ``scale``.

    Groups are consecutive runs of ``group_size`` rows (the rollouts of one query). A group whose
    rewards are all equal gets advantage 0 exactly: it carries no signal about which rollout was
    better (the known failure of rank rewards, logged by the RL module).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (r.std(1, keepdim=True) + eps)
    return centred.flatten()


def direct_advantages(rewards: Tensor, direct_rewards: Tensor, group_size: int) -> Tensor:
    """Advantages against the direct embedding (ReMax-style): each rollout's reward minus the reward of
    its query's direct-mode embedding (``direct_rewards``, one per group), unscaled.

    Why not the group mean: GRPO pays an analysis relative to its siblings only, so when every analysis of
    a query hurts retrieval the best of them is still reinforced. Against the direct embedding, an analysis
    earns credit only for what it adds over writing none, and an empty analysis (whose embedding is close
    to the direct one) is an action that costs nothing when nothing helps. A per-query constant subtracted
    from the rewards would do nothing under group normalisation; it has to enter the advantage, here."""
    if rewards.numel() != direct_rewards.numel() * group_size:
        raise ValueError(f"{rewards.numel()} rewards do not match {direct_rewards.numel()} queries x {group_size}")
    return (rewards.float().view(-1, group_size) - direct_rewards.float().view(-1, 1)).flatten()


LossNorm = Literal["grpo", "dapo", "dr_grpo", "sequence", "token", "constant"]
# The published normalisations, and each one's "informative groups only" variant (this project's first
# reading): same shape of average, but rollouts of all-equal groups leave the denominator.
PUBLISHED_NORMS = ("grpo", "dapo", "dr_grpo")
INFORMATIVE_ONLY = {"sequence": "grpo", "token": "dapo", "constant": "dr_grpo"}


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``[R]`` bool: True for rollouts whose group's rewards are not all equal (the only groups whose
    advantages say anything about which rollout was better)."""
    groups = rewards.view(-1, group_size)
    return (groups.max(1).values != groups.min(1).values).repeat_interleave(group_size)


def aggregate_tokens(values: Tensor, mask: Tensor, rows: Tensor, norm: LossNorm, max_tokens: int | None = None,
                     reduce: Callable[[float], float] | None = None) -> Tensor:
    """Average per-token ``values`` ``[R, T]`` (policy tokens ``mask``) over the rollouts ``rows`` as ``norm``
    says; the papers' formulas (TRL's ``loss_type``), with ``R`` the rollouts counted:

    - ``grpo`` / ``sequence``: ``(1/R) Σ_i (1/|o_i|) Σ_t v_it``, every rollout weighing the same (a token of
      a short rollout weighs more: with positive advantages this prefers short completions).
    - ``dapo`` / ``token``: ``Σ_i Σ_t v_it / Σ_i |o_i|``, every token weighing the same.
    - ``dr_grpo`` / ``constant``: ``Σ_i Σ_t v_it / (R · L_max)``, a constant normaliser (``max_tokens``, the
      length cap), no length bias.

    ``reduce`` maps this rank's count (rollouts or tokens) to the global one (under DDP the sum over ranks),
    so the ranks' shares add up to the global average."""
    kind = INFORMATIVE_ONLY.get(norm, norm)
    if kind not in PUBLISHED_NORMS:
        raise ValueError(f"unknown loss normalisation {norm!r}: use one of {PUBLISHED_NORMS + tuple(INFORMATIVE_ONLY)}")
    if kind == "dr_grpo" and not max_tokens:
        raise ValueError(f"loss_norm {norm!r} needs max_tokens (the length cap)")
    rows = rows.bool() & mask.any(1)
    tokens = mask[rows].sum(1)
    count = float(tokens.sum()) if kind == "dapo" else float(rows.sum())
    total = reduce(count) if reduce is not None else count
    if total == 0 or count == 0:
        return values.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact
    per_token = values.masked_fill(~mask, 0.0)[rows]
    if kind == "grpo":
        return (per_token.sum(1) / tokens).sum() / total
    if kind == "dapo":
        return per_token.sum() / total
    return (per_token.sum(1) / max_tokens).sum() / total


def policy_rows(mask: Tensor, informative: Tensor, norm: LossNorm) -> Tensor:
    """The rollouts an average counts: all of them for the published norms; the informative ones only for
    the ``sequence`` / ``token`` / ``constant`` variants."""
    return informative.bool() if norm in INFORMATIVE_ONLY else mask.any(1)


def grpo_policy_loss(logp: Tensor, advantages: Tensor, mask: Tensor, informative: Tensor,
                     norm: LossNorm = "grpo", max_tokens: int | None = None,
                     reduce: Callable[[float], float] | None = None) -> Tensor:
    """GRPO's policy term for strictly on-policy updates: ``-A · ratio`` per policy token with the
    ratio ``exp(logp - logp.detach())`` (1 in value, ``∇logp`` in gradient), averaged by
    :func:`aggregate_tokens` over :func:`policy_rows`.

    With the published norms every rollout counts (an all-equal group has advantage 0: its tokens add 0
    but stay in the denominator, as in TRL); the informative-only variants drop such groups from it.

    Args:
        logp: ``[R, T]`` log-probabilities of the policy tokens (0 elsewhere).
        advantages: ``[R]``. mask: ``[R, T]`` True on policy tokens. informative: ``[R]`` bool.
    """
    ratio = torch.exp(logp - logp.detach())
    per_token = -(ratio * advantages[:, None].to(logp.dtype))
    return aggregate_tokens(per_token, mask, policy_rows(mask, informative, norm), norm, max_tokens, reduce)


class _RandomState:
    """Captures CPU/CUDA RNG state so a chunk can be re-embedded with identical dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def cached_embedding_loss(
    embed: Callable[[object], Tensor],
    chunks: Sequence[object],
    loss_on_embeddings: Callable[[Tensor], Tensor],
    backward: Callable[[Tensor], None] = Tensor.backward,
    embed_with_loss: Callable[[object], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """GradCache: any loss over a big batch of embeddings, with activation memory of one chunk.

    1. embed every chunk without a graph; 2. compute the full-batch loss on those (detached) embeddings
    and back-propagate it to them only; 3. re-embed chunk by chunk *with* a graph and back-propagate the
    cached embedding gradients into the model. Dropout masks are replayed from the RNG state of step 1,
    so the gradients equal those of the plain loss. ``backward`` is ``LightningModule.manual_backward``
    under Lightning (precision plugins, DDP), ``Tensor.backward`` otherwise.

    ``embed_with_loss`` (optional) replaces ``embed`` in step 3 and also returns a per-chunk loss that
    only needs that chunk (Stage 1's LM and KL terms): it rides on the same forward and backward
    instead of costing its own.

    Returns the loss and all embeddings (both detached), rows in chunk order.
    """
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RandomState(_device_of(chunk)))
            reps.append(embed(chunk))
    cached = torch.cat(reps).detach().requires_grad_()
    loss = loss_on_embeddings(cached)
    loss.backward(inputs=[cached])
    grads = cached.grad.split([r.shape[0] for r in reps])
    for chunk, state, grad in zip(chunks, states, grads):
        state.restore()
        if embed_with_loss is None:
            backward((embed(chunk) * grad).sum())
        else:
            emb, chunk_loss = embed_with_loss(chunk)
            backward((emb * grad).sum() + chunk_loss)
    return loss.detach(), cached.detach()


def _device_of(chunk: object) -> torch.device:
    if isinstance(chunk, Tensor):
        return chunk.device
    if isinstance(chunk, (tuple, list)) and chunk and isinstance(chunk[0], Tensor):
        return chunk[0].device
    if isinstance(chunk, dict):
        for v in chunk.values():
            if isinstance(v, Tensor):
                return v.device
    return torch.device("cpu")
