"""Training losses other than the op ``fastface.ops.d3diff_loss``: the mask-ratio schedule of D3Diff training, the
understanding loss and the MoE load-balancing loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mask_ratio_schedule(t: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Training mask ratio m = cos(pi/2 * t), clipped to [1/N, 1]."""
    return torch.cos(math.pi / 2 * t).clamp(1.0 / num_tokens, 1.0)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Understanding loss: mean cross-entropy of logits [B, L, V] predicting targets [B, L] where loss_mask.

    Position j's logits predict token j + 1 (the caller passes targets already shifted).
    """
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    weights = loss_mask.flatten().float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def load_balancing_loss(router_logits: torch.Tensor, group_ids: torch.Tensor, num_groups: int, top_k: int):
    """Switch-style auxiliary loss, per group, summed: E * sum_e f_e * P_e.

    f_e is the fraction of the group's (token, slot) assignments that go to expert e and P_e the mean
    router probability of e over the group's tokens. Equals 1 for a perfectly balanced router.
    """
    E = router_logits.shape[-1]
    total = router_logits.new_zeros(())
    for g in range(num_groups):
        rows = group_ids == g
        if not bool(rows.any()):
            continue
        probs = torch.softmax(router_logits[rows].float(), dim=-1)  # [Tg, E]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        ones = torch.ones(chosen.numel(), device=probs.device)
        f = torch.zeros(E, device=probs.device).scatter_add_(0, chosen.flatten(), ones)
        f = f / chosen.numel()
        total = total + E * (f * probs.mean(0)).sum()
    return total
