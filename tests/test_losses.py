"""Loss terms on hand-computed cases; cached (GradCache) InfoNCE equals plain InfoNCE in loss and gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from search_r3.model.embedding_lm import EmbeddingLM, LoraSettings
from search_r3.lightning_modules.losses import (
    cached_embedding_loss,
    chunked_token_scores,
    info_nce_loss,
    masked_token_mean,
    reference_token_logp,
    triplet_margin_loss,
)


def test_info_nce_hand_computed() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    loss = info_nce_loss(q, d, torch.tensor([0, 1]), tau=0.5)
    # query 0: logits (2, 0, 1.2); query 1: logits (0, 2, 1.6)
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1.2)))
    l1 = -math.log(math.exp(2) / (1 + math.exp(2) + math.exp(1.6)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


def test_info_nce_drops_excluded_documents_from_the_denominator_only() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # Document 2 is a known positive of query 1 (not its training positive): gone from its denominator.
    # Query 0 also tries to exclude its own positive, which must be ignored.
    exclude = torch.tensor([[True, False, False], [False, False, True]])
    loss = info_nce_loss(q, d, torch.tensor([0, 1]), tau=0.5, exclude=exclude)
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1.2)))
    l1 = -math.log(math.exp(2) / (1 + math.exp(2)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    none = torch.zeros_like(exclude)
    assert info_nce_loss(q, d, torch.tensor([0, 1]), 0.5, exclude=none).item() == pytest.approx(
        info_nce_loss(q, d, torch.tensor([0, 1]), 0.5).item())


def test_triplet_hand_computed_and_hardest_negative() -> None:
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6]])  # cos 0.8 -> distance 0.2
    easy, hard = torch.tensor([0.0, 1.0]), torch.tensor([0.6, 0.8])  # distances 1.0 and 0.4
    assert triplet_margin_loss(q, p, easy[None], margin=0.5).item() == pytest.approx(0.0)
    assert triplet_margin_loss(q, p, hard[None], margin=0.5).item() == pytest.approx(0.2 - 0.4 + 0.5)
    both = torch.stack([easy, hard])[None]  # [B=1, K=2, d]: the hardest one is used
    assert triplet_margin_loss(q, p, both, margin=0.5).item() == pytest.approx(0.3)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x  # "hidden states" that already are logits: hand-computable scores


def test_token_log_probs_give_the_lm_loss_hand_computed() -> None:
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    scores = chunked_token_scores(logits, _identity, torch.tensor([0, 1]), chunk_rows=1)
    assert masked_token_mean(-scores.logp).item() == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2, abs=1e-6)


def test_exact_token_kl_hand_computed() -> None:
    p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    targets = torch.tensor([0, 0])
    kl = chunked_token_scores(p, _identity, targets, reference=q, reference_head=_identity, chunk_rows=1).kl
    expected = (0.0 + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2
    assert masked_token_mean(kl).item() == pytest.approx(expected, abs=1e-6)
    same = chunked_token_scores(p, _identity, targets, reference=p, reference_head=_identity).kl
    assert masked_token_mean(same).item() == pytest.approx(0.0, abs=1e-7)
    assert masked_token_mean(kl[:0]).item() == 0.0  # no token: 0, not NaN
    # under DDP the mean divides by every rank's count: this rank's share of a 4-token global mean
    assert masked_token_mean(kl, reduce=lambda n: 2 * n).item() == pytest.approx(expected / 2, abs=1e-6)


QUERIES = ["vitamin D and bone", "who wrote Hamlet", "elderly patients", "tragedy"]
DOCS = ["Vitamin D deficiency in elderly patients.", "Hamlet is a tragedy by William Shakespeare.",
        "Patients over 80 years.", "A tragedy written around 1600.", "Bone density.", "Who wrote it?"]


def _full_vocabulary_scores(hidden, head, ref_hidden, ref_head, targets, t):
    """What the chunked scores must equal: every logit of every token at once."""
    logp_all = F.log_softmax(head(hidden).float() / t, -1)
    logq_all = F.log_softmax(ref_head(ref_hidden).float() / t, -1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    logq = logq_all.gather(1, targets[:, None]).squeeze(1)
    exact = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
    k3 = (logq - logp).exp() - (logq - logp) - 1
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, exact, k3, entropy


@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_chunked_token_scores_equal_the_full_vocabulary_computation(estimator: str) -> None:
    """Values and gradients (into the hidden states and the head) match the one-shot computation for
    chunk sizes that divide n, do not, and exceed it."""
    torch.manual_seed(0)
    n, d, v, t = 7, 5, 11, 0.7
    head, ref_head = torch.nn.Linear(d, v, bias=False), torch.nn.Linear(d, v, bias=False)
    hidden0, ref_hidden = torch.randn(n, d), torch.randn(n, d)
    targets = torch.randint(0, v, (n,))
    hidden = hidden0.clone().requires_grad_(True)
    logp, exact, k3, entropy = _full_vocabulary_scores(hidden, head, ref_hidden, ref_head, targets, t)
    kl = exact if estimator == "exact" else k3
    (logp.sum() + 2 * kl.sum()).backward()
    want_hidden, want_head = hidden.grad.clone(), head.weight.grad.clone()
    for chunk in (1, 3, 7, 100, None):
        head.weight.grad = None
        hidden = hidden0.clone().requires_grad_(True)
        reference = ref_hidden if estimator == "exact" else reference_token_logp(ref_hidden, ref_head, targets, t, 2)
        got = chunked_token_scores(hidden, head, targets, t, reference, ref_head, estimator, chunk_rows=chunk)
        torch.testing.assert_close(got.logp, logp.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(got.kl, kl.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(got.entropy, entropy.detach(), atol=1e-6, rtol=0)
        assert not got.entropy.requires_grad
        (got.logp.sum() + 2 * got.kl.sum()).backward()
        torch.testing.assert_close(hidden.grad, want_hidden, atol=1e-6, rtol=0)
        # the head's gradient is summed over chunks in another order: fp32 rounding of a sum of n terms
        torch.testing.assert_close(head.weight.grad, want_head, atol=1e-5, rtol=0)
    same = chunked_token_scores(hidden0, head, targets, t, hidden0 if estimator == "exact" else
                                reference_token_logp(hidden0, head, targets, t), head, estimator)
    assert float(same.kl.detach().abs().max()) < 1e-6  # policy = reference: no divergence


def test_chunked_token_scores_never_keep_all_logits_for_backward() -> None:
    """The point of chunking: autograd saves the chunk's inputs, not its [chunk, V] logits, so what the
    backward pass holds does not grow with n × V (it would without the per-chunk checkpoint)."""
    torch.manual_seed(0)
    n, d, v = 64, 8, 4096
    head = torch.nn.Linear(d, v, bias=False)
    hidden = torch.randn(n, d, requires_grad=True)
    ref = torch.randn(n, d)
    targets = torch.randint(0, v, (n,))
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        scores = chunked_token_scores(hidden, head, targets, 1.0, ref, head, "exact", chunk_rows=8)
    assert max(saved) < 8 * v, f"a saved tensor of {max(saved)} elements: logits kept for backward"
    (scores.logp.sum() + scores.kl.sum()).backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_cached_embedding_loss_equals_plain_info_nce_in_loss_and_gradients(tiny_lm_dir: Path) -> None:
    model = EmbeddingLM(base_model=str(tiny_lm_dir), dtype="float32", show_progress=False,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.2))
    torch.manual_seed(0)
    with torch.no_grad():  # make LoRA non-trivial so its gradients are not all zero-by-construction
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.train()  # dropout on: the cached pass must replay the same masks
    q_chunks = [model.pad(model.direct_prompt_ids(QUERIES[i:i + 2], "query")) for i in range(0, 4, 2)]
    d_chunks = [model.pad(model.direct_prompt_ids(DOCS[i:i + 3], "document")) for i in range(0, 6, 3)]
    positives = torch.tensor([0, 1, 2, 3])
    params = [p for p in model.parameters() if p.requires_grad]

    def embed(chunk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model.embed_at_token(*chunk)

    torch.manual_seed(123)
    q = torch.cat([embed(c) for c in q_chunks])
    d = torch.cat([embed(c) for c in d_chunks])
    plain = info_nce_loss(q, d, positives)
    plain.backward()
    plain_grads = [p.grad.clone() for p in params]
    model.zero_grad()

    torch.manual_seed(123)
    cached, _ = cached_embedding_loss(embed, q_chunks + d_chunks, lambda reps: info_nce_loss(reps[:4], reps[4:], positives))
    assert cached.item() == pytest.approx(plain.item(), abs=1e-6)
    assert sum(g.abs().sum().item() for g in plain_grads) > 0
    for p, g in zip(params, plain_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
