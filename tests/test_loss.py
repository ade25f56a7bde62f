"""Training losses of fastface/loss.py: the D3Diff mask-ratio schedule and the understanding loss.

The op ``ops.d3diff_loss`` (its reference against the literal formulas, and every backend) is tested in
tests/test_op_d3diff_loss.py; the MoE load-balancing loss beside the router logits it reads, in
tests/test_op_grouped_moe.py.
"""

import math

import torch

from fastface.loss import mask_ratio_schedule, next_token_loss
from fastface.testing import assert_close


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
