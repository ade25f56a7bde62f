"""The op ``d3diff_loss``: its contract and its reference (the shared training loss path).

Training calls the reference through the op; every fused loss kernel is tested against it, value and gradient.

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

import torch

from fastface import backends
from fastface.checks import FLOAT_DTYPES, check_float, check_shape, check_tensor


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


# ------------------------------------------------------------------------------------------- contract


def check_d3diff_args(logits, targets, mask_ratio, alpha, reduction, r_max):
    check_tensor("logits", logits, 2, FLOAT_DTYPES)
    check_tensor("targets", targets, 1, (torch.int64,))
    check_tensor("mask_ratio", mask_ratio, 1, (torch.float32,))
    M, V = logits.shape
    check_shape("targets", targets, (M,))
    check_shape("mask_ratio", mask_ratio, (M,))
    check_float("alpha", alpha)
    if r_max is not None:
        check_float("r_max", r_max, positive=True)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if M == 0:
        raise ValueError("logits must have at least one row")
    if int(targets.min()) < 0 or int(targets.max()) >= V:
        raise ValueError(f"targets must lie in [0, {V}), got values in [{int(targets.min())}, {int(targets.max())}]")
    if not bool(((mask_ratio > 0) & (mask_ratio <= 1)).all()):
        raise ValueError("mask_ratio must lie in (0, 1]")


def d3diff_loss(logits, targets, mask_ratio, *, alpha, reduction="mean", r_max=None, backend="auto"):
    """D3Diff loss: mean_i CE_i + alpha * mean_i SE_i (definitions in the module docstring).

    Parameters
    ----------
    logits : Tensor [M, V] float32 or bfloat16 -- codebook logits at the M masked positions
    targets : Tensor [M] int64 in [0, V)
    mask_ratio : Tensor [M] float32 in (0, 1] -- the mask ratio m of each row's sample
    alpha : float -- weight of the score-entropy term
    reduction : "mean" (scalar) or "none" (per-row CE_i + alpha * SE_i, [M])
    r_max : float or None -- upper clip of r = (1 - m) / m
    backend : "auto" | "reference" | "cpp" | "triton" (``fastface.backends`` resolves "auto")

    Returns a float32 tensor; differentiable with respect to ``logits`` on every backend.
    """
    check_d3diff_args(logits, targets, mask_ratio, alpha, reduction, r_max)
    _, fn = backends.implementation("d3diff_loss", backend, logits.device.type)
    return fn(logits, targets, mask_ratio, alpha=alpha, reduction=reduction, r_max=r_max)
