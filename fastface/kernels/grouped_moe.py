"""Grouped token-level mixture of experts in Triton: routing, block-aligned dispatch, fused expert FFNs.

Legend: T tokens, H hidden, G expert groups, E routed experts per group, S shared experts per group,
F routed expert ffn width, Fs shared expert ffn width, K top-k, P = T*K (token, slot) pairs,
NE = G*E flat experts, BM/BN/BK block sizes, R = max_blocks * BM padded rows.

Same contract as ``fastface.ops.moe.grouped_moe_reference`` (the oracle), computed as:

1. router logits  [T, E] = x . router_weight[group]   (one dense GEMM over the G*E router rows, then
   each token keeps its own group's E columns; float32)
2. ``_route_kernel``: softmax over E, top-k by repeated argmax (ties to the lower expert index),
   optional renormalisation; emits the pair weights [T, K] and flat experts g*E + e [T, K]
3. ``kernels.moe_align``: pairs sorted by flat expert into blocks of BM rows (one expert per block,
   padding rows marked), on device with worst-case sizes: no host sync, CUDA-graph capturable
4. ``_gate_up_kernel``: per block, gathers its token rows of x in place (no copy), computes the gate
   and up tiles together and writes h = act(gate) * up  [R, F]
5. ``_down_kernel``: h . down^T with the routing weight applied in the epilogue, each row written to
   its pair's slot of a [P, H] buffer
6. ``_combine_kernel``: y[t] = sum_k out[t*K + k] (+ shared experts) in fixed order: no atomics,
   bitwise deterministic

Shared experts are a second pass through the same kernels: S always-on experts per group, flat
expert g*S + s, weight 1, their own [T*S, H] buffer summed by the same combine.

Backward (``_GroupedMoE``): ``_gate_up_bwd_kernel`` computes dy . down per pair with the activation
backward and the routing-weight gradient fused in its epilogue; ``_wgrad_kernel`` forms the per-expert
weight gradients as grouped X^T . dY products over each expert's rows; ``_down_kernel`` again gives the
per-pair input gradient, combined per token like the forward. The softmax/top-k/renormalisation
gradient and the router GEMMs are small dense torch ops.

Precision: float32 or bfloat16 inputs, float32 accumulation everywhere. float32 dots use
``input_precision="ieee"`` (no TF32), so float32 results match the reference to float32 rounding on
GPU as under ``TRITON_INTERPRET=1``. h, per-pair outputs and the pre-activation gradient are stored in
the input dtype; the pre-activations kept for backward are float32, because the routing-weight gradient
is a difference of nearly equal terms (bf16 storage there cost ~4% on the router gradient).

Memory and indexing: worst-case buffers of R = (ceil(P / BM) + NE) * BM rows, fixed by the shapes. Gathered
[T, N] operands and one expert's weights are indexed with int32 offsets (the launchers require fewer than
2**31 elements); row blocks and experts are addressed with int64 bases.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastface.ops.moe import ACTIVATIONS  # the op's vocabulary

from .moe_align import Alignment, moe_align

_INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # as triton.jit reads it

# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) for float32 g; "gelu" is the tanh approximation."""
    if ACTIVATION == "silu":
        s = _sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        c = 0.7978845608028654  # sqrt(2 / pi)
        th = 2.0 * _sigmoid(2.0 * c * (g + 0.044715 * g * g * g)) - 1.0  # tanh
        a = 0.5 * g * (1.0 + th)
        da = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a . b, float32 accumulation."""
    if _INTERPRET and a.dtype == tl.bfloat16:
        # the interpreter (numpy) has no bf16 matmul; bf16 products are exact in float32, so this is the same sum
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even, as compiled Triton converts float32 -> bf16. The interpreter
    truncates instead (a bias that does not average out over a sum), so under it the bits are rounded first."""
    if _INTERPRET and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_ids(pid, num_blocks_m, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row blocks sweep the N tiles together, so x rows and weight tiles stay in L2
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _route_kernel(logits_ptr, group_ptr, weights_ptr, experts_ptr, T, E, TOP_K: tl.constexpr,
                  NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    # logits [T, E] float32 -> weights [T, K] float32, flat experts g*E + e [T, K] int32
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_mask = offs_t < T
    e_mask = offs_e < E
    logits = tl.load(logits_ptr + offs_t[:, None] * E + offs_e[None, :], mask=t_mask[:, None] & e_mask[None, :],
                     other=float("-inf"))
    logits = tl.where(t_mask[:, None], logits, 0.0)
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]  # [BLOCK_T, BLOCK_E] softmax
    scores = tl.where(e_mask[None, :], p, -1.0)
    group = tl.load(group_ptr + offs_t, mask=t_mask, other=0).to(tl.int32)
    total = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
    if NORMALIZE:  # a first selection pass for the sum of the kept scores (kept in registers, not re-read)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        remaining = scores
        for _ in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=1, tie_break_left=True)
            total += tl.max(remaining, axis=1)
            remaining = tl.where(offs_e[None, :] == best[:, None], -1.0, remaining)
    remaining = scores
    for k in tl.static_range(TOP_K):
        best = tl.argmax(remaining, axis=1, tie_break_left=True)  # lowest index among equal scores
        value = tl.max(remaining, axis=1)
        tl.store(weights_ptr + offs_t * TOP_K + k, value / total, mask=t_mask)
        tl.store(experts_ptr + offs_t * TOP_K + k, group * E + best, mask=t_mask)
        remaining = tl.where(offs_e[None, :] == best[:, None], -1.0, remaining)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, pre_ptr, sorted_ids_ptr, block_expert_ptr,
                    num_pairs, H, F, slots, num_blocks_m,
                    stride_xt, stride_we, stride_wf, stride_hm, stride_pm,
                    ACTIVATION: tl.constexpr, SAVE_PRE: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # h[r, f] = act(x[tok_r] . W[e, f]) * (x[tok_r] . W[e, F + f]) for the BM rows of one expert block
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_blocks_m, F, BLOCK_N, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    tok = tl.where(pair < num_pairs, pair // slots, 0)  # gathered in place; padding rows read token 0, never used
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % F  # wrapped: weight loads need no column mask
    offs_k = tl.arange(0, BLOCK_K)
    # int32 offsets from scalar bases (T*H < 2**31, checked by the launcher): ~half the registers of 64-bit
    # pointer tiles, no spills at the table's tile sizes (sm_90 ptxas)
    a_off = tok[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    b_off = offs_n[None, :] * stride_wf + offs_k[:, None]  # [BK, BN] of W_gate^T
    w_gate = w_ptr + e.to(tl.int64) * stride_we
    w_up = w_gate + F * stride_wf  # up rows follow the gate rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptr + k0 + a_off)
            bg = tl.load(w_gate + k0 + b_off)
            bu = tl.load(w_up + k0 + b_off)
        else:
            k_mask = offs_k + k0 < H
            a = tl.load(x_ptr + k0 + a_off, mask=k_mask[None, :], other=0.0)
            bg = tl.load(w_gate + k0 + b_off, mask=k_mask[:, None], other=0.0)
            bu = tl.load(w_up + k0 + b_off, mask=k_mask[:, None], other=0.0)
        acc_g = _dot(a, bg, acc_g, DOT_PRECISION)
        acc_u = _dot(a, bu, acc_u, DOT_PRECISION)
    act, _ = _activation(acc_g, ACTIVATION)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = (offs_n < F)[None, :]
    block_rows = tl.arange(0, BLOCK_M)[:, None]
    h = h_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_hm + block_rows * stride_hm + offs_n[None, :]
    tl.store(h, _cast(act * acc_u, h_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_PRE:
        pre = pre_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_pm + block_rows * stride_pm + offs_n[None, :]
        tl.store(pre, _cast(acc_g, pre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(pre + F, _cast(acc_u, pre_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _down_kernel(a_ptr, b_ptr, out_ptr, scale_ptr, sorted_ids_ptr, block_expert_ptr,
                 num_pairs, N, KD, num_blocks_m,
                 stride_am, stride_be, stride_bk, stride_bn, stride_om,
                 HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out[pair_r, n] = scale[pair_r] * sum_k a[r, k] * B[e, k, n]; a in padded rows, out scattered to pair rows
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_blocks_m, N, BLOCK_N, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    valid = pair < num_pairs
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_block = a_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am  # padding rows hold finite values, never stored
    a_off = tl.arange(0, BLOCK_M)[:, None] * stride_am + offs_k[None, :]
    b_e = b_ptr + e.to(tl.int64) * stride_be
    b_off = offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_block + k0 + a_off)
            b = tl.load(b_e + k0 * stride_bk + b_off)
        else:
            k_mask = offs_k + k0 < KD
            a = tl.load(a_block + k0 + a_off, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_e + k0 * stride_bk + b_off, mask=k_mask[:, None], other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + pair, mask=valid, other=0.0)[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit
def _gate_up_bwd_kernel(dy_ptr, w_ptr, pre_ptr, scale_ptr, dpre_ptr, dscale_ptr, sorted_ids_ptr, block_expert_ptr,
                        num_pairs, H, F, slots, num_blocks_m,
                        stride_dyt, stride_we, stride_wh, stride_pm, stride_dm,
                        ACTIVATION: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # g[r, f] = dy[tok_r] . down[e, :, f]; with w = scale[pair_r], h = act(gate) * up:
    #   dscale partial[pid_n, pair_r] = sum_f g * h        (gradient of the routing weight, this F tile)
    #   dgate = w * g * up * act'(gate),  dup = w * g * act(gate)   -> dpre[r, f], dpre[r, F + f]
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_blocks_m, F, BLOCK_N, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    valid = pair < num_pairs
    tok = tl.where(valid, pair // slots, 0)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % F
    offs_k = tl.arange(0, BLOCK_K)
    a_off = tok[:, None] * stride_dyt + offs_k[None, :]  # [BM, BK] of dy, gathered in place
    w_e = w_ptr + e.to(tl.int64) * stride_we
    b_off = offs_k[:, None] * stride_wh + offs_n[None, :]  # [BK, BN] of down[e]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(dy_ptr + k0 + a_off)
            b = tl.load(w_e + k0 * stride_wh + b_off)
        else:
            k_mask = offs_k + k0 < H
            a = tl.load(dy_ptr + k0 + a_off, mask=k_mask[None, :], other=0.0)
            b = tl.load(w_e + k0 * stride_wh + b_off, mask=k_mask[:, None], other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < F)[None, :]
    block_rows = tl.arange(0, BLOCK_M)[:, None]
    pre = pre_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_pm + block_rows * stride_pm + offs_n[None, :]
    gate = tl.load(pre, mask=valid[:, None] & n_mask, other=0.0).to(tl.float32)
    up = tl.load(pre + F, mask=valid[:, None] & n_mask, other=0.0).to(tl.float32)
    act, dact = _activation(gate, ACTIVATION)
    if HAS_SCALE:
        tl.store(dscale_ptr + pid_n * num_pairs + pair, tl.sum(acc * act * up, axis=1), mask=valid)
        acc = acc * tl.load(scale_ptr + pair, mask=valid, other=0.0)[:, None]
    dpre = dpre_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_dm + block_rows * stride_dm + offs_n[None, :]
    tl.store(dpre, _cast(acc * up * dact, dpre_ptr.dtype.element_ty), mask=n_mask)  # padding rows: 0
    tl.store(dpre + F, _cast(acc * act, dpre_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _wgrad_kernel(a_ptr, b_ptr, out_ptr, scale_ptr, sorted_ids_ptr, block_start_ptr,
                  num_pairs, N1, N2, slots,
                  stride_a, stride_b, stride_oe, stride_o1,
                  A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr):
    # out[e] [N1, N2] = sum over the rows r of expert e of (scale[pair_r] * A[r])^T (x) B[r]  (grouped X^T . dY)
    # A row r is A[tok_r] when A_GATHER (a [T, N1] input gathered in place) else A[r] (padded rows); same for B.
    # Rows are summed in layout order, one program per output tile: deterministic, no atomics.
    pid = tl.program_id(0)
    n1 = tl.cdiv(N1, BLOCK_1)
    n2 = tl.cdiv(N2, BLOCK_2)
    e = pid // (n1 * n2)
    pid_1 = (pid % (n1 * n2)) // n2
    pid_2 = pid % n2
    offs_1 = pid_1 * BLOCK_1 + tl.arange(0, BLOCK_1)
    offs_2 = pid_2 * BLOCK_2 + tl.arange(0, BLOCK_2)
    mask_1 = offs_1 < N1
    mask_2 = offs_2 < N2
    row_start = tl.load(block_start_ptr + e) * BLOCK_R
    row_end = tl.load(block_start_ptr + e + 1) * BLOCK_R
    local = tl.arange(0, BLOCK_R)
    a_block = a_ptr + row_start.to(tl.int64) * stride_a  # padded-row operands: this chunk's first row
    b_block = b_ptr + row_start.to(tl.int64) * stride_b
    acc = tl.zeros((BLOCK_1, BLOCK_2), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        pair = tl.load(sorted_ids_ptr + r0 + local)
        valid = pair < num_pairs
        tok = tl.where(valid, pair // slots, 0)
        if A_GATHER:
            a_rows = a_ptr + tok[:, None] * stride_a  # T*N1 < 2**31, checked by the launcher
        else:
            a_rows = a_block + local[:, None] * stride_a
        if B_GATHER:
            b_rows = b_ptr + tok[:, None] * stride_b
        else:
            b_rows = b_block + local[:, None] * stride_b
        a = tl.load(a_rows + offs_1[None, :], mask=valid[:, None] & mask_1[None, :], other=0.0)  # [BR, B1]
        b = tl.load(b_rows + offs_2[None, :], mask=valid[:, None] & mask_2[None, :], other=0.0)  # [BR, B2]
        if HAS_SCALE:
            w = tl.load(scale_ptr + pair, mask=valid, other=0.0)
            a = _cast(a.to(tl.float32) * w[:, None], b.dtype)
        acc = _dot(tl.trans(a), b, acc, DOT_PRECISION)
        a_block += BLOCK_R * stride_a
        b_block += BLOCK_R * stride_b
    out = out_ptr + e.to(tl.int64) * stride_oe + offs_1[:, None] * stride_o1 + offs_2[None, :]
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty), mask=mask_1[:, None] & mask_2[None, :])


@triton.jit
def _combine_kernel(out_ptr, a_ptr, b_ptr, c_ptr, H, KA, KB, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    # out[t] = sum_k a[t*KA + k] + sum_s b[t*KB + s] + c[t], summed in this fixed order (deterministic)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(KA):
        acc += tl.load(a_ptr + (t * KA + k) * H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        for s in range(KB):
            acc += tl.load(b_ptr + (t * KB + s) * H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_C:
        acc += tl.load(c_ptr + t * H + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, _cast(acc, out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# block sizes
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of the grouped GEMMs. block_m rows per expert block (also the alignment unit), block_n
    output columns, block_k reduction step; the weight-gradient kernel uses block_n x block_n tiles."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")


# (largest average pairs per expert, config). Decode (a handful of tokens per expert) takes short row
# blocks so little of each block is padding; prefill takes wide tiles for weight reuse. Starting points
# for H100 (bf16, fused gate+up keeps two BM x BN accumulators), to be refined from bench/ timings.
BLOCK_CONFIGS = (
    (32, BlockConfig(16, 64, 64, num_warps=4, num_stages=4)),
    (256, BlockConfig(64, 64, 64, num_warps=4, num_stages=3)),
    (math.inf, BlockConfig(64, 128, 64, num_warps=8, num_stages=3)),
)


def pick_block_config(num_pairs: int, num_experts: int, block_config=None) -> BlockConfig:
    """The table entry for num_pairs / num_experts tokens per expert, or ``block_config`` (a BlockConfig, a
    dict of its fields, or a tuple in field order) when given."""
    if isinstance(block_config, BlockConfig):
        return block_config
    if isinstance(block_config, dict):
        return BlockConfig(**block_config)
    if block_config is not None:
        return BlockConfig(*block_config)
    per_expert = num_pairs / max(num_experts, 1)
    return next(cfg for limit, cfg in BLOCK_CONFIGS if per_expert <= limit)


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 operands: "ieee", never TF32; bf16 operands: the backend's default (tensor cores)
    return "ieee" if dtype == torch.float32 else None


def _require(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _check_contiguous(**tensors):
    for name, t in tensors.items():
        _require(t is None or t.is_contiguous(), f"{name} must be contiguous")


def _check_int32_offsets(**tensors):
    # kernels index gathered [T, N] operands and one expert's weights with int32 offsets
    for name, t in tensors.items():
        _require(t.numel() < 2**31, f"{name} has {t.numel()} elements; int32 offsets need < 2**31 (split the batch)")


def _launch_options(cfg: BlockConfig, dtype: torch.dtype) -> dict:
    # float32 tiles take twice the shared memory per stage: one stage fewer keeps 64x128x64 under ~110 KB
    stages = cfg.num_stages if dtype != torch.float32 else min(cfg.num_stages, 2)
    return dict(num_warps=cfg.num_warps, num_stages=stages)


def route(router_logits: torch.Tensor, group_ids: torch.Tensor, top_k: int, normalize_topk: bool):
    """Softmax over E, top-k (ties to the lower index), optional renormalisation.

    Parameters
    ----------
    router_logits : Tensor [T, E] float32
    group_ids : Tensor [T] int64 in [0, G)
    top_k : int in [1, E]

    Returns
    -------
    (weights [T, K] float32, flat experts g*E + e [T, K] int32), slots in descending weight order.
    """
    T, E = router_logits.shape
    _require(router_logits.dtype == torch.float32, "router_logits must be float32")
    _require(1 <= top_k <= E, f"top_k={top_k} out of range [1, {E}]")
    _check_contiguous(router_logits=router_logits, group_ids=group_ids)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    experts = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T:
        BLOCK_E = max(16, triton.next_power_of_2(E))
        BLOCK_T = max(1, min(64, 4096 // BLOCK_E))
        _route_kernel[(triton.cdiv(T, BLOCK_T),)](router_logits, group_ids, weights, experts, T, E, TOP_K=top_k,
                                                  NORMALIZE=normalize_topk, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E)
    return weights, experts


def _gemm_grid(align: Alignment, N: int, cfg: BlockConfig):
    return (align.max_blocks * triton.cdiv(N, cfg.block_n),)


def experts_gate_up(x, gate_up, align: Alignment, slots: int, activation: str, cfg: BlockConfig, *, save_pre: bool):
    """h = act(gate) * up for every padded row: x [T, H], gate_up [NE, 2F, H] -> h [R, F] (and the
    pre-activations [R, 2F], gate then up, when ``save_pre``)."""
    T, H = x.shape
    NE, two_f, _ = gate_up.shape
    F = two_f // 2
    _require(gate_up.shape == (NE, 2 * F, H) and x.dtype == gate_up.dtype, "gate_up must be [NE, 2F, H] in x.dtype")
    _check_contiguous(x=x, gate_up=gate_up)
    _check_int32_offsets(x=x, gate_up_expert=gate_up[0])
    R = align.sorted_ids.numel()
    h = torch.empty(R, F, dtype=x.dtype, device=x.device)
    pre = torch.empty(R, 2 * F, dtype=torch.float32, device=x.device) if save_pre else h
    _gate_up_kernel[_gemm_grid(align, F, cfg)](
        x, gate_up, h, pre, align.sorted_ids, align.block_expert, align.num_pairs, H, F, slots, align.max_blocks,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0), pre.stride(0),
        ACTIVATION=activation, SAVE_PRE=save_pre, EVEN_K=H % cfg.block_k == 0, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        **_launch_options(cfg, x.dtype))
    return h, (pre if save_pre else None)


def experts_rows_matmul(a, b, align: Alignment, scale, cfg: BlockConfig, *, transpose_b: bool):
    """Per pair: out[pair_r] = scale[pair_r] * a[r] . B[e_r]  with a [R, KD] in padded rows,
    B[e] = b[e]^T when ``transpose_b`` (b [NE, N, KD]) else b[e] (b [NE, KD, N]); out [P, N].

    Forward down projection: a = h, b = down_proj (transposed), scale = routing weights.
    Input gradient: a = d(pre-activations), b = gate_up_proj, no scale."""
    NE = b.shape[0]
    KD = a.shape[1]
    N = b.shape[1] if transpose_b else b.shape[2]
    _require(b.shape[2 if transpose_b else 1] == KD and a.dtype == b.dtype, "a and b do not chain")
    _require(a.shape[0] == align.sorted_ids.numel() and NE == align.num_experts, "a / b do not match the alignment")
    _check_contiguous(a=a, b=b, scale=scale)
    _check_int32_offsets(b_expert=b[0])
    out = torch.empty(align.num_pairs, N, dtype=a.dtype, device=a.device)
    stride_bk, stride_bn = (b.stride(2), b.stride(1)) if transpose_b else (b.stride(1), b.stride(2))
    _down_kernel[_gemm_grid(align, N, cfg)](
        a, b, out, scale if scale is not None else a, align.sorted_ids, align.block_expert, align.num_pairs, N, KD,
        align.max_blocks, a.stride(0), b.stride(0), stride_bk, stride_bn, out.stride(0),
        HAS_SCALE=scale is not None, EVEN_K=KD % cfg.block_k == 0, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        **_launch_options(cfg, a.dtype))
    return out


def experts_gate_up_backward(dy, down, pre, align: Alignment, slots: int, scale, activation: str, cfg: BlockConfig):
    """dy [T, H], down [NE, H, F], pre [R, 2F] -> d(pre-activations) [R, 2F] and, with ``scale`` [P],
    the routing-weight gradient [P] float32."""
    T, H = dy.shape
    NE, _, F = down.shape
    _require(down.shape == (NE, H, F) and pre.shape == (align.sorted_ids.numel(), 2 * F), "shapes do not chain")
    _check_contiguous(dy=dy, down=down, pre=pre, scale=scale)
    _check_int32_offsets(dy=dy, down_expert=down[0])
    n_tiles = triton.cdiv(F, cfg.block_n)
    dpre = torch.empty(pre.shape, dtype=dy.dtype, device=dy.device)
    dscale = torch.empty(n_tiles, align.num_pairs, dtype=torch.float32, device=dy.device) if scale is not None else None
    _gate_up_bwd_kernel[_gemm_grid(align, F, cfg)](
        dy, down, pre, scale if scale is not None else pre, dpre, dscale if dscale is not None else pre,
        align.sorted_ids, align.block_expert, align.num_pairs, H, F, slots, align.max_blocks,
        dy.stride(0), down.stride(0), down.stride(1), pre.stride(0), dpre.stride(0),
        ACTIVATION=activation, HAS_SCALE=scale is not None, EVEN_K=H % cfg.block_k == 0,
        DOT_PRECISION=_dot_precision(dy.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, **_launch_options(cfg, dy.dtype))
    return dpre, (dscale.sum(0) if dscale is not None else None)  # fixed-order sum over the F tiles


def experts_weight_grad(a, b, align: Alignment, slots: int, out_dtype, cfg: BlockConfig, *, a_gather: bool,
                        b_gather: bool, scale=None):
    """Grouped X^T . dY: out[e] [N1, N2] = sum over expert e's pairs of (scale * A_row)^T (x) B_row, where a
    gathered operand ([T, N]) is read at the pair's token and a padded one ([R, N]) at the row itself."""
    N1, N2 = a.shape[1], b.shape[1]
    _require(a.dtype == b.dtype, "a and b must share a dtype")
    _check_contiguous(a=a, b=b, scale=scale)
    _check_int32_offsets(**({"a": a} if a_gather else {}), **({"b": b} if b_gather else {}))
    out = torch.empty(align.num_experts, N1, N2, dtype=out_dtype, device=a.device)
    B1 = B2 = cfg.block_n
    grid = (align.num_experts * triton.cdiv(N1, B1) * triton.cdiv(N2, B2),)
    _wgrad_kernel[grid](
        a, b, out, scale if scale is not None else a, align.sorted_ids, align.block_start, align.num_pairs, N1, N2,
        slots, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        A_GATHER=a_gather, B_GATHER=b_gather, HAS_SCALE=scale is not None, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_R=align.block_m, BLOCK_1=B1, BLOCK_2=B2, **_launch_options(cfg, a.dtype))
    return out


def combine(a, slots_a: int, b=None, slots_b: int = 0, c=None, *, out_dtype=None):
    """out[t] = sum_k a[t*KA + k] + sum_s b[t*KB + s] + c[t] in fixed order, float32 accumulation.
    a [T*KA, H], b [T*KB, H] or None, c [T, H] or None -> [T, H] in ``out_dtype`` (default a.dtype)."""
    H = a.shape[1]
    T = a.shape[0] // slots_a
    _require(a.shape[0] == T * slots_a, "a must have T * slots_a rows")
    _require(b is None or b.shape == (T * slots_b, H), "b must be [T * slots_b, H]")
    _require(c is None or c.shape == (T, H), "c must be [T, H]")
    _check_contiguous(a=a, b=b, c=c)
    out = torch.empty(T, H, dtype=out_dtype or a.dtype, device=a.device)
    if T:
        BLOCK_H = min(1024, max(16, triton.next_power_of_2(H)))
        _combine_kernel[(T, triton.cdiv(H, BLOCK_H))](out, a, b if b is not None else a, c if c is not None else a,
                                                      H, slots_a, slots_b, HAS_B=b is not None, HAS_C=c is not None,
                                                      BLOCK_H=BLOCK_H)
    return out


# ---------------------------------------------------------------------------------------------------
# forward / backward over the whole op
# ---------------------------------------------------------------------------------------------------


class _ExpertPass(NamedTuple):
    """One set of experts (routed or shared) over its (token, slot) pairs, and what backward needs."""

    align: Alignment
    slots: int  # K (routed) or S (shared)
    scale: torch.Tensor | None  # [P] float32 routing weights; None = weight 1
    cfg: BlockConfig
    h: torch.Tensor  # [R, F]
    pre: torch.Tensor | None  # [R, 2F] (saved for backward only)


def _expert_pass(x, flat_experts, scale, slots, gate_up, down, activation, block_config, save):
    """Align the pairs, run both grouped GEMMs. Returns (per-pair outputs [P, H], _ExpertPass)."""
    NE = gate_up.shape[0]
    cfg = pick_block_config(flat_experts.numel(), NE, block_config)
    align = moe_align(flat_experts.reshape(-1), NE, cfg.block_m)
    h, pre = experts_gate_up(x, gate_up, align, slots, activation, cfg, save_pre=save)
    out = experts_rows_matmul(h, down, align, scale, cfg, transpose_b=True)  # [P, H]
    return out, _ExpertPass(align, slots, scale, cfg, h, pre)


def _expert_pass_backward(dy, x, p: _ExpertPass, gate_up, down, activation, need_x, need_gate_up, need_down):
    """Gradients of one expert pass: (dx per pair [P, H] or None, d scale [P] or None, d gate_up, d down)."""
    dpre, dscale = experts_gate_up_backward(dy, down, p.pre, p.align, p.slots, p.scale, activation, p.cfg)
    d_down = d_gate_up = dx_pairs = None
    if need_down:  # d down[e] [H, F] = sum_r (w_r dy[tok_r])^T (x) h[r]
        d_down = experts_weight_grad(dy, p.h, p.align, p.slots, down.dtype, p.cfg, a_gather=True, b_gather=False,
                                     scale=p.scale)
    if need_gate_up:  # d gate_up[e] [2F, H] = sum_r dpre[r]^T (x) x[tok_r]
        d_gate_up = experts_weight_grad(dpre, x, p.align, p.slots, gate_up.dtype, p.cfg, a_gather=False,
                                        b_gather=True)
    if need_x:  # dx[pair_r] = dpre[r] . gate_up[e]
        dx_pairs = experts_rows_matmul(dpre, gate_up, p.align, None, p.cfg, transpose_b=False)
    return dx_pairs, dscale, d_gate_up, d_down


def router_logits_of(x, group_ids, router_weight):
    """[T, E] float32: x . router_weight[group]^T, as one GEMM over all G*E router rows then a gather."""
    T = x.shape[0]
    G, E, H = router_weight.shape
    full = x.float() @ router_weight.reshape(G * E, H).float().t()  # [T, G*E]
    return full.view(T, G, E).gather(1, group_ids.view(T, 1, 1).expand(T, 1, E)).reshape(T, E).contiguous()


class MoESaved(NamedTuple):
    """Forward state kept for backward."""

    logits: torch.Tensor  # [T, E] float32
    experts: torch.Tensor  # [T, K] int32 flat
    routed: _ExpertPass
    shared: _ExpertPass | None


def grouped_moe_forward(x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj=None,
                        shared_down_proj=None, *, top_k, normalize_topk=True, activation="silu", block_config=None,
                        save_for_backward=False):
    """Forward of the op without autograd. Returns (y [T, H] x.dtype, router_logits [T, E] float32, MoESaved)."""
    _check_args(x, group_ids, router_weight, gate_up_proj, down_proj, top_k, shared_gate_up_proj, shared_down_proj,
                activation)
    T, H = x.shape
    G, E, _ = router_weight.shape
    x = x.contiguous()
    group_ids = group_ids.contiguous()
    logits = router_logits_of(x, group_ids, router_weight)  # [T, E]
    weights, experts = route(logits, group_ids, top_k, normalize_topk)  # [T, K] each
    out_r, routed = _expert_pass(x, experts, weights.view(-1), top_k, gate_up_proj.contiguous().flatten(0, 1),
                                 down_proj.contiguous().flatten(0, 1), activation, block_config, save_for_backward)
    out_s, shared = None, None
    if shared_gate_up_proj is not None:
        S = shared_gate_up_proj.shape[1]
        shared_experts = (group_ids.to(torch.int32)[:, None] * S
                          + torch.arange(S, dtype=torch.int32, device=x.device)).reshape(-1)  # [T*S] flat g*S + s
        out_s, shared = _expert_pass(x, shared_experts, None, S, shared_gate_up_proj.contiguous().flatten(0, 1),
                                     shared_down_proj.contiguous().flatten(0, 1), activation, block_config,
                                     save_for_backward)
    y = combine(out_r, top_k, out_s, shared.slots if shared else 0, out_dtype=x.dtype)  # [T, H]
    return y, logits, MoESaved(logits, experts, routed, shared)


def _route_backward(grad_w, logits, experts, group_ids, E, normalize_topk):
    """d router_logits [T, E] from d weights [T, K] through softmax, top-k and renormalisation."""
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    local = (experts.long() - group_ids[:, None] * E)  # [T, K] in [0, E)
    v = probs.gather(1, local)  # kept softmax scores
    if normalize_topk:
        total = v.sum(1, keepdim=True)
        w = v / total
        grad_v = (grad_w - (grad_w * w).sum(1, keepdim=True)) / total
    else:
        grad_v = grad_w
    grad_p = torch.zeros_like(probs).scatter_(1, local, grad_v)  # top-k indices are distinct per row
    return probs * (grad_p - (grad_p * probs).sum(1, keepdim=True))


def grouped_moe_backward(grad_y, grad_router_logits, x, group_ids, router_weight, gate_up_proj, down_proj,
                         shared_gate_up_proj=None, shared_down_proj=None, saved: MoESaved | None = None, *, top_k,
                         normalize_topk=True, activation="silu", block_config=None, needs_input_grad=None):
    """Gradients (x, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj); an entry is
    None where ``needs_input_grad`` (a 6-tuple of bools, default all) says it is not wanted or the input is None.

    grad_y [T, H]; grad_router_logits [T, E] float32 or None. ``saved`` comes from ``grouped_moe_forward(...,
    save_for_backward=True)``; when None, the forward is recomputed here from the inputs (tensor-only state,
    e.g. for a torch.library custom op: one extra pair of grouped GEMMs)."""
    if saved is None:
        _, _, saved = grouped_moe_forward(x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj,
                                          shared_down_proj, top_k=top_k, normalize_topk=normalize_topk,
                                          activation=activation, block_config=block_config, save_for_backward=True)
    need = tuple(needs_input_grad) if needs_input_grad is not None else (True,) * 6
    T, H = x.shape
    G, E, _ = router_weight.shape
    x = x.contiguous()
    dy = grad_y.contiguous().to(x.dtype)
    gu = gate_up_proj.contiguous().flatten(0, 1)
    dn = down_proj.contiguous().flatten(0, 1)
    dx_r, d_w, d_gu, d_dn = _expert_pass_backward(dy, x, saved.routed, gu, dn, activation, need[0], need[2], need[3])
    dx_s = d_sgu = d_sdn = None
    if saved.shared is not None:
        sgu = shared_gate_up_proj.contiguous().flatten(0, 1)
        sdn = shared_down_proj.contiguous().flatten(0, 1)
        dx_s, _, d_sgu, d_sdn = _expert_pass_backward(dy, x, saved.shared, sgu, sdn, activation, need[0], need[4],
                                                      need[5])
    # router: logits = x . router_weight[group]^T
    d_logits = _route_backward(d_w.view(T, top_k), saved.logits, saved.experts, group_ids, E, normalize_topk)
    if grad_router_logits is not None:
        d_logits = d_logits + grad_router_logits.float()
    d_full = torch.zeros(T, G, E, dtype=torch.float32, device=x.device)
    d_full.scatter_(1, group_ids.view(T, 1, 1).expand(T, 1, E), d_logits.view(T, 1, E))
    d_full = d_full.view(T, G * E)  # [T, G*E], zero outside each token's group
    d_router = None
    if need[1]:
        d_router = (d_full.t() @ x.float()).view(G, E, H).to(router_weight.dtype)
    dx = None
    if need[0]:
        dx_router = d_full @ router_weight.reshape(G * E, H).float()  # [T, H] float32
        if dx_s is not None:
            dx = combine(dx_r, top_k, dx_s, saved.shared.slots, dx_router, out_dtype=x.dtype)
        else:
            dx = combine(dx_r, top_k, None, 0, dx_router, out_dtype=x.dtype)
    view = lambda g, like: g.view(like.shape) if g is not None else None
    return (dx, d_router, view(d_gu, gate_up_proj), view(d_dn, down_proj),
            view(d_sgu, shared_gate_up_proj), view(d_sdn, shared_down_proj))


class _GroupedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj,
                top_k, normalize_topk, activation, block_config):
        y, logits, saved = grouped_moe_forward(x, group_ids, router_weight, gate_up_proj, down_proj,
                                               shared_gate_up_proj, shared_down_proj, top_k=top_k,
                                               normalize_topk=normalize_topk, activation=activation,
                                               block_config=block_config, save_for_backward=True)
        ctx.save_for_backward(x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj,
                              shared_down_proj)
        ctx.saved = saved._replace(logits=saved.logits.detach())  # not the output itself: no reference cycle
        ctx.options = (top_k, normalize_topk, activation)
        return y, logits

    @staticmethod
    def backward(ctx, grad_y, grad_logits):
        x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj = ctx.saved_tensors
        top_k, normalize_topk, activation = ctx.options
        need = ctx.needs_input_grad
        grads = grouped_moe_backward(grad_y, grad_logits, x, group_ids, router_weight, gate_up_proj, down_proj,
                                     shared_gate_up_proj, shared_down_proj, ctx.saved, top_k=top_k,
                                     normalize_topk=normalize_topk, activation=activation,
                                     needs_input_grad=(need[0], need[2], need[3], need[4], need[5], need[6]))
        ctx.saved = None
        dx, d_router, d_gu, d_dn, d_sgu, d_sdn = grads
        return dx, None, d_router, d_gu, d_dn, d_sgu, d_sdn, None, None, None, None


def _check_args(x, group_ids, router_weight, gate_up_proj, down_proj, top_k, shared_gate_up_proj, shared_down_proj,
                activation):
    # shapes and dtypes only: nothing here reads tensor values (no host sync); fastface.ops checks value ranges
    if x.dim() != 2 or router_weight.dim() != 3 or gate_up_proj.dim() != 4 or down_proj.dim() != 4:
        raise ValueError("expected x [T, H], router_weight [G, E, H], gate_up_proj [G, E, 2F, H], "
                         "down_proj [G, E, H, F]")
    T, H = x.shape
    G, E, _ = router_weight.shape
    F = gate_up_proj.shape[2] // 2
    if F < 1 or H < 1:
        raise ValueError(f"need H >= 1 and F >= 1, got x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"x must be float32 or bfloat16, got {x.dtype}")
    if group_ids.shape != (T,) or group_ids.dtype != torch.int64:
        raise ValueError(f"group_ids must be int64 [{T}], got {group_ids.dtype} {tuple(group_ids.shape)}")
    if (router_weight.shape != (G, E, H) or gate_up_proj.shape != (G, E, 2 * F, H)
            or down_proj.shape != (G, E, H, F)):
        raise ValueError(f"weight shapes do not match: router {tuple(router_weight.shape)}, gate_up "
                         f"{tuple(gate_up_proj.shape)}, down {tuple(down_proj.shape)} for x {tuple(x.shape)}")
    for name, w in (("router_weight", router_weight), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj),
                    ("shared_gate_up_proj", shared_gate_up_proj), ("shared_down_proj", shared_down_proj)):
        if w is not None and w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} does not match x dtype {x.dtype}")
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k!r} out of range [1, {E}]")
    if (shared_gate_up_proj is None) != (shared_down_proj is None):
        raise ValueError("shared_gate_up_proj and shared_down_proj must be given together")
    if shared_gate_up_proj is not None:
        S, two_fs = shared_gate_up_proj.shape[1], shared_gate_up_proj.shape[2]
        if (shared_gate_up_proj.shape != (G, S, two_fs, H) or two_fs % 2 or two_fs == 0
                or shared_down_proj.shape != (G, S, H, two_fs // 2)):
            raise ValueError(f"shared weights must be [G, S, 2Fs, H] and [G, S, H, Fs], got "
                             f"{tuple(shared_gate_up_proj.shape)} and {tuple(shared_down_proj.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, *, top_k, shared_gate_up_proj=None,
                shared_down_proj=None, normalize_topk=True, return_router_logits=False, activation="silu",
                block_config=None):
    """Grouped token-level mixture of experts (contract: ``fastface.ops.grouped_moe``), differentiable.

    Parameters
    ----------
    x : Tensor [T, H], float32 or bfloat16
    group_ids : Tensor [T] int64 in [0, G)
    router_weight : Tensor [G, E, H]
    gate_up_proj : Tensor [G, E, 2F, H] -- gate rows first, then up rows
    down_proj : Tensor [G, E, H, F]
    top_k : int in [1, E]
    shared_gate_up_proj, shared_down_proj : Tensor [G, S, 2Fs, H], [G, S, H, Fs] or None
    normalize_topk : renormalise the kept top-k weights to sum to 1
    return_router_logits : also return the router logits [T, E] float32
    activation : "silu" or "gelu" (tanh)
    block_config : BlockConfig or dict of its fields, overriding the table ``BLOCK_CONFIGS``

    Returns
    -------
    y : Tensor [T, H] in x.dtype, or (y, router_logits) when return_router_logits. Gradients flow to x,
    router_weight (through softmax, top-k and renormalisation, and through the returned logits), and all
    expert weights.
    """
    tensors = (x, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, logits = _GroupedMoE.apply(x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj,
                                      shared_down_proj, top_k, normalize_topk, activation, block_config)
    else:
        y, logits, _ = grouped_moe_forward(x, group_ids, router_weight, gate_up_proj, down_proj,
                                           shared_gate_up_proj, shared_down_proj, top_k=top_k,
                                           normalize_topk=normalize_topk, activation=activation,
                                           block_config=block_config)
    return (y, logits) if return_router_logits else y
