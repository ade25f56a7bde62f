"""The ``torch`` backend: fast paths written in plain PyTorch, for where no fused kernel is faster.

Legend: T tokens, H hidden, E routed experts of a group, S shared experts, F / Fs expert ffn widths,
D = E*F + S*Fs all expert units of a group side by side, B sequences, N image tokens, V codebook size,
M still-masked positions.

* ``grouped_moe_dense`` -- the grouped MoE as two large matmuls over every expert of a group. Every token runs
  all E routed experts and its top-k routing weight scales each expert's activation before the down projection
  (down is linear, so this is the same function); unselected experts get weight 0. Twice the routed-expert FLOPs
  of a sorted dispatch, but no gather/scatter and two matmuls that the CPU's bf16 matrix units run at full rate
  (the measured figures are beside the rule that picks it, ``fastface.backends._auto_order``). The arithmetic order
  differs from the reference's, so ``auto`` uses it for bfloat16 only. Forward only.
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

# ------------------------------------------------------------------------------------------- dense MoE

_PACKED: dict = {}  # (id(gate_up_proj), group) -> (weakrefs of every weight, their versions, packed matrices)
_PACKED_MAX = 256


def _packed_experts(g: int, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj):
    """Group g's experts as W1 [2D, H] (every gate, then every up) and W2 [H, D]; cached while the same weight
    tensors are alive and unchanged (identity of each, and its in-place version counter)."""
    weights = (gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj)
    versions = tuple(None if t is None else t._version for t in weights)
    key = (id(gate_up_proj), g)
    hit = _PACKED.get(key)
    if hit is not None and hit[1] == versions and all(
            (ref is None and t is None) or (ref is not None and ref() is t) for ref, t in zip(hit[0], weights)):
        return hit[2]
    E, F2, H = gate_up_proj.shape[1:]
    Fe = F2 // 2
    gates = [gate_up_proj[g, :, :Fe].reshape(E * Fe, H)]
    ups = [gate_up_proj[g, :, Fe:].reshape(E * Fe, H)]
    downs = [down_proj[g].permute(1, 0, 2).reshape(H, E * Fe)]  # [H, E*F], expert-major columns
    if shared_gate_up_proj is not None:
        S, Fs2 = shared_gate_up_proj.shape[1:3]
        Fs = Fs2 // 2
        gates.append(shared_gate_up_proj[g, :, :Fs].reshape(S * Fs, H))
        ups.append(shared_gate_up_proj[g, :, Fs:].reshape(S * Fs, H))
        downs.append(shared_down_proj[g].permute(1, 0, 2).reshape(H, S * Fs))
    packed = (torch.cat(gates + ups).contiguous(), torch.cat(downs, dim=1).contiguous(), E, Fe)  # W1, W2
    if len(_PACKED) >= _PACKED_MAX:
        _PACKED.clear()
    _PACKED[key] = (tuple(None if t is None else weakref.ref(t) for t in weights), versions, packed)
    return packed


@torch.no_grad()
def grouped_moe_dense(x, group_ids, router_weight, gate_up_proj, down_proj, *, top_k, shared_gate_up_proj=None,
                      shared_down_proj=None, normalize_topk=True, return_router_logits=False, activation="silu"):
    """``ops.grouped_moe`` as two dense matmuls per group present in the batch (see the module docstring)."""
    T, H = x.shape
    E = router_weight.shape[1]
    y = torch.empty_like(x) if T else x.new_zeros(0, H)
    router_logits = torch.zeros(T, E, dtype=torch.float32, device=x.device)
    groups = torch.unique(group_ids).tolist() if T else []
    for g in groups:
        whole = len(groups) == 1  # the usual case: one task per batch, no gather
        rows = None if whole else torch.nonzero(group_ids == g, as_tuple=True)[0]
        h = x if whole else x[rows]  # [Tg, H]
        w1, w2, E, Fe = _packed_experts(g, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj)
        D = w2.shape[1]
        gu = F.linear(h, w1)  # [Tg, 2D]
        a = activate(gu[:, :D], activation) * gu[:, D:]  # [Tg, D]
        logits = h.float() @ router_weight[g].float().t()  # [Tg, E]
        weights, experts = route(logits, top_k, normalize_topk)  # [Tg, K]
        scale = torch.zeros(h.shape[0], E, dtype=torch.float32, device=x.device).scatter_(1, experts, weights)
        a[:, : E * Fe].view(-1, E, Fe).mul_(scale.to(a.dtype)[:, :, None])
        out = F.linear(a, w2)  # [Tg, H]
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
