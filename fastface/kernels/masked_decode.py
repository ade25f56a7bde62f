"""One parallel masked-token decoding step in Triton: guided sampling, confidence and re-masking.

Legend: B sequences, R logits rows (B, or 2B with guidance: rows 0..B-1 cond, B..2B-1 uncond),
N image tokens per sequence, V codebook size, BV vocabulary block, BI/BJ position blocks.

Same contract and result as ``fastface.ops.masked_decode.masked_decode_step_reference`` (the oracle):
same tokens and mask given the same logits and u. Computed in two launches, with no host sync (the
whole step can be captured in a CUDA graph):

1. ``_masked_decode_sample_kernel``, one program per (b, n); known positions only copy their token and
   get confidence +inf, still-masked ones read their logits row(s), with
   z = ((1 + w) * cond - w * uncond) / tau_sample  (float32, rounded as the reference rounds):
     rows of up to 8192 columns (Show-o's codebook) are one block, read once: max z, e = exp(z - max z),
             its cumsum (tl.cumsum), total = the last cumsum value as in the reference, and the sample j = the
             count of columns with cumsum <= u1 * total (the smallest j with cumsum[j] > u1 * total)
     longer rows take two passes over blocks of BV = 4096 columns:
       pass 1: online max and total of e over the blocks
       pass 2: the cumsum as tl.cumsum within a block plus a running carry, counting the columns with
               cumsum <= u1 * total; it stops at the first block holding the sample
     j is clamped to V - 1; then log p(j) = z[j] - max z - log total and
     conf = log p(j) + tau_conf * (1 - ratio) * g with Gumbel g = -log(-log u2).
2. ``_masked_decode_select_kernel``, one program per (b, block of BI positions): mask_len from the
   sequence's count of masked positions and the schedule; each position's rank is the number of positions
   with a smaller (conf, index) key, counted over blocks of BJ (O(N^2) compares, a few microseconds for
   N = 1024); the positions with rank < mask_len stay masked. Ties go to the lower position, as the
   reference's stable sort.

Exactness: the elementwise arithmetic is the reference's, operation for operation, in float32: the guidance
combine without contraction into FMAs (the launch sets ``enable_fp_fusion=False``), IEEE division by the
temperature (``div_rn``). ``exp``, ``log`` and the order of the sums are the GPU's / numpy's, so cumsums and
confidences differ from torch's in the last bits: a sample or a re-masking decision can only differ when u1
falls within a few float32 ulps of a cumsum boundary or two confidences are that close -- improbable with
continuous u (the tests compare exact tokens and masks over many rows and full decoding loops).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastface.ops.masked_decode import SCHEDULES, mask_schedule

# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _guided_z(logits_ptr, cond_off, uncond_off, cols, valid, stride_v, cond_scale, guidance, tau,
              GUIDED: tl.constexpr, SCALE: tl.constexpr):
    """z over the columns ``cols`` of one row, float32; -inf outside ``valid``."""
    l = tl.load(logits_ptr + cond_off + cols * stride_v, mask=valid, other=0.0).to(tl.float32)
    if GUIDED:
        lu = tl.load(logits_ptr + uncond_off + cols * stride_v, mask=valid, other=0.0).to(tl.float32)
        l = cond_scale * l - guidance * lu  # two roundings, as torch: no FMA (enable_fp_fusion=False)
    if SCALE:
        l = tl.math.div_rn(l, tau)  # IEEE division, as torch on the CPU
    return tl.where(valid, l, float("-inf"))


@triton.jit
def _masked_decode_sample_kernel(logits_ptr, tokens_ptr, masked_ptr, u_ptr, out_tokens_ptr, conf_ptr,
                                 B, N, V, stride_r, stride_n, stride_v,
                                 cond_scale, guidance, tau, conf_scale,
                                 GUIDED: tl.constexpr, SCALE: tl.constexpr, ONE_BLOCK: tl.constexpr,
                                 BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)  # b * N + n
    is_masked = tl.load(masked_ptr + pid) != 0
    if is_masked:
        b = pid // N
        n = pid - b * N
        cond_off = b.to(tl.int64) * stride_r + n.to(tl.int64) * stride_n
        uncond_off = (b + B).to(tl.int64) * stride_r + n.to(tl.int64) * stride_n  # row B + b
        cols0 = tl.arange(0, BLOCK_V)
        u1 = tl.load(u_ptr + pid)
        if ONE_BLOCK:  # the whole row in one block: read once, the reference's arithmetic in its order
            valid = cols0 < V
            z = _guided_z(logits_ptr, cond_off, uncond_off, cols0, valid, stride_v, cond_scale, guidance, tau,
                          GUIDED, SCALE)
            z_max = tl.max(z, axis=0)
            c = tl.cumsum(tl.exp(z - z_max), axis=0)  # [BV]; columns past V add exp(-inf) = 0
            total = tl.max(c, axis=0)  # c[V - 1]: cumsums of non-negative terms never decrease
            count = tl.sum(((c <= u1 * total) & valid).to(tl.int32), axis=0)
        else:
            # pass 1: max z and total = sum exp(z - max z), online over blocks
            z_max = tl.full((), float("-inf"), tl.float32)
            total = tl.zeros((), dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                z = _guided_z(logits_ptr, cond_off, uncond_off, cols, cols < V, stride_v, cond_scale, guidance, tau,
                              GUIDED, SCALE)
                new_max = tl.maximum(z_max, tl.max(z, axis=0))
                total = total * tl.exp(z_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
                z_max = new_max

            # pass 2: count the columns whose cumsum is <= u1 * total, until a block holds the sample
            threshold = u1 * total
            count = tl.zeros((), dtype=tl.int32)
            carry = tl.zeros((), dtype=tl.float32)
            start = tl.zeros((), dtype=tl.int32)
            while (start < V) & (count == start):
                cols = start + cols0
                valid = cols < V
                z = _guided_z(logits_ptr, cond_off, uncond_off, cols, valid, stride_v, cond_scale, guidance, tau,
                              GUIDED, SCALE)
                c = carry + tl.cumsum(tl.exp(z - z_max), axis=0)  # [BV]
                count += tl.sum(((c <= threshold) & valid).to(tl.int32), axis=0)
                carry = tl.max(c, axis=0)  # the last cumsum value
                start += BLOCK_V
        j = tl.minimum(count, V - 1)

        z_j = _guided_z(logits_ptr, cond_off, uncond_off, j, j < V, stride_v, cond_scale, guidance, tau, GUIDED, SCALE)
        log_p = z_j - z_max - tl.log(total)
        u2 = tl.load(u_ptr + B * N + pid)
        gumbel = -tl.log(-tl.log(u2))
        tl.store(out_tokens_ptr + pid, j.to(tl.int64))
        tl.store(conf_ptr + pid, log_p + conf_scale * gumbel)
    else:
        tl.store(out_tokens_ptr + pid, tl.load(tokens_ptr + pid))
        tl.store(conf_ptr + pid, float("inf"))


@triton.jit
def _masked_decode_select_kernel(conf_ptr, masked_ptr, out_masked_ptr, N, target,
                                 BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0)
    row = b.to(tl.int64) * N
    offs_j = tl.arange(0, BLOCK_J)

    # mask_len = clamp(min(n_unknown - 1, target), 0): target is 0 at the last step
    n_unknown = tl.zeros((), dtype=tl.int32)
    for start in range(0, N, BLOCK_J):
        js = start + offs_j
        n_unknown += tl.sum(tl.load(masked_ptr + row + js, mask=js < N, other=0).to(tl.int32), axis=0)
    mask_len = tl.maximum(tl.minimum(n_unknown - 1, target), 0)

    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    valid_i = offs_i < N
    conf_i = tl.load(conf_ptr + row + offs_i, mask=valid_i, other=float("inf"))
    rank = tl.zeros((BLOCK_I,), dtype=tl.int32)
    if mask_len > 0:
        for start in range(0, N, BLOCK_J):
            js = start + offs_j
            conf_j = tl.load(conf_ptr + row + js, mask=js < N, other=float("inf"))
            before = (conf_j[None, :] < conf_i[:, None]) | ((conf_j[None, :] == conf_i[:, None])
                                                            & (js[None, :] < offs_i[:, None]))
            before = before & (js[None, :] < N)
            rank += tl.sum(before.to(tl.int32), axis=1)  # [BI]
    tl.store(out_masked_ptr + row + offs_i, (rank < mask_len).to(tl.uint8), mask=valid_i)


# ---------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------


def _schedule_target(N: int, step: int, steps: int, schedule: str) -> int:
    """The schedule's masked count before clipping to n_unknown - 1 (``scheduled_mask_len``); 0 at the last step."""
    if step == steps - 1:
        return 0
    return max(1, math.floor(N * mask_schedule((step + 1) / steps, schedule)))


def _block_v(V: int, block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps): whole rows up to 8192 columns (Show-o's codebook) in one block, read once;
    longer rows in 4096-column blocks, read twice (the second pass mostly from cache)."""
    if block_v is None:
        block_v = min(8192, max(16, triton.next_power_of_2(V)))
        if block_v < V:
            block_v = 4096
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    # 8 warps for the 8192-column block: 128 registers a thread, no spills, two programs per H100 SM (ptxas -v
    # for sm_90a); 16 warps would take 75 registers but fit one program per SM
    return block_v, (4 if block_v <= 1024 else 8)


def masked_decode_step(logits, tokens, masked, u, *, step, steps, guidance=0.0, sample_temperature=1.0,
                       confidence_temperature=1.0, schedule="cosine", out=None, block_v=None):
    """One parallel masked-token decoding step (contract: ``fastface.ops.masked_decode_step``).

    Parameters
    ----------
    logits : Tensor [R, N, V] float32 or bfloat16, any strides -- R = B, or 2B when guidance != 0 (rows 0..B-1
        cond, B..2B-1 uncond)
    tokens : Tensor [B, N] int64 -- values at masked positions are ignored
    masked : Tensor [B, N] bool, True = still masked
    u : Tensor [2, B, N] float32 in (0, 1) -- u[0] draws the samples, u[1] the Gumbel confidence noise
    step, steps : int, 0 <= step < steps
    guidance, sample_temperature, confidence_temperature : float
    schedule : "cosine" | "linear"
    out : optional (tokens [B, N] int64, masked [B, N] bool) contiguous buffers to write the result into; they
        may be ``tokens`` and ``masked`` themselves (an in-place step, e.g. in a CUDA-graph decoding loop)
    block_v : optional power of two >= 16 overriding the vocabulary block (rows longer than it take two passes)

    Returns
    -------
    (tokens [B, N] int64, masked [B, N] bool), as the reference. Tensor values are not checked here (no host
    sync); ``fastface.ops.masked_decode_step`` checks them.
    """
    if logits.dim() != 3 or tokens.dim() != 2 or masked.dim() != 2 or u.dim() != 3:
        raise ValueError("expected logits [R, N, V], tokens [B, N], masked [B, N], u [2, B, N]")
    B, N = tokens.shape
    R, _, V = logits.shape
    if logits.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"logits must be float32 or bfloat16, got {logits.dtype}")
    if tokens.dtype != torch.int64 or masked.dtype != torch.bool or u.dtype != torch.float32:
        raise TypeError(f"expected tokens int64, masked bool, u float32; got {tokens.dtype}, {masked.dtype}, {u.dtype}")
    if logits.shape[:2] != (2 * B if guidance != 0 else B, N) or masked.shape != (B, N) or u.shape != (2, B, N):
        raise ValueError(f"shapes do not match: logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}, "
                         f"masked {tuple(masked.shape)}, u {tuple(u.shape)}, guidance {guidance}")
    if V < 1:
        raise ValueError("logits must have at least one codebook column")
    if len({t.device for t in (logits, tokens, masked, u)}) > 1:
        raise ValueError("logits, tokens, masked and u must be on one device")
    if not 0 <= step < steps:
        raise ValueError(f"step={step} out of range [0, {steps})")
    if sample_temperature <= 0 or confidence_temperature < 0:
        raise ValueError("sample_temperature must be > 0 and confidence_temperature >= 0")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if out is None:
        out_tokens = torch.empty(B, N, dtype=torch.int64, device=tokens.device)
        out_masked = torch.empty(B, N, dtype=torch.bool, device=tokens.device)
    else:
        out_tokens, out_masked = out
        if (out_tokens.shape != (B, N) or out_masked.shape != (B, N) or out_tokens.dtype != torch.int64
                or out_masked.dtype != torch.bool or not out_tokens.is_contiguous() or not out_masked.is_contiguous()):
            raise ValueError("out must be contiguous (tokens [B, N] int64, masked [B, N] bool)")
    if B * N == 0:
        return out_tokens, out_masked
    tokens = tokens.contiguous()
    masked_u8 = masked.contiguous().view(torch.uint8)
    if masked_u8.data_ptr() == out_masked.data_ptr():
        masked_u8 = masked_u8.clone()  # the selection reads whole rows of the old mask while writing the new one
    u = u.contiguous()
    conf = torch.empty(B, N, dtype=torch.float32, device=logits.device)  # [B, N] scratch

    ratio = (step + 1) / steps
    block_v, warps = _block_v(V, block_v)
    _masked_decode_sample_kernel[(B * N,)](
        logits, tokens, masked_u8, u, out_tokens, conf, B, N, V,
        logits.stride(0), logits.stride(1), logits.stride(2),
        float(1 + guidance), float(guidance), float(sample_temperature), float(confidence_temperature * (1.0 - ratio)),
        GUIDED=guidance != 0, SCALE=sample_temperature != 1, ONE_BLOCK=block_v >= V, BLOCK_V=block_v, num_warps=warps,
        enable_fp_fusion=False,
    )
    block_i = min(64, max(16, triton.next_power_of_2(N)))
    block_j = min(128, max(16, triton.next_power_of_2(N)))
    _masked_decode_select_kernel[(B, triton.cdiv(N, block_i))](
        conf, masked_u8, out_masked.view(torch.uint8), N, _schedule_target(N, step, steps, schedule),
        BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4,
    )
    return out_tokens, out_masked
