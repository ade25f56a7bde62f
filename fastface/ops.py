"""The three hot ops, one contract each, every backend behind it.

    from fastface import ops
    y = ops.grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, top_k=2)
    tokens, masked = ops.masked_decode_step(logits, tokens, masked, u, step=s, steps=T, guidance=2.0)
    loss = ops.d3diff_loss(logits, targets, mask_ratio, alpha=0.1)

Arguments are validated here, once, for every backend: a bad argument raises ``ValueError`` or
``TypeError`` naming it. The C++ kernels check again before touching memory.
"""

from __future__ import annotations

import math

import torch

from fastface import backends
from fastface.moe import ACTIVATIONS
from fastface.sampling import SCHEDULES

FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def _check_tensor(name, t, ndim, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_int(name, value, lo, hi=None):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} out of range [{lo}, {hi if hi is not None else 'inf'}]")


def _check_float(name, value, *, positive=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")


def check_grouped_moe_args(x, group_ids, router_weight, gate_up_proj, down_proj, top_k,
                           shared_gate_up_proj, shared_down_proj, activation="silu"):
    _check_tensor("x", x, 2, FLOAT_DTYPES)
    _check_tensor("group_ids", group_ids, 1, (torch.int64,))
    _check_tensor("router_weight", router_weight, 3, FLOAT_DTYPES)
    _check_tensor("gate_up_proj", gate_up_proj, 4, FLOAT_DTYPES)
    _check_tensor("down_proj", down_proj, 4, FLOAT_DTYPES)
    T, H = x.shape
    G, E, _ = router_weight.shape
    _check_shape("group_ids", group_ids, (T,))
    _check_shape("router_weight", router_weight, (G, E, H))
    if gate_up_proj.shape[:2] != (G, E) or gate_up_proj.shape[3] != H or gate_up_proj.shape[2] % 2:
        raise ValueError(f"gate_up_proj must have shape ({G}, {E}, 2F, {H}), got {tuple(gate_up_proj.shape)}")
    F = gate_up_proj.shape[2] // 2
    _check_shape("down_proj", down_proj, (G, E, H, F))
    for name, w in (("router_weight", router_weight), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} does not match x dtype {x.dtype}")
    _check_int("top_k", top_k, 1, E)
    if (shared_gate_up_proj is None) != (shared_down_proj is None):
        raise ValueError("shared_gate_up_proj and shared_down_proj must be given together")
    if shared_gate_up_proj is not None:
        _check_tensor("shared_gate_up_proj", shared_gate_up_proj, 4, (x.dtype,))
        _check_tensor("shared_down_proj", shared_down_proj, 4, (x.dtype,))
        S, two_fs = shared_gate_up_proj.shape[1], shared_gate_up_proj.shape[2]
        if shared_gate_up_proj.shape[0] != G or shared_gate_up_proj.shape[3] != H or two_fs % 2:
            raise ValueError(f"shared_gate_up_proj must have shape ({G}, S, 2Fs, {H}), "
                             f"got {tuple(shared_gate_up_proj.shape)}")
        _check_shape("shared_down_proj", shared_down_proj, (G, S, H, two_fs // 2))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    devices = {t.device for t in (x, group_ids, router_weight, gate_up_proj, down_proj)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if T and (int(group_ids.min()) < 0 or int(group_ids.max()) >= G):
        raise ValueError(f"group_ids must lie in [0, {G}), got values in "
                         f"[{int(group_ids.min())}, {int(group_ids.max())}]")


def grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, *, top_k, shared_gate_up_proj=None,
                shared_down_proj=None, normalize_topk=True, return_router_logits=False, activation="silu",
                backend="auto"):
    """Grouped token-level mixture of experts.

    Parameters
    ----------
    x : Tensor [T, H], float32 or bfloat16
    group_ids : Tensor [T] int64 in [0, G) -- each token's expert group (its sequence's task)
    router_weight : Tensor [G, E, H]
    gate_up_proj : Tensor [G, E, 2F, H] -- gate rows first, then up rows (transformers layout)
    down_proj : Tensor [G, E, H, F]
    top_k : int in [1, E]
    shared_gate_up_proj, shared_down_proj : Tensor [G, S, 2Fs, H], [G, S, H, Fs] or None -- always-on experts
    normalize_topk : renormalise the kept top-k softmax weights to sum to 1
    return_router_logits : also return the router logits [T, E] float32 (for the load-balancing loss)
    activation : "silu" (SwiGLU experts) or "gelu" (tanh GELU gate)
    backend : "auto" | "reference" | "cpp" | "triton"

    Returns
    -------
    y : Tensor [T, H] in x.dtype, or (y, router_logits) when return_router_logits.
    """
    check_grouped_moe_args(x, group_ids, router_weight, gate_up_proj, down_proj, top_k,
                           shared_gate_up_proj, shared_down_proj, activation)
    _, fn = backends.implementation("grouped_moe", backend, x.device.type)
    return fn(x, group_ids, router_weight, gate_up_proj, down_proj, top_k=top_k,
              shared_gate_up_proj=shared_gate_up_proj, shared_down_proj=shared_down_proj,
              normalize_topk=normalize_topk, return_router_logits=return_router_logits, activation=activation)


def check_masked_decode_args(logits, tokens, masked, u, step, steps, guidance, sample_temperature,
                             confidence_temperature, schedule):
    _check_tensor("logits", logits, 3, FLOAT_DTYPES)
    _check_tensor("tokens", tokens, 2, (torch.int64,))
    _check_tensor("masked", masked, 2, (torch.bool,))
    _check_tensor("u", u, 3, (torch.float32,))
    B, N = tokens.shape
    _check_float("guidance", guidance)
    R = 2 * B if guidance != 0 else B
    V = logits.shape[2]
    _check_shape("logits", logits, (R, N, V))
    if V < 1:
        raise ValueError("logits must have at least one codebook column")
    _check_shape("masked", masked, (B, N))
    _check_shape("u", u, (2, B, N))
    _check_int("steps", steps, 1)
    _check_int("step", step, 0, steps - 1)
    _check_float("sample_temperature", sample_temperature, positive=True)
    _check_float("confidence_temperature", confidence_temperature)
    if confidence_temperature < 0:
        raise ValueError(f"confidence_temperature must be >= 0, got {confidence_temperature}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if u.numel() and not bool(((u > 0) & (u < 1)).all()):
        raise ValueError("u must lie strictly inside (0, 1)")
    known = tokens[~masked]
    if known.numel() and (int(known.min()) < 0 or int(known.max()) >= V):
        raise ValueError(f"tokens at known positions must lie in [0, {V}), got values in "
                         f"[{int(known.min())}, {int(known.max())}]")


def masked_decode_step(logits, tokens, masked, u, *, step, steps, guidance=0.0, sample_temperature=1.0,
                       confidence_temperature=1.0, schedule="cosine", backend="auto"):
    """One parallel masked-token decoding step for a batch (algorithm: ``fastface.sampling``).

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

    Returns
    -------
    (tokens [B, N] int64, masked [B, N] bool): every position holds its latest value (known tokens
    unchanged, masked positions their new sample); the new mask keeps the scheduled number masked.
    """
    check_masked_decode_args(logits, tokens, masked, u, step, steps, guidance, sample_temperature,
                             confidence_temperature, schedule)
    _, fn = backends.implementation("masked_decode_step", backend, logits.device.type)
    return fn(logits, tokens, masked, u, step=step, steps=steps, guidance=guidance,
              sample_temperature=sample_temperature, confidence_temperature=confidence_temperature,
              schedule=schedule)


def check_d3diff_args(logits, targets, mask_ratio, alpha, reduction, r_max):
    _check_tensor("logits", logits, 2, FLOAT_DTYPES)
    _check_tensor("targets", targets, 1, (torch.int64,))
    _check_tensor("mask_ratio", mask_ratio, 1, (torch.float32,))
    M, V = logits.shape
    _check_shape("targets", targets, (M,))
    _check_shape("mask_ratio", mask_ratio, (M,))
    _check_float("alpha", alpha)
    if r_max is not None:
        _check_float("r_max", r_max, positive=True)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if M == 0:
        raise ValueError("logits must have at least one row")
    if int(targets.min()) < 0 or int(targets.max()) >= V:
        raise ValueError(f"targets must lie in [0, {V}), got values in [{int(targets.min())}, {int(targets.max())}]")
    if not bool(((mask_ratio > 0) & (mask_ratio <= 1)).all()):
        raise ValueError("mask_ratio must lie in (0, 1]")


def d3diff_loss(logits, targets, mask_ratio, *, alpha, reduction="mean", r_max=None, backend="auto"):
    """D3Diff loss: mean_i CE_i + alpha * mean_i SE_i (definitions in ``fastface.loss``).

    Parameters
    ----------
    logits : Tensor [M, V] float32 or bfloat16 -- codebook logits at the M masked positions
    targets : Tensor [M] int64 in [0, V)
    mask_ratio : Tensor [M] float32 in (0, 1] -- the mask ratio m of each row's sample
    alpha : float -- weight of the score-entropy term
    reduction : "mean" (scalar) or "none" (per-row CE_i + alpha * SE_i, [M])
    r_max : float or None -- upper clip of r = (1 - m) / m

    Returns a float32 tensor; differentiable with respect to ``logits`` on every backend.
    """
    check_d3diff_args(logits, targets, mask_ratio, alpha, reduction, r_max)
    _, fn = backends.implementation("d3diff_loss", backend, logits.device.type)
    return fn(logits, targets, mask_ratio, alpha=alpha, reduction=reduction, r_max=r_max)
