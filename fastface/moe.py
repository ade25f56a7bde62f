"""Grouped token-level mixture of experts: the readable reference.

Legend: T tokens, H hidden, G expert groups, E routed experts per group, S shared experts per group,
F routed expert ffn width, Fs shared expert ffn width, K top-k.

Weights follow the transformers convention, one slice per group:
    router_weight        [G, E, H]
    gate_up_proj         [G, E, 2F, H]   gate rows first, then up rows
    down_proj            [G, E, H, F]
    shared_gate_up_proj  [G, S, 2Fs, H]
    shared_down_proj     [G, S, H, Fs]

A token's output is  y = sum_{e in topk} w_e * down_e(act(gate_e x) * up_e x) + sum_s down_s(act(gate_s x) * up_s x)
where w is the softmax over the group's E router logits restricted to the top k (renormalised if
``normalize_topk``). ``activation="gelu"`` uses gelu(tanh) in place of silu (Show-o/Phi compatibility).

This file is the oracle for every fast grouped-expert kernel: a plain loop over groups and experts,
computed in float32 and cast back to the input dtype. It is never optimised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")


def activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def route(logits: torch.Tensor, top_k: int, normalize_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over E router logits [T, E], keep the top k. Returns (weights [T, K] float32, experts [T, K] int64).

    Ties in the scores are broken towards the lower expert index (torch.topk on CPU and CUDA agree on this
    for the float32 scores used here only up to ties; kernels use the same rule explicitly).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1, sorted=True)
    if normalize_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """One gated FFN. x [T, H], gate_up [2F, H], down [H, F] -> [T, H]."""
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)  # [T, F] each
    return (activate(gate, activation) * up) @ down.t()


def grouped_moe_reference(
    x: torch.Tensor,
    group_ids: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    top_k: int,
    shared_gate_up_proj: torch.Tensor | None = None,
    shared_down_proj: torch.Tensor | None = None,
    normalize_topk: bool = True,
    return_router_logits: bool = False,
    activation: str = "silu",
):
    """Reference grouped MoE: loop over groups, then over the experts of the group.

    Computes in float32; under ``torch.autocast`` the expert matmuls follow autocast (training), while routing
    stays in float32 and outputs accumulate in float32.
    """
    out_dtype = x.dtype
    x = x.float()
    T = x.shape[0]
    G, E, _ = router_weight.shape
    y = torch.zeros_like(x)  # [T, H]
    router_logits = torch.zeros(T, E, dtype=torch.float32, device=x.device)
    for g in range(G):
        rows = torch.nonzero(group_ids == g, as_tuple=True)[0]  # tokens of this group
        if rows.numel() == 0:
            continue
        xg = x[rows]  # [Tg, H]
        with torch.autocast(x.device.type, enabled=False):
            logits = xg @ router_weight[g].float().t()  # [Tg, E]
        router_logits[rows] = logits
        weights, experts = route(logits, top_k, normalize_topk)  # [Tg, K]
        yg = torch.zeros_like(xg)
        for e in range(E):
            tok, slot = torch.nonzero(experts == e, as_tuple=True)  # pairs routed to expert e
            if tok.numel() == 0:
                continue
            out = expert_ffn(xg[tok], gate_up_proj[g, e].float(), down_proj[g, e].float(), activation)
            yg.index_add_(0, tok, out.float() * weights[tok, slot, None])
        if shared_gate_up_proj is not None:
            for s in range(shared_gate_up_proj.shape[1]):
                yg += expert_ffn(xg, shared_gate_up_proj[g, s].float(), shared_down_proj[g, s].float(),
                                 activation).float()
        y[rows] = yg
    y = y.to(out_dtype)
    return (y, router_logits) if return_router_logits else y


def grouped_moe_per_token(x, group_ids, router_weight, gate_up_proj, down_proj, *, top_k,
                          shared_gate_up_proj=None, shared_down_proj=None, normalize_topk=True,
                          activation="silu"):
    """The most literal form, one token at a time (tests check the reference against it)."""
    ys = []
    for t in range(x.shape[0]):
        g = int(group_ids[t])
        xt = x[t : t + 1].float()
        weights, experts = route(xt @ router_weight[g].float().t(), top_k, normalize_topk)
        yt = torch.zeros_like(xt)
        for k in range(top_k):
            e = int(experts[0, k])
            yt += weights[0, k] * expert_ffn(xt, gate_up_proj[g, e].float(), down_proj[g, e].float(), activation)
        if shared_gate_up_proj is not None:
            for s in range(shared_gate_up_proj.shape[1]):
                yt += expert_ffn(xt, shared_gate_up_proj[g, s].float(), shared_down_proj[g, s].float(), activation)
        ys.append(yt)
    return torch.cat(ys).to(x.dtype)


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
