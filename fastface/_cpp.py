"""Typed wrappers over fastface._C, the C++ CPU kernels (csrc/).

Importing this module raises ImportError when the extension is not built, so the backend registry
(fastface.backends) treats the ``cpp`` backend as unavailable.

Calling convention of the raw bindings: tensors go in as numpy arrays (``t.numpy()``, zero-copy for
contiguous CPU tensors); bfloat16 tensors as their int16 view (``t.view(torch.int16).numpy()``). The
C++ side validates shapes, dtypes, contiguity and index ranges again before touching memory.

Legend: T tokens, H hidden, G expert groups, E routed experts per group, S shared experts per group,
F routed expert ffn width, Fs shared expert ffn width, K top-k.
Decoding and loss: B sequences, R logits rows (B or 2B), N image tokens, V codebook size, M loss rows.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from fastface import _C  # noqa: F401 - ImportError here means "cpp backend unavailable"

__all__ = ["grouped_moe", "moe_experts", "masked_decode_step", "d3diff_loss", "attention", "rotary", "int8_linear",
           "set_decode_math", "to_numpy", "from_numpy"]


def to_numpy(t: torch.Tensor, name: str = "tensor"):
    """Zero-copy numpy view of a CPU tensor for the bindings (bfloat16 as its int16 view).

    Non-contiguous tensors are passed as they are: the C++ layer rejects them (the wrappers below make
    their inputs contiguous first where that is what the caller meant).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU for the cpp backend, got {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def from_numpy(a, dtype: torch.dtype) -> torch.Tensor:
    """Tensor over a numpy array returned by a binding (int16 arrays become bfloat16 when asked)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _contig(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, *, top_k, shared_gate_up_proj=None,
                shared_down_proj=None, normalize_topk=True, return_router_logits=False, activation="silu"):
    """Grouped token-level MoE on the CPU (csrc/grouped_moe.cpp); contract: ``fastface.ops.grouped_moe``.

    Parameters
    ----------
    x : Tensor [T, H] float32 or bfloat16
    group_ids : Tensor [T] int64 in [0, G)
    router_weight : Tensor [G, E, H], x.dtype
    gate_up_proj : Tensor [G, E, 2F, H], x.dtype -- gate rows first, then up rows
    down_proj : Tensor [G, E, H, F], x.dtype
    top_k : int in [1, E]
    shared_gate_up_proj, shared_down_proj : Tensor [G, S, 2Fs, H], [G, S, H, Fs] or None
    normalize_topk : renormalise the kept top-k softmax weights to sum to 1
    return_router_logits : also return the router logits [T, E] float32
    activation : "silu" or "gelu" (tanh approximation)

    Returns
    -------
    y : Tensor [T, H] in x.dtype, or (y, router_logits [T, E] float32) when return_router_logits.
    """
    args = [_contig(t) for t in (x, group_ids, router_weight, gate_up_proj, down_proj,
                                 shared_gate_up_proj, shared_down_proj)]
    names = ("x", "group_ids", "router_weight", "gate_up_proj", "down_proj", "shared_gate_up_proj",
             "shared_down_proj")
    arrays = [None if t is None else to_numpy(t, n) for t, n in zip(args, names)]
    y, logits = _C.grouped_moe(*arrays[:5], int(top_k), arrays[5], arrays[6], bool(normalize_topk), str(activation),
                               bool(return_router_logits))
    y = from_numpy(y, x.dtype)
    return (y, torch.from_numpy(logits)) if return_router_logits else y


def moe_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, *, activation="silu"):
    """Routed experts only, routing given: one group, no shared expert (the transformers experts contract).

    Parameters
    ----------
    x : Tensor [T, H] float32 or bfloat16
    top_k_index : Tensor [T, K] int64 in [0, E)
    top_k_weights : Tensor [T, K] -- routing weights (used in float32)
    gate_up_proj : Tensor [E, 2F, H], x.dtype -- gate rows first, then up rows
    down_proj : Tensor [E, H, F], x.dtype
    activation : "silu" or "gelu" (tanh approximation)

    Returns
    -------
    y : Tensor [T, H] in x.dtype -- sum_k w[t, k] * down_e(act(gate_e x_t) * up_e x_t), e = top_k_index[t, k]
    """
    x, gate_up_proj, down_proj = _contig(x), _contig(gate_up_proj), _contig(down_proj)
    top_k_index = _contig(top_k_index.long())
    top_k_weights = _contig(top_k_weights.float())
    y = _C.moe_experts(to_numpy(x, "x"), to_numpy(top_k_index, "top_k_index"), to_numpy(top_k_weights, "top_k_weights"),
                       to_numpy(gate_up_proj, "gate_up_proj"), to_numpy(down_proj, "down_proj"), str(activation))
    return from_numpy(y, x.dtype)


# ---------------------------------------------------------------------------------- masked decoding step


def _vml_functions():
    """(vmsExp, vmsLn) from torch's own library when they are what torch.exp / torch.log compute, else None.

    torch.exp and torch.log on CPU float32 tensors call MKL VML (HA mode) in MKL builds of torch; the
    decode step reproduces the reference bit for bit only with the same exp and log (csrc/masked_decode.cpp).
    The functions are checked against torch on a probe covering the decode step's range (normal and
    subnormal results) before they are used.
    """
    import ctypes
    import glob

    paths = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))
    try:
        lib = ctypes.CDLL(paths[0])
        fns = (lib.vmsExp, lib.vmsLn)
    except (IndexError, OSError, AttributeError):
        return None
    mode = 0x2 | 0x140000 | 0x100  # VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as torch calls them
    for fn in fns:
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
        fn.restype = None
    gen = torch.Generator().manual_seed(0)
    x_exp = torch.cat([torch.linspace(-110.0, 5.0, 20_011), torch.randn(10_000, generator=gen) * 20 - 15])
    x_log = torch.cat([torch.rand(10_000, generator=gen), torch.exp(torch.linspace(-103.0, 88.0, 20_011)),
                       torch.rand(10_000, generator=gen) * 10_000])
    for fn, x, ref in ((fns[0], x_exp, torch.exp), (fns[1], x_log, torch.log)):
        out = torch.empty_like(x)
        fn(x.numel(), x.data_ptr(), out.data_ptr(), mode)
        if not torch.equal(out.view(torch.int32), ref(x).view(torch.int32)):
            return None
    return tuple(ctypes.cast(fn, ctypes.c_void_p).value for fn in fns)


def set_decode_math(kind: str = "auto") -> str:
    """Choose the exp/log of the decode step: "auto" (torch's own when found), "vml" (must be found), "builtin".

    Returns the one in use: "vml" or "builtin". The environment variable FASTFACE_DECODE_MATH sets the
    choice made at import.
    """
    if kind not in ("auto", "vml", "builtin"):
        raise ValueError(f"kind must be 'auto', 'vml' or 'builtin', got {kind!r}")
    addrs = None if kind == "builtin" else _vml_functions()
    if kind == "vml" and addrs is None:
        raise RuntimeError("torch's exp/log are not MKL VML's in this build (or do not match it)")
    _C.set_reference_math(*(addrs or (0, 0)))
    return _C.reference_math()


def masked_decode_step(logits, tokens, masked, u, *, step, steps, guidance=0.0, sample_temperature=1.0,
                       confidence_temperature=1.0, schedule="cosine"):
    """One parallel masked-token decoding step on the CPU (csrc/masked_decode.cpp).

    Contract: ``fastface.ops.masked_decode_step``; returns exactly the tokens and mask of
    ``fastface.ops.masked_decode.masked_decode_step_reference`` given the same logits and u.

    Parameters
    ----------
    logits : Tensor [R, N, V] float32 or bfloat16 -- R = B, or 2B when guidance != 0 (cond rows, then uncond)
    tokens : Tensor [B, N] int64 -- codebook ids; values at masked positions are ignored
    masked : Tensor [B, N] bool -- True = still masked
    u : Tensor [2, B, N] float32 in (0, 1) -- u[0] samples, u[1] Gumbel confidence noise
    step, steps : int, 0 <= step < steps
    guidance, sample_temperature, confidence_temperature : float
    schedule : "cosine" or "linear"

    Returns
    -------
    (tokens [B, N] int64, masked [B, N] bool)
    """
    named = ((logits, "logits"), (tokens, "tokens"), (masked, "masked"), (u, "u"))
    arrays = [to_numpy(_contig(t), n) for t, n in named]
    new_tokens, new_masked = _C.masked_decode_step(*arrays, int(step), int(steps), float(guidance),
                                                   float(sample_temperature), float(confidence_temperature),
                                                   str(schedule))
    return torch.from_numpy(new_tokens), torch.from_numpy(new_masked)


# ---------------------------------------------------------------------------------------------- D3Diff loss


class _D3DiffLoss(torch.autograd.Function):
    """Fused D3Diff loss; saves the logits (not a copy), targets, mask ratios and lse [M] for the backward."""

    @staticmethod
    def forward(ctx, logits, targets, mask_ratio, alpha, reduction, r_max):
        rows, lse = _C.d3diff_forward(to_numpy(logits, "logits"), to_numpy(targets, "targets"),
                                      to_numpy(mask_ratio, "mask_ratio"), float(alpha), r_max)
        rows, lse = torch.from_numpy(rows), torch.from_numpy(lse)  # [M], [M] float32
        ctx.save_for_backward(logits, targets, mask_ratio, lse)
        ctx.alpha, ctx.reduction, ctx.r_max = float(alpha), reduction, r_max
        return rows.mean() if reduction == "mean" else rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, targets, mask_ratio, lse = ctx.saved_tensors
        M = logits.shape[0]
        grad = grad.detach().float()
        grad_rows = (grad / M).expand(M).contiguous() if ctx.reduction == "mean" else grad.contiguous()  # [M]
        g = _C.d3diff_backward(to_numpy(logits, "logits"), to_numpy(targets, "targets"),
                               to_numpy(mask_ratio, "mask_ratio"), to_numpy(lse, "lse"), to_numpy(grad_rows, "grad"),
                               ctx.alpha, ctx.r_max)
        return from_numpy(g, logits.dtype), None, None, None, None, None


def d3diff_loss(logits, targets, mask_ratio, *, alpha, reduction="mean", r_max=None):
    """D3Diff loss on the CPU (csrc/d3diff.cpp), differentiable w.r.t. ``logits``.

    Contract: ``fastface.ops.d3diff_loss`` (definitions in ``fastface/ops/d3diff.py``).

    Parameters
    ----------
    logits : Tensor [M, V] float32 or bfloat16
    targets : Tensor [M] int64 in [0, V)
    mask_ratio : Tensor [M] float32 in (0, 1]
    alpha : float -- weight of the score-entropy term
    reduction : "mean" (scalar) or "none" (per-row CE_i + alpha * SE_i, [M])
    r_max : float or None -- upper clip of r = (1 - m) / m

    Returns
    -------
    float32 Tensor, scalar or [M]; its gradient w.r.t. logits has the logits' dtype.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return _D3DiffLoss.apply(_contig(logits), _contig(targets), _contig(mask_ratio), float(alpha), reduction,
                             None if r_max is None else float(r_max))


set_decode_math(os.environ.get("FASTFACE_DECODE_MATH", "auto"))


ATTENTION_MIN_QUERIES = 8  # fewer queries per head: packing the keys costs more than the products (torch's kernel)


def attention(q, k, v, mask=None):
    """Scaled dot-product attention on the CPU (csrc/attention.cpp); contract: ``fastface.ops.attention``.

    q [B, nh, L, hd], k, v [B, nh, Lk, hd] float32 or bfloat16, any strides with contiguous rows; mask None, bool
    or additive (float32 or q's dtype) [B or 1, nh or 1, L, Lk]. Returns [B, nh, L, hd] in q's dtype, a view of a
    [B, L, nh, hd] tensor (so ``y.transpose(1, 2).reshape(B, L, nh * hd)`` copies nothing). Fewer than
    ``ATTENTION_MIN_QUERIES`` queries go to torch's kernel.
    """
    B, nh, L, hd = q.shape
    if L < ATTENTION_MIN_QUERIES:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, L, nh, hd, dtype=q.dtype)
    _C.attention(to_numpy(q, "q"), to_numpy(k, "k"), to_numpy(v, "v"),
                 None if mask is None else to_numpy(_contig(mask), "mask"), to_numpy(out, "out"), float(hd) ** -0.5)
    return out.transpose(1, 2)


def rotary(qk, cos, sin):
    """Rotary embedding of q and k on the CPU (csrc/rotary.cpp), bitwise ``ops.attention.rotary_reference``.

    qk [B, L, 2, nh, hd] float32 or bfloat16 (a view of the qkv projection; rows contiguous), cos/sin [B, 1, L, rd]
    float32. Returns a new [B, L, 2, nh, hd] tensor in qk's dtype.
    """
    B, L, _, nh, hd = qk.shape
    try:
        x = qk.view(B * L, 2 * nh, hd)  # no copy for the q, k part of a [B, L, 3, nh, hd] projection
    except RuntimeError:
        x = qk.reshape(B * L, 2 * nh, hd)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rd = cos.shape[-1]
    out = torch.empty(B * L, 2 * nh, hd, dtype=qk.dtype)
    _C.rotary(to_numpy(x, "qk"), to_numpy(cos.reshape(B * L, rd).contiguous(), "cos"),
              to_numpy(sin.reshape(B * L, rd).contiguous(), "sin"), to_numpy(out, "out"))
    return out.view(B, L, 2, nh, hd)


def int8_linear(x, weight, bias=None):
    """int8 linear layer on the CPU (csrc/int8_linear.cpp), bitwise ``ops.int8.int8_linear_reference``.

    x [..., K] float32 or bfloat16, weight an ``ops.int8.Int8Weight`` [N, K] (its packed values), bias [N] or None.
    Returns [..., N] in x's dtype.
    """
    K, N = x.shape[-1], weight.scale.shape[0]
    x2 = x.reshape(-1, K)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype)
    b = None if bias is None else to_numpy(_contig(bias.float()), "bias")
    _C.int8_linear(to_numpy(_contig(x2), "x"), to_numpy(_contig(weight.packed), "weight"),
                   to_numpy(_contig(weight.scale), "scale"), to_numpy(_contig(weight.sums), "sums"), b,
                   to_numpy(out, "out"))
    return out.reshape(*x.shape[:-1], N)
