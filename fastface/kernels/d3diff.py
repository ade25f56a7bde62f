"""Fused D3Diff loss in Triton: forward and backward, chunked over the vocabulary.

Legend: M masked positions (rows), V codebook size, BV vocabulary block.

Same result as ``fastface.ops.d3diff.d3diff_loss_reference`` (the oracle, SEDD form). Per row i with logits l,
target t, mask ratio m and r = (1 - m) / m (clipped to r_max):

    lse  = logsumexp(l)                                  online max / sum over blocks of BV columns
    CE_i = lse - l[t]
    SE_i = exp(lse + log r) - r * (l[t] + log r) + r * (log r - 1)      (0 where r = 0, i.e. m = 1)
    loss = mean CE + alpha * mean SE    or    CE_i + alpha * SE_i per row

``_d3diff_fwd_kernel``: one program per row, one pass over the row: (CE_i, SE_i, lse_i). The reduction is
the reference's own torch expression over those [M] vectors.

``_d3diff_bwd_kernel``: one program per row; with w_ce the upstream weight of CE_i (g / M for the mean, g_i
per row) and w_se = alpha * w_ce,

    dl[y] = w_ce * (softmax(l)[y] - [y = t]) + w_se * (r e^{l[y]} - r [y = t])
          = (w_ce + w_se * r Z) * exp(l[y] - lse) - (w_ce + w_se * r) * [y = t],      r Z = exp(lse + log r)

written block by block straight into the gradient buffer (the logits' dtype): besides the logits and that
buffer nothing of size M x V exists, forward or backward. Without a saved lse (``lse=None``) the row's
lse is recomputed in a first pass over the row (the row is then read twice, the second time mostly from
cache).

Precision: float32 or bfloat16 logits, all arithmetic in float32; a bfloat16 gradient is the float32
gradient rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _row_lse(logits_ptr, row_off, V, BLOCK_V: tl.constexpr):
    """logsumexp of one row, float32, by an online max / sum over blocks."""
    cols0 = tl.arange(0, BLOCK_V)
    row_max = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        l = tl.load(logits_ptr + row_off + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(l, axis=0))
        total = total * tl.exp(row_max - new_max) + tl.sum(tl.exp(l - new_max), axis=0)
        row_max = new_max
    return row_max + tl.log(total)


@triton.jit
def _row_weight(ratio_ptr, row, r_max, HAS_R_MAX: tl.constexpr):
    """(r, log r) of one row: r = (1 - m) / m clipped to r_max; log r is 0 where r = 0."""
    m = tl.load(ratio_ptr + row)
    r = tl.math.div_rn(1.0 - m, m)  # IEEE division, as torch
    if HAS_R_MAX:
        r = tl.minimum(r, r_max)
    log_r = tl.log(tl.where(r > 0, r, 1.0))
    return r, log_r


@triton.jit
def _d3diff_fwd_kernel(logits_ptr, targets_ptr, ratio_ptr, ce_ptr, se_ptr, lse_ptr, V, stride_m, r_max,
                       HAS_R_MAX: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_off = row.to(tl.int64) * stride_m
    lse = _row_lse(logits_ptr, row_off, V, BLOCK_V)
    target_logit = tl.load(logits_ptr + row_off + tl.load(targets_ptr + row)).to(tl.float32)
    r, log_r = _row_weight(ratio_ptr, row, r_max, HAS_R_MAX)
    se = tl.exp(lse + log_r) - r * (target_logit + log_r) + r * (log_r - 1.0)
    tl.store(ce_ptr + row, lse - target_logit)
    tl.store(se_ptr + row, tl.where(r > 0, se, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _d3diff_bwd_kernel(logits_ptr, targets_ptr, ratio_ptr, lse_ptr, grad_out_ptr, grad_ptr, V, stride_m,
                       stride_gm, stride_g, grad_scale, alpha, r_max,
                       HAS_LSE: tl.constexpr, HAS_R_MAX: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_off = row.to(tl.int64) * stride_m
    if HAS_LSE:
        lse = tl.load(lse_ptr + row)
    else:
        lse = _row_lse(logits_ptr, row_off, V, BLOCK_V)
    r, log_r = _row_weight(ratio_ptr, row, r_max, HAS_R_MAX)
    w_ce = tl.load(grad_out_ptr + row * stride_g) * grad_scale  # g / M (mean) or g_i (none)
    w_se = alpha * w_ce
    rz = tl.where(r > 0, tl.exp(lse + log_r), 0.0)  # r * Z
    coef_p = w_ce + w_se * rz
    coef_t = w_ce + w_se * r
    target = tl.load(targets_ptr + row)
    out_off = row.to(tl.int64) * stride_gm
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        valid = cols < V
        l = tl.load(logits_ptr + row_off + cols, mask=valid, other=float("-inf")).to(tl.float32)
        grad = coef_p * tl.exp(l - lse) - tl.where(cols == target, coef_t, 0.0)
        tl.store(grad_ptr + out_off + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def _block_v(V: int, block_v: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps): rows up to 4096 columns in one block, else 4096-column blocks; ``block_v`` overrides."""
    if block_v is None:
        block_v = min(4096, max(16, triton.next_power_of_2(V)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    return block_v, (8 if block_v >= 2048 else 4)


def _check(logits, targets, mask_ratio):
    # shapes and dtypes only, no host sync; fastface.ops checks values (target range, m in (0, 1])
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"logits must be [M, V] float32 or bfloat16, got {logits.dtype} {tuple(logits.shape)}")
    M = logits.shape[0]
    if targets.shape != (M,) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [{M}], got {targets.dtype} {tuple(targets.shape)}")
    if mask_ratio.shape != (M,) or mask_ratio.dtype != torch.float32:
        raise ValueError(f"mask_ratio must be float32 [{M}], got {mask_ratio.dtype} {tuple(mask_ratio.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one column")
    if targets.device != logits.device or mask_ratio.device != logits.device:
        raise ValueError("logits, targets and mask_ratio must be on one device")


def _row_major(logits):
    return logits if logits.stride(1) == 1 else logits.contiguous()


def d3diff_terms(logits, targets, mask_ratio, *, r_max=None, block_v=None):
    """Per-row terms of the loss, without autograd.

    Parameters
    ----------
    logits : Tensor [M, V] float32 or bfloat16 (rows may be strided; columns are made unit-stride)
    targets : Tensor [M] int64 in [0, V)
    mask_ratio : Tensor [M] float32 in (0, 1]
    r_max : float or None -- upper clip of r
    block_v : optional power of two >= 16 overriding the vocabulary block

    Returns
    -------
    (ce [M], se [M], lse [M]) float32.
    """
    _check(logits, targets, mask_ratio)
    logits = _row_major(logits)
    M, V = logits.shape
    ce, se, lse = (torch.empty(M, dtype=torch.float32, device=logits.device) for _ in range(3))
    block_v, warps = _block_v(V, block_v)
    if M:
        _d3diff_fwd_kernel[(M,)](logits, targets.contiguous(), mask_ratio.contiguous(), ce, se, lse, V,
                                 logits.stride(0), float(r_max) if r_max is not None else 0.0,
                                 HAS_R_MAX=r_max is not None, BLOCK_V=block_v, num_warps=warps)
    return ce, se, lse


def d3diff_loss_backward(grad_out, logits, targets, mask_ratio, *, alpha, reduction="mean", r_max=None, lse=None,
                         out=None, block_v=None):
    """Gradient of ``d3diff_loss`` with respect to the logits.

    Parameters
    ----------
    grad_out : Tensor [] (reduction="mean") or [M] (reduction="none"), float32 -- upstream gradient
    logits, targets, mask_ratio, alpha, reduction, r_max : as ``d3diff_loss``
    lse : Tensor [M] float32 or None -- the rows' logsumexp from ``d3diff_terms``; recomputed when None
    out : Tensor [M, V] in logits.dtype or None -- buffer for the gradient (may be ``logits`` itself when
        the logits are not needed afterwards)
    block_v : optional power of two >= 16 overriding the vocabulary block

    Returns
    -------
    grad_logits : Tensor [M, V] in logits.dtype.
    """
    _check(logits, targets, mask_ratio)
    logits = _row_major(logits)
    M, V = logits.shape
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    expected = () if reduction == "mean" else (M,)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out must have shape {expected} for reduction={reduction!r}, "
                         f"got {tuple(grad_out.shape)}")
    if out is None:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.stride(1) != 1:
        raise ValueError("out must be an [M, V] buffer in logits.dtype with unit column stride")
    if M == 0:
        return out
    grad_out = grad_out.float().contiguous()
    block_v, warps = _block_v(V, block_v)
    _d3diff_bwd_kernel[(M,)](
        logits, targets.contiguous(), mask_ratio.contiguous(), lse if lse is not None else grad_out, grad_out, out,
        V, logits.stride(0), out.stride(0), 0 if reduction == "mean" else 1,
        1.0 / M if reduction == "mean" else 1.0, float(alpha), float(r_max) if r_max is not None else 0.0,
        HAS_LSE=lse is not None, HAS_R_MAX=r_max is not None, BLOCK_V=block_v, num_warps=warps,
    )
    return out


def _reduce(ce, se, alpha, reduction):
    if reduction == "mean":
        return ce.mean() + alpha * se.mean()
    return ce + alpha * se


class _D3DiffLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, mask_ratio, alpha, reduction, r_max):
        ce, se, lse = d3diff_terms(logits, targets, mask_ratio, r_max=r_max)
        ctx.save_for_backward(logits, targets, mask_ratio, lse)
        ctx.options = (alpha, reduction, r_max)
        return _reduce(ce, se, alpha, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, mask_ratio, lse = ctx.saved_tensors
        alpha, reduction, r_max = ctx.options
        grad = d3diff_loss_backward(grad_out, logits, targets, mask_ratio, alpha=alpha, reduction=reduction,
                                    r_max=r_max, lse=lse)
        return grad, None, None, None, None, None


def d3diff_loss(logits, targets, mask_ratio, *, alpha, reduction="mean", r_max=None):
    """D3Diff loss (contract: ``fastface.ops.d3diff_loss``), differentiable with respect to ``logits``.

    Parameters
    ----------
    logits : Tensor [M, V] float32 or bfloat16 -- codebook logits at the M masked positions
    targets : Tensor [M] int64 in [0, V)
    mask_ratio : Tensor [M] float32 in (0, 1]
    alpha : float -- weight of the score-entropy term
    reduction : "mean" (scalar) or "none" ([M] per-row CE_i + alpha * SE_i)
    r_max : float or None -- upper clip of r = (1 - m) / m

    Returns
    -------
    loss : float32 Tensor [] or [M].
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if torch.is_grad_enabled() and logits.requires_grad:
        return _D3DiffLoss.apply(logits, targets, mask_ratio, alpha, reduction, r_max)
    ce, se, _ = d3diff_terms(logits, targets, mask_ratio, r_max=r_max)
    return _reduce(ce, se, alpha, reduction)
