"""Parallel masked-token decoding (MaskGIT / Show-o): the op ``masked_decode_step``, its contract and reference.

Legend: B sequences, R logits rows (B, or 2B with guidance: rows 0..B-1 cond, B..2B-1 uncond),
N image tokens per sequence, V codebook size.

One step (``masked_decode_step_reference``), given logits of the current masked state:
  1. l = (1 + w) * cond - w * uncond                     (w = guidance; l = cond when w = 0)
  2. z = l / tau_sample;  e = exp(z - max z);  c = cumsum(e)
     sample j = smallest index with c[j] > u1 * c[V-1]     (inverse CDF; a token with e = 0 is never drawn)
     log p(j) = z[j] - max z - log c[V-1]
  3. ratio = (step + 1) / steps;  mask_ratio = cos(pi/2 * ratio)  (or 1 - ratio for "linear")
     mask_len = min(n_unknown - 1, max(1, floor(N * mask_ratio)))  clipped at 0; 0 at the last step
  4. conf = log p(j) + tau_conf * (1 - ratio) * g,  g = -log(-log u2);  known positions conf = +inf
  5. the mask_len lowest-confidence positions (ties: lower position first) stay masked; the rest are known

Noise contract: the only randomness of a step is u = [u1, u2] of shape [2, B, N] (drawn per request by
``fastface.sampling.step_noise``), so every backend given the same logits and u returns the same tokens.

Opt-in, not part of the exact schedule: ``threshold`` also accepts (unmasks) every masked position whose sampled
token has probability >= threshold (confidence-threshold parallel decoding); at least the scheduled number are
accepted. Backends without it fall back to one that has it (``fastface.backends``).
"""

from __future__ import annotations

import math

import torch

from fastface import backends
from fastface.checks import (
    FLOAT_DTYPES,
    check_choice,
    check_float,
    check_int,
    check_probability,
    check_shape,
    check_tensor,
)

SCHEDULES = ("cosine", "linear")


def mask_schedule(ratio: float, schedule: str = "cosine") -> float:
    """Fraction of the N image tokens still masked after progress ``ratio``."""
    if schedule == "cosine":
        return math.cos(math.pi / 2 * ratio)
    if schedule == "linear":
        return 1.0 - ratio
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def scheduled_mask_len(num_tokens: int, n_unknown: torch.Tensor, step: int, steps: int, schedule: str = "cosine"):
    """How many positions of each sequence stay masked after ``step`` (int64 [B])."""
    if step == steps - 1:
        return torch.zeros_like(n_unknown)
    ratio = (step + 1) / steps
    target = max(1, math.floor(num_tokens * mask_schedule(ratio, schedule)))
    return torch.clamp(torch.clamp(n_unknown - 1, max=target), min=0)


def guided_logits(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """[R, N, V] -> [B, N, V] float32: (1 + w) * cond - w * uncond, or cond when w = 0."""
    logits = logits.float()
    if guidance == 0:
        return logits
    B = logits.shape[0] // 2
    return (1 + guidance) * logits[:B] - guidance * logits[B:]


def masked_decode_step_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    masked: torch.Tensor,
    u: torch.Tensor,
    *,
    step: int,
    steps: int,
    guidance: float = 0.0,
    sample_temperature: float = 1.0,
    confidence_temperature: float = 1.0,
    schedule: str = "cosine",
    threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One parallel decoding step in plain PyTorch (see the module docstring for the algorithm)."""
    B, N = tokens.shape
    z = guided_logits(logits, guidance) / sample_temperature  # [B, N, V]
    z_max = z.max(dim=-1, keepdim=True).values
    e = torch.exp(z - z_max)
    c = torch.cumsum(e, dim=-1)  # [B, N, V]
    total = c[..., -1:]
    cut = u[0].float().unsqueeze(-1) * total  # [B, N, 1]
    sampled = (c <= cut).sum(dim=-1).clamp(max=z.shape[-1] - 1)  # smallest j with c[j] > u1 * total
    log_p = (z.gather(-1, sampled[..., None]) - z_max - total.log()).squeeze(-1)  # [B, N]

    ratio = (step + 1) / steps
    gumbel = -torch.log(-torch.log(u[1].float()))
    conf = log_p + confidence_temperature * (1.0 - ratio) * gumbel
    conf = torch.where(masked, conf, torch.full_like(conf, math.inf))

    mask_len = scheduled_mask_len(N, masked.sum(dim=-1), step, steps, schedule)  # [B]
    order = torch.sort(conf, dim=-1, stable=True).indices  # ascending confidence, ties by position
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    new_masked = rank < mask_len[:, None]
    if threshold is not None:  # opt-in: also accept every confident enough sample
        new_masked &= ~(masked & (log_p >= math.log(threshold)))
    new_tokens = torch.where(masked, sampled, tokens)
    return new_tokens, new_masked


# ------------------------------------------------------------------------------------------- contract


def check_masked_decode_args(logits, tokens, masked, u, step, steps, guidance, sample_temperature,
                             confidence_temperature, schedule, threshold=None):
    check_tensor("logits", logits, 3, FLOAT_DTYPES)
    check_tensor("tokens", tokens, 2, (torch.int64,))
    check_tensor("masked", masked, 2, (torch.bool,))
    check_tensor("u", u, 3, (torch.float32,))
    B, N = tokens.shape
    check_float("guidance", guidance)
    R = 2 * B if guidance != 0 else B
    V = logits.shape[2]
    check_shape("logits", logits, (R, N, V))
    if V < 1:
        raise ValueError("logits must have at least one codebook column")
    check_shape("masked", masked, (B, N))
    check_shape("u", u, (2, B, N))
    check_int("steps", steps, 1)
    check_int("step", step, 0, steps - 1)
    check_float("sample_temperature", sample_temperature, positive=True)
    check_float("confidence_temperature", confidence_temperature)
    if confidence_temperature < 0:
        raise ValueError(f"confidence_temperature must be >= 0, got {confidence_temperature}")
    check_choice("schedule", schedule, SCHEDULES)
    if threshold is not None:
        check_probability("threshold", threshold)
    if u.numel() and not bool(((u > 0) & (u < 1)).all()):
        raise ValueError("u must lie strictly inside (0, 1)")
    # non-finite logits would sample token 0 silently: NaN / +inf anywhere is an error, and so is a still-masked
    # position where every token has probability 0 (all -inf; -inf for single tokens is how a caller bans them).
    # One reduction pass over the logits (amax propagates NaN), a second with guidance; positions only on error.
    if V and N:
        top = logits.amax(dim=-1)  # [R, N]
        bad = torch.isnan(top) | (top == math.inf)
        if bool(bad.any()):
            r, n = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"logits hold NaN or +inf (first at row {r}, position {n}): no token can be sampled")
        if guidance != 0:
            banned = logits.amin(dim=-1) == -math.inf
            if bool(banned.any()):
                # (1 + w) * -inf - w * -inf is NaN: every backend would then sample token 0
                r, n = (int(i) for i in torch.nonzero(banned)[0])
                raise ValueError(f"logits hold -inf (first at row {r}, position {n}) with guidance {guidance}: the "
                                 f"guided logit (1 + w) * cond - w * uncond of a token banned in both rows is NaN; "
                                 f"ban tokens with a large finite negative logit instead (e.g. -1e30)")
        dead = (top == -math.inf) & (masked.repeat(2, 1) if guidance != 0 else masked)  # [R, N]
        if bool(dead.any()):
            r, n = (int(i) for i in torch.nonzero(dead)[0])
            raise ValueError(f"logits of row {r} at still-masked position {n} are all -inf: no token can be sampled")
    known = tokens[~masked]
    if known.numel() and (int(known.min()) < 0 or int(known.max()) >= V):
        raise ValueError(f"tokens at known positions must lie in [0, {V}), got values in "
                         f"[{int(known.min())}, {int(known.max())}]")


def masked_decode_step(logits, tokens, masked, u, *, step, steps, guidance=0.0, sample_temperature=1.0,
                       confidence_temperature=1.0, schedule="cosine", threshold=None, backend="auto"):
    """One parallel masked-token decoding step for a batch (algorithm: the module docstring).

    Parameters
    ----------
    logits : Tensor [R, N, V] float32 or bfloat16 -- R = B, or 2B when guidance != 0 (rows 0..B-1 cond,
        rows B..2B-1 uncond); V = codebook size (no mask column)
    tokens : Tensor [B, N] int64 codebook ids (values at masked positions are ignored)
    masked : Tensor [B, N] bool, True = still masked
    u : Tensor [2, B, N] float32 in (0, 1) -- u[0] draws the samples, u[1] the Gumbel confidence noise
    step, steps : int, 0 <= step < steps
    guidance : float, classifier-free guidance weight w
    sample_temperature : float > 0;  confidence_temperature : float >= 0
    schedule : "cosine" | "linear"
    threshold : float in (0, 1] or None -- opt-in confidence-threshold decoding: also unmask every masked
        position whose sampled token has probability >= threshold (not the exact schedule; off by default)
    backend : "auto" | "reference" | "torch" | "cpp" | "triton" (``fastface.backends`` resolves "auto")

    Returns
    -------
    (tokens [B, N] int64, masked [B, N] bool): every position holds its latest value (known tokens
    unchanged, masked positions their new sample); the new mask keeps the scheduled number masked.
    """
    check_masked_decode_args(logits, tokens, masked, u, step, steps, guidance, sample_temperature,
                             confidence_temperature, schedule, threshold)
    options = {} if threshold is None else {"threshold": threshold}
    _, fn = backends.implementation("masked_decode_step", backend, logits.device.type, options=tuple(options))
    return fn(logits, tokens, masked, u, step=step, steps=steps, guidance=guidance,
              sample_temperature=sample_temperature, confidence_temperature=confidence_temperature,
              schedule=schedule, **options)
