"""D3Diff and the understanding loss: value and gradient against direct per-position loops."""

import math

import pytest
import torch

from fastface import ops
from fastface.loss import mask_ratio_schedule, next_token_loss
from fastface.ops.d3diff import d3diff_loss_reference, d3diff_terms
from fastface.testing import assert_close


def loop_d3diff(logits, targets, mask_ratio, alpha, r_max=None):
    """Literal DESIGN.md formulas, one position at a time, in float64."""
    ce, se = [], []
    for i in range(logits.shape[0]):
        l = logits[i].double()
        m = float(mask_ratio[i])
        ce_i = torch.logsumexp(l, 0) - l[targets[i]]
        if m >= 1.0:
            se_i = torch.zeros((), dtype=torch.float64)
        else:
            sigma = -math.log(1 - m)
            r = 1 / (math.exp(sigma) - 1)
            if r_max is not None:
                r = min(r, r_max)
            s = l + math.log(r)  # log-scores with the (clipped) r
            se_i = s.exp().sum() - r * s[targets[i]] + r * (math.log(r) - 1)
        ce.append(ce_i)
        se.append(se_i)
    return torch.stack(ce).mean() + alpha * torch.stack(se).mean()


@pytest.mark.parametrize("M,V", [(1, 2), (7, 33), (64, 257)])
@pytest.mark.parametrize("r_max", [None, 3.0])
def test_d3diff_value_and_gradient_against_loop(M, V, r_max):
    gen = torch.Generator().manual_seed(M * V)
    logits = torch.randn(M, V, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (M,), generator=gen)
    mask_ratio = torch.rand(M, generator=gen).clamp(0.05, 1.0)
    mask_ratio[0] = 1.0  # everything masked: r = 0
    x = logits.float().requires_grad_()
    got = d3diff_loss_reference(x, targets, mask_ratio, alpha=0.3, r_max=r_max)
    got.backward()
    x64 = logits.clone().requires_grad_()
    want = loop_d3diff(x64, targets, mask_ratio, 0.3, r_max)
    want.backward()
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(x.grad, x64.grad, atol=1e-6, rtol=1e-4, name="grad")


def test_score_entropy_identity():
    """SE = r * (CE + Z - 1 - log Z) with Z = sum exp(l)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 40, (50,), generator=gen)
    m = torch.rand(50, generator=gen).clamp(0.05, 0.95)
    ce, se = d3diff_terms(logits, targets, m)
    r = (1 - m.double()) / m.double()
    Z = logits.exp().sum(-1)
    assert_close(se, r * (ce + Z - 1 - Z.log()), atol=1e-4, rtol=1e-5, name="SE identity")
    assert bool((se >= -1e-5).all()), "score entropy is non-negative"


def test_reduction_none_and_ops_validation():
    logits = torch.randn(6, 9)
    targets = torch.randint(0, 9, (6,))
    m = torch.full((6,), 0.5)
    per_row = ops.d3diff_loss(logits, targets, m, alpha=0.5, reduction="none", backend="reference")
    assert per_row.shape == (6,)
    assert_close(per_row.mean(), ops.d3diff_loss(logits, targets, m, alpha=0.5, backend="reference"),
                 atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        ops.d3diff_loss(logits, torch.full((6,), 9), m, alpha=0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.d3diff_loss(logits, targets, torch.zeros(6), alpha=0.5)
    with pytest.raises(TypeError, match="targets"):
        ops.d3diff_loss(logits, targets.int(), m, alpha=0.5)
    with pytest.raises(ValueError, match="reduction"):
        ops.d3diff_loss(logits, targets, m, alpha=0.5, reduction="sum")
    with pytest.raises(ValueError, match="targets"):
        ops.d3diff_loss(logits, targets[:5], m, alpha=0.5)


def test_mask_ratio_schedule_clipped():
    t = torch.tensor([0.0, 0.5, 1.0])
    m = mask_ratio_schedule(t, 256)
    assert m[0] == 1.0 and m[2] == 1 / 256
    assert abs(float(m[1]) - math.cos(math.pi / 4)) < 1e-6


def test_next_token_loss_matches_loop():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    want = []
    for b in range(2):
        for j in range(5):
            if mask[b, j]:
                want.append(torch.logsumexp(logits[b, j], 0) - logits[b, j, targets[b, j]])
    assert_close(next_token_loss(logits, targets, mask), torch.stack(want).mean(), atol=1e-6, rtol=1e-6)
