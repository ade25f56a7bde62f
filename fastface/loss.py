"""Training losses: the shared reference path.

Training calls these functions; every fused loss kernel is tested against them, value and gradient.

D3Diff (dual discrete diffusion), per masked image position i with logits l_i over the codebook, target
x0_i and the mask ratio m of its sample:

    CE_i = logsumexp(l_i) - l_i[x0_i]                                   masked generative term
    sigma = -log(1 - m),   r = 1 / (e^sigma - 1) = (1 - m) / m             absorbing-state SEDD weights
    s_i = l_i - log(e^sigma - 1) = l_i + log r                         log-scores
    SE_i = sum_y exp(s_i[y]) - r * s_i[x0_i] + r * (log r - 1)         score entropy (Lou et al. 2023)
         = r * (CE_i + Z_i - 1 - log Z_i),   Z_i = sum_y exp(l_i[y])
    L = mean_i CE_i + alpha * mean_i SE_i

At m = 1 (everything masked) r = 0 and SE_i = 0: the limit, taken explicitly. ``r_max`` clips r from above
(small mask ratios otherwise weight a handful of positions by up to N).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def d3diff_weights(mask_ratio: torch.Tensor, r_max: float | None = None) -> torch.Tensor:
    """r = (1 - m) / m per row, float32, clipped to r_max when given."""
    m = mask_ratio.float()
    r = (1.0 - m) / m
    if r_max is not None:
        r = r.clamp(max=r_max)
    return r


def d3diff_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask_ratio: torch.Tensor,
    *,
    alpha: float,
    reduction: str = "mean",
    r_max: float | None = None,
) -> torch.Tensor:
    """D3Diff loss over M masked positions. logits [M, V], targets [M] int64, mask_ratio [M] in (0, 1].

    Returns a scalar for ``reduction="mean"`` (mean CE + alpha * mean SE) or per-row values
    CE_i + alpha * SE_i [M] for ``reduction="none"``; computed in float32.
    """
    ce, se = d3diff_terms(logits, targets, mask_ratio, r_max=r_max)
    if reduction == "mean":
        return ce.mean() + alpha * se.mean()
    if reduction == "none":
        return ce + alpha * se
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def d3diff_terms(logits, targets, mask_ratio, *, r_max=None):
    """Per-row (CE_i, SE_i), both [M] float32, SE in the SEDD form."""
    l = logits.float()  # noqa: E741  [M, V]
    lse = torch.logsumexp(l, dim=-1)  # [M]
    target_logit = l.gather(1, targets[:, None]).squeeze(1)  # [M]
    ce = lse - target_logit
    r = d3diff_weights(mask_ratio, r_max)  # [M]
    positive = r > 0
    log_r = torch.where(positive, r, torch.ones_like(r)).log()  # log r where r > 0
    s_target = target_logit + log_r  # s_i[x0_i]
    sum_exp_s = torch.exp(lse + log_r)  # sum_y exp(s_i[y]) = r * Z_i
    se = sum_exp_s - r * s_target + r * (log_r - 1.0)
    se = torch.where(positive, se, torch.zeros_like(se))  # limit r -> 0
    return ce, se


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
