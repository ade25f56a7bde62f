"""Scaled dot-product attention, forward: the reference and the contract.

Legend: B batch, nh heads, L queries, Lk keys, hd head dim.

    y = ops.attention(q, k, v, mask)        # q [B, nh, L, hd], k, v [B, nh, Lk, hd] -> [B, nh, L, hd]

``y = softmax(q k^T / sqrt(hd) + mask) v`` per (batch, head) with mask [B or 1, nh or 1, L, Lk]: bool (True = may
attend) or additive float (0 / -inf; float32 or q's dtype), or None. Every query row must be allowed at least one
key. The reference is PyTorch's own definition, ``torch.nn.functional.scaled_dot_product_attention`` (the model's
attention before this op existed, and what trains: the fast kernels are forward-only); the C++ kernel is tested
against it and against the formula in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface import backends
from fastface.checks import check_tensor


def attention_reference(q, k, v, mask=None):
    """PyTorch's scaled dot-product attention (the oracle)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def check_attention_args(q, k, v, mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, (torch.float32, torch.bfloat16))
    B, nh, L, hd = q.shape
    if k.shape[:2] != (B, nh) or k.shape[3] != hd or v.shape != k.shape:
        raise ValueError(f"k and v must have shape ({B}, {nh}, Lk, {hd}) like q {tuple(q.shape)}, got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"mask must be a bool, float32 or {q.dtype} tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    Lk = k.shape[2]
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, nh) or mask.shape[2:] != (L, Lk):
        raise ValueError(f"mask must have shape ({B} or 1, {nh} or 1, {L}, {Lk}), got {tuple(mask.shape)}")


def attention(q, k, v, mask=None, *, backend: str = "auto"):
    """Scaled dot-product attention (see the module docstring); ``backend`` as ``fastface.backends``."""
    check_attention_args(q, k, v, mask)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    _, fn = backends.implementation("attention", backend, q.device.type, dtype=q.dtype, grad=grad)
    return fn(q, k, v, mask)
