"""Stage 2's loss arithmetic by hand: the policy-term normalisations (as published and the informative-only
variants), the direct-baseline advantages, all-equal groups and the multi-positive InfoNCE."""

from __future__ import annotations

import pytest
import torch

from search_r3.lightning_modules.losses import (
    aggregate_tokens,
    direct_advantages,
    grpo_policy_loss,
    group_advantages,
    informative_groups,
    multi_positive_info_nce,
)


def _assert_policy_loss_by_hand(expected: dict, adv: torch.Tensor, mask: torch.Tensor, informative: torch.Tensor) -> None:
    """Per norm: the loss value and the gradient on the two informative rollouts' tokens (ratio 1, so the
    gradient on a token is -A / its normaliser; the all-equal group's tokens get none)."""
    for norm, (value, (g0, g1)) in expected.items():
        logp = torch.randn(4, 3).masked_fill(~mask, 0.0).requires_grad_()
        loss = grpo_policy_loss(logp, adv, mask, informative, norm, max_tokens=4)
        loss.backward()
        assert float(loss) == pytest.approx(value), norm
        want = torch.tensor([[g0, g0, 0.0], [g1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        torch.testing.assert_close(logp.grad, want, msg=norm)


def test_policy_loss_normalisations_by_hand() -> None:
    """Two groups of two: rewards [1, 0] (informative) and [0.5, 0.5] (all equal). Unscaled advantages
    [0.5, -0.5, 0, 0]; rollouts of 2, 1, 3 and 3 policy tokens; the ratio is 1, so the gradient on a
    token is -A / (its normaliser) and the value is the normalised sum of -A over tokens."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = group_advantages(rewards, 2, scale=False)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    informative = informative_groups(rewards, 2)
    assert informative.tolist() == [True, True, False, False]
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [True, True, True]])
    # The all-equal group leaves the mean: 2 rollouts and 3 tokens count, not 4 and 9.
    expected = {
        "sequence": (0.0, [-0.5 / (2 * 2), 0.5 / (1 * 2)]),                 # mean over rollouts of token means
        "token": ((-1.0 + 0.5) / 3, [-0.5 / 3, 0.5 / 3]),                   # over the 3 tokens
        "constant": ((-1.0 / 4 + 0.5 / 4) / 2, [-0.5 / (4 * 2), 0.5 / (4 * 2)]),  # token sums / cap 4, mean
    }
    _assert_policy_loss_by_hand(expected, adv, mask, informative)


def test_published_normalisations_by_hand() -> None:
    """The papers' formulas (TRL's ``loss_type``) on the same batch: every rollout counts, the all-equal
    group included (its advantage is 0, but it stays in the denominator): 4 rollouts, 9 tokens."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = group_advantages(rewards, 2, scale=False)
    informative = informative_groups(rewards, 2)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [True, True, True]])
    expected = {
        "grpo": (0.0, [-0.5 / (2 * 4), 0.5 / (1 * 4)]),                      # (1/R) Σ_i (1/|o_i|) Σ_t
        "dapo": ((-1.0 + 0.5) / 9, [-0.5 / 9, 0.5 / 9]),                     # Σ_i Σ_t / Σ_i |o_i|
        "dr_grpo": ((-1.0 + 0.5) / (4 * 4), [-0.5 / 16, 0.5 / 16]),          # Σ_i Σ_t / (R · L_max), L_max = 4
    }
    _assert_policy_loss_by_hand(expected, adv, mask, informative)
    # A per-token value (the KL) averaged the same way: every rollout and token counts.
    kl = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 4.0], [0.0, 0.0, 9.0]])
    rows = torch.ones(4, dtype=torch.bool)
    assert float(aggregate_tokens(kl, mask, rows, "grpo")) == pytest.approx((2.0 + 2.0 + 2.0 + 3.0) / 4)
    assert float(aggregate_tokens(kl, mask, rows, "dapo")) == pytest.approx(21.0 / 9)
    assert float(aggregate_tokens(kl, mask, rows, "dr_grpo", max_tokens=4)) == pytest.approx(21.0 / 16)


def test_direct_baseline_advantages_by_hand() -> None:
    """ReMax-style: each rollout against its query's direct embedding's reward, unscaled. An all-equal
    group that is better (or worse) than writing no analysis still gets its credit, which GRPO's group
    mean cannot give."""

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2])
    direct = torch.tensor([0.5, 0.5, 0.4])
    assert direct_advantages(rewards, direct, 2).tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, -0.2, -0.2])
    assert group_advantages(rewards, 2, scale=False).tolist()[4:] == [0.0, 0.0]  # what GRPO makes of it
    with pytest.raises(ValueError, match="do not match"):
        direct_advantages(rewards, direct[:2], 2)


def test_all_equal_groups_give_no_policy_gradient() -> None:
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5])
    logp = torch.randn(4, 6, requires_grad=True)
    loss = grpo_policy_loss(logp, group_advantages(rewards, 4), torch.ones(4, 6, dtype=torch.bool),
                            informative_groups(rewards, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))


def test_multi_positive_info_nce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    docs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    relevant = torch.tensor([[True, True, False]])
    valid = torch.tensor([[True, True, True]])
    s = torch.tensor([1.0, 0.0, -1.0]) / 0.5
    expected = torch.logsumexp(s, 0) - torch.logsumexp(s[:2], 0)
    assert float(multi_positive_info_nce(q, docs, relevant, valid, tau=0.5)) == pytest.approx(float(expected))
    # Padding is ignored; a row without a positive contributes nothing.
    valid_pad = torch.tensor([[True, True, False]])
    expected_pad = torch.logsumexp(s[:2], 0) - torch.logsumexp(s[:2], 0)
    assert float(multi_positive_info_nce(q, docs, relevant, valid_pad, tau=0.5)) == pytest.approx(float(expected_pad))
    none = multi_positive_info_nce(q, docs, torch.zeros_like(relevant), valid, tau=0.5)
    assert float(none) == 0.0
