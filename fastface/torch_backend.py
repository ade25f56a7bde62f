"""The ``torch`` backend: fast paths written in plain PyTorch, for where no fused kernel is faster.

Legend: T tokens, H hidden, E routed experts of a group, S shared experts, F / Fs expert ffn widths,
D = E*F + S*Fs all expert units of a group side by side, B sequences, N image tokens, V codebook size,
M still-masked positions.

* ``grouped_moe_sorted`` -- the grouped MoE with the (token, slot) pairs sorted by expert and each routed expert
  run on its own tokens (gathered rows, two matmuls, the routing weight, an ``index_add_`` back), the shared
  experts as two matmuls over every token (packed once per weight tensor). The routed FLOPs only, on the CPU's
  matrix library (bf16 matrix units where the CPU has them). The arithmetic order differs from the reference's,
  so ``auto`` uses it for bfloat16 only (the measured figures are beside the rule that picks it,
  ``fastface.backends._auto_order``). Forward only.
* ``masked_decode_step_compact`` -- ``masked_decode_step_reference`` computed only at the still-masked positions,
  op for op, so the tokens are the reference's; it also implements the opt-in ``threshold``.

Both take exactly their op's arguments (``fastface.ops``).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from fastface.ops.masked_decode import scheduled_mask_len
from fastface.ops.moe import activate, route

# ------------------------------------------------------------------------------------------ sorted MoE

_PACKED: dict = {}  # (id(gate_up_proj), group) -> (weakrefs of both weights, their versions, packed matrices)
_PACKED_MAX = 256


def pack_experts(gate_up_proj, down_proj):
    """n experts [n, 2F, H] / [n, H, F] as one FFN of width nF: W1 [2nF, H] (every gate, then every up) and
    W2 [H, nF] (expert-major columns, as W1's rows). Leading dims before n are kept."""
    *lead, n, F2, H = gate_up_proj.shape
    Fe = F2 // 2
    w1 = torch.cat([gate_up_proj[..., :Fe, :].reshape(*lead, n * Fe, H),
                    gate_up_proj[..., Fe:, :].reshape(*lead, n * Fe, H)], dim=-2)
    w2 = down_proj.transpose(-3, -2).reshape(*lead, H, n * Fe)
    return w1.contiguous(), w2.contiguous()


def _packed_experts(g: int, gate_up_proj, down_proj):
    """Group g's experts [G, n, 2F, H] / [G, n, H, F] side by side: W1 [2nF, H] (every gate, then every up) and W2
    [H, nF]; cached while the same weight tensors are alive and unchanged (identity and in-place version counter)."""
    weights = (gate_up_proj, down_proj)
    versions = tuple(t._version for t in weights)
    key = (id(gate_up_proj), g)
    hit = _PACKED.get(key)
    if hit is not None and hit[1] == versions and all(ref() is t for ref, t in zip(hit[0], weights)):
        return hit[2]
    packed = pack_experts(gate_up_proj[g], down_proj[g])
    if len(_PACKED) >= _PACKED_MAX:
        _PACKED.clear()
    _PACKED[key] = (tuple(weakref.ref(t) for t in weights), versions, packed)
    return packed


@torch.no_grad()
def grouped_moe_sorted(x, group_ids, router_weight, gate_up_proj, down_proj, *, top_k, shared_gate_up_proj=None,
                       shared_down_proj=None, normalize_topk=True, return_router_logits=False, activation="silu"):
    """``ops.grouped_moe`` with each routed expert run on its own tokens only (see the module docstring)."""
    shared = None
    if shared_gate_up_proj is not None:
        def shared(g):
            return _packed_experts(g, shared_gate_up_proj, shared_down_proj)
    return sorted_moe(x, group_ids, router_weight, lambda g, e: (gate_up_proj[g, e], down_proj[g, e]), shared,
                      top_k=top_k, normalize_topk=normalize_topk, return_router_logits=return_router_logits,
                      activation=activation)


@torch.no_grad()
def sorted_moe(x, group_ids, router_weight, expert, shared, *, top_k, normalize_topk=True, return_router_logits=False,
               activation="silu", linear=F.linear):
    """The sorted dispatch over any weight format: ``expert(g, e)`` -> (gate_up [2F, H], down [H, F]) of routed
    expert e of group g, ``shared(g)`` -> the group's shared experts packed (W1 [2nF, H], W2 [H, nF]) or None for
    none, and ``linear(x, w)`` = x w^T for those weights (``F.linear`` for tensors; int8 weights bring their own)."""
    T, H = x.shape
    E = router_weight.shape[1]
    y = x.new_zeros(T, H)
    router_logits = torch.zeros(T, E, dtype=torch.float32, device=x.device)
    groups = torch.unique(group_ids).tolist() if T else []
    for g in groups:
        whole = len(groups) == 1  # the usual case: one task per batch, no gather
        rows = None if whole else torch.nonzero(group_ids == g, as_tuple=True)[0]
        h = x if whole else x[rows]  # [Tg, H]
        logits = h.float() @ router_weight[g].float().t()  # [Tg, E]
        weights, experts = route(logits, top_k, normalize_topk)  # [Tg, K]
        if shared is not None:  # every token runs the shared experts: two matmuls for all of them
            w1, w2 = shared(g)
            gu = linear(h, w1)
            D = gu.shape[1] // 2
            out = linear(activate(gu[:, :D], activation) * gu[:, D:], w2)
        else:
            out = h.new_zeros(h.shape[0], H)
        order = torch.argsort(experts.reshape(-1), stable=True)  # (token, slot) pairs by expert, in token order
        counts = torch.bincount(experts.reshape(-1), minlength=E).tolist()
        pair_weights = weights.reshape(-1)[order].to(h.dtype)
        tokens = order // top_k
        start = 0
        for e, n in enumerate(counts):
            if n:
                t = tokens[start : start + n]
                w1, w2 = expert(g, e)
                gu = linear(h[t], w1)  # [n, 2F]
                Fe = gu.shape[1] // 2
                a = activate(gu[:, :Fe], activation) * gu[:, Fe:]
                out.index_add_(0, t, linear(a, w2) * pair_weights[start : start + n, None])
            start += n
        if whole:
            y, router_logits = out, logits
        else:
            y[rows] = out
            router_logits[rows] = logits
    return (y, router_logits) if return_router_logits else y


# ------------------------------------------------------------------------------------ compact decoding


def masked_decode_step_compact(logits, tokens, masked, u, *, step, steps, guidance=0.0, sample_temperature=1.0,
                               confidence_temperature=1.0, schedule="cosine", threshold=None):
    """``ops.masked_decode_step`` with the sampler's work done only at the M still-masked positions.

    logits [R, N, V]: only the rows of masked positions are read (known positions may hold anything finite). The
    arithmetic per position is the reference's, op for op, so the tokens are the same.
    """
    B, N = tokens.shape
    guided = guidance != 0
    z = logits[masked.repeat(2, 1) if guided else masked].float()  # [R_M, V]: cond rows, then the uncond rows
    M = z.shape[0] // (2 if guided else 1)
    if guided:
        z = (1 + guidance) * z[:M] - guidance * z[M:]  # as ops.masked_decode.guided_logits
    z = z / sample_temperature  # [M, V]
    z_max = z.max(dim=-1, keepdim=True).values
    e = torch.exp(z - z_max)
    c = torch.cumsum(e, dim=-1)  # [M, V], non-decreasing
    total = c[:, -1:]
    cut = u[0][masked].unsqueeze(-1) * total  # [M, 1]
    # count of c[j] <= cut == smallest j with c[j] > cut: a binary search per row, not a V-wide compare
    sampled = torch.searchsorted(c, cut, right=True).squeeze(-1).clamp(max=z.shape[-1] - 1)
    log_p_m = (z.gather(-1, sampled[:, None]) - z_max - total.log()).squeeze(-1)  # [M]

    log_p = torch.zeros(B, N, dtype=torch.float32, device=tokens.device)
    log_p[masked] = log_p_m
    ratio = (step + 1) / steps
    gumbel = -torch.log(-torch.log(u[1].float()))
    conf = log_p + confidence_temperature * (1.0 - ratio) * gumbel
    conf = torch.where(masked, conf, torch.full_like(conf, math.inf))
    mask_len = scheduled_mask_len(N, masked.sum(dim=-1), step, steps, schedule)  # [B]
    order = torch.sort(conf, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    new_masked = rank < mask_len[:, None]
    if threshold is not None:
        new_masked &= ~(masked & (log_p >= math.log(threshold)))
    new_tokens = tokens.clone()
    new_tokens[masked] = sampled
    return new_tokens, new_masked
