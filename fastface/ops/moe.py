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

This file holds the op's contract (``grouped_moe``: argument checks, then the backend chosen by
``fastface.backends``) and its reference: a plain loop over groups and experts, computed in float32 and cast back
to the input dtype, the oracle for every fast grouped-expert kernel. The reference is never optimised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface import backends
from fastface.checks import FLOAT_DTYPES, check_int, check_shape, check_tensor

ACTIVATIONS = ("silu", "gelu")


def activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def route(logits: torch.Tensor, top_k: int, normalize_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over E router logits [T, E], keep the top k. Returns (weights [T, K] float32, experts [T, K] int64).

    Exact ties in the scores go to the lower expert index, the rule every kernel implements.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    # a stable descending sort, not torch.topk: topk does not order exact ties, the stable sort keeps the lower index
    weights, experts = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, experts = weights[:, :top_k], experts[:, :top_k]
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


# ------------------------------------------------------------------------------------------- contract


def check_grouped_moe_args(x, group_ids, router_weight, gate_up_proj, down_proj, top_k,
                           shared_gate_up_proj, shared_down_proj, activation="silu"):
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("group_ids", group_ids, 1, (torch.int64,))
    check_tensor("router_weight", router_weight, 3, FLOAT_DTYPES)
    check_tensor("gate_up_proj", gate_up_proj, 4, FLOAT_DTYPES)
    check_tensor("down_proj", down_proj, 4, FLOAT_DTYPES)
    T, H = x.shape
    G, E, _ = router_weight.shape
    check_shape("group_ids", group_ids, (T,))
    check_shape("router_weight", router_weight, (G, E, H))
    if gate_up_proj.shape[:2] != (G, E) or gate_up_proj.shape[3] != H or gate_up_proj.shape[2] % 2:
        raise ValueError(f"gate_up_proj must have shape ({G}, {E}, 2F, {H}), got {tuple(gate_up_proj.shape)}")
    F = gate_up_proj.shape[2] // 2
    if H < 1 or F < 1 or E < 1 or G < 1:
        raise ValueError(f"grouped_moe needs H, F, E, G >= 1, got H={H}, F={F}, E={E}, G={G}")
    check_shape("down_proj", down_proj, (G, E, H, F))
    for name, w in (("router_weight", router_weight), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} does not match x dtype {x.dtype}")
    check_int("top_k", top_k, 1, E)
    if (shared_gate_up_proj is None) != (shared_down_proj is None):
        raise ValueError("shared_gate_up_proj and shared_down_proj must be given together")
    if shared_gate_up_proj is not None:
        check_tensor("shared_gate_up_proj", shared_gate_up_proj, 4, (x.dtype,))
        check_tensor("shared_down_proj", shared_down_proj, 4, (x.dtype,))
        S, two_fs = shared_gate_up_proj.shape[1], shared_gate_up_proj.shape[2]
        if shared_gate_up_proj.shape[0] != G or shared_gate_up_proj.shape[3] != H or two_fs % 2:
            raise ValueError(f"shared_gate_up_proj must have shape ({G}, S, 2Fs, {H}), "
                             f"got {tuple(shared_gate_up_proj.shape)}")
        check_shape("shared_down_proj", shared_down_proj, (G, S, H, two_fs // 2))
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
    backend : "auto" | "reference" | "torch" | "cpp" | "triton" (``fastface.backends`` resolves "auto")

    Returns
    -------
    y : Tensor [T, H] in x.dtype, or (y, router_logits) when return_router_logits.
    """
    check_grouped_moe_args(x, group_ids, router_weight, gate_up_proj, down_proj, top_k,
                           shared_gate_up_proj, shared_down_proj, activation)
    weights = (x, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in weights)
    _, fn = backends.implementation("grouped_moe", backend, x.device.type, dtype=x.dtype, grad=grad)
    return fn(x, group_ids, router_weight, gate_up_proj, down_proj, top_k=top_k,
              shared_gate_up_proj=shared_gate_up_proj, shared_down_proj=shared_down_proj,
              normalize_topk=normalize_topk, return_router_logits=return_router_logits, activation=activation)
