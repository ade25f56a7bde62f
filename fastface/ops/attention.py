"""Scaled dot-product attention, forward: the reference and the contract.

Legend: B batch, nh heads, L queries, Lk keys, hd head dim, rd rotated dims of a head.

    qk = ops.rotary(qk, cos, sin)           # q and k [B, L, 2, nh, hd] rotated by tables [B, 1, L, rd]
    y = ops.attention(q, k, v, mask)        # q [B, nh, L, hd], k, v [B, nh, Lk, hd] -> [B, nh, L, hd]

``y = softmax(q k^T / sqrt(hd) + mask) v`` per (batch, head) with mask [B or 1, nh or 1, L, Lk]: bool (True = may
attend) or additive float (0 / -inf; float32 or q's dtype), or None. Every query row must be allowed at least one
key. The reference is PyTorch's own definition, ``torch.nn.functional.scaled_dot_product_attention`` (the model's
attention before this op existed, and what trains: the fast kernels are forward-only); the C++ kernel is tested
against it and against the formula in float64. ``rotary``'s C++ kernel does the reference's operations one for one
in one pass, so its result is bitwise the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastface import backends
from fastface.checks import check_tensor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] by tables [..., d] (NeoX rotate-half: dim i pairs with dim i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rotary_reference(qk, cos, sin):
    """qk [B, L, 2, nh, hd] (q and k of a qkv projection) rotated by cos/sin [B, 1, L, rd] float32 (rd <= hd: the
    first rd dims of each head rotate, the rest pass through) -> [B, L, 2, nh, hd] in qk's dtype."""
    rd = cos.shape[-1]
    cos, sin = cos.transpose(1, 2)[:, :, None], sin.transpose(1, 2)[:, :, None]  # [B, L, 1, 1, rd]
    if rd == qk.shape[-1]:
        return apply_rotary(qk, cos, sin)
    return torch.cat([apply_rotary(qk[..., :rd], cos, sin), qk[..., rd:]], dim=-1)


def rotary(qk, cos, sin, *, backend: str = "auto"):
    """Rotary position embedding of q and k together (``rotary_reference``); ``backend`` as ``fastface.backends``."""
    check_tensor("qk", qk, 5, (torch.float32, torch.bfloat16))
    B, L, two, nh, hd = qk.shape
    if two != 2:
        raise ValueError(f"qk must hold q and k along dim 2, got shape {tuple(qk.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, 4, (torch.float32,))
        if t.shape[:3] != (B, 1, L) or t.shape[3] % 2 or t.shape[3] > hd:
            raise ValueError(f"{name} must have shape ({B}, 1, {L}, rd) with rd even and <= {hd}, got "
                             f"{tuple(t.shape)}")
    grad = torch.is_grad_enabled() and qk.requires_grad
    _, fn = backends.implementation("rotary", backend, qk.device.type, dtype=qk.dtype, grad=grad)
    return fn(qk, cos, sin)


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
