"""Block-aligned expert sorting of (token, slot) pairs, on device and without a host sync.

Legend: T tokens, K slots per token (top-k, or S shared experts), P = T*K pairs, NE flat experts
(G groups times E experts per group), BM rows per block.

A grouped GEMM walks the pairs expert by expert in blocks of BM rows, every block holding pairs of
a single expert. This module lays the pairs out that way:

    sorted_ids    [max_blocks * BM] int32   pair id p (= t*K + k) per row; P marks a padding row
    block_expert  [max_blocks] int32        the expert of each block; -1 marks an unused block
    block_start   [NE + 1] int32            first block of each expert; block_start[NE] = blocks in use

Within an expert the pairs keep ascending pair id (a stable sort), so the layout -- and every sum
the kernels take over it -- is the same from run to run. All sizes are worst-case, fixed by the
shapes alone: an expert with c pairs takes ceil(c / BM) blocks, so at most ceil(P / BM) + NE blocks
are in use. Nothing is read back to the host, so the layout can be computed inside a CUDA graph.

Two launches: ``_moe_align_count_kernel`` (one program per expert: its pair count) and
``_moe_align_scatter_kernel`` (one program per expert: a prefix sum over the padded counts gives its
first block, a running in-chunk cumsum gives each pair's rank, and its blocks are tagged).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_align_count_kernel(expert_ids_ptr, counts_ptr, num_pairs, BLOCK: tl.constexpr):
    # one program per expert: how many pairs chose it
    e = tl.program_id(0)
    total = tl.zeros((), dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=-1)
        total += tl.sum((ids == e).to(tl.int32), axis=0)
    tl.store(counts_ptr + e, total)


@triton.jit
def _moe_align_scatter_kernel(expert_ids_ptr, counts_ptr, sorted_ids_ptr, block_expert_ptr, block_start_ptr,
                              num_pairs, num_experts, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                              BLOCK_E: tl.constexpr):
    e = tl.program_id(0)
    # first block of expert e: exclusive prefix sum of the padded block counts
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
    nblocks = (counts + BLOCK_M - 1) // BLOCK_M  # [BLOCK_E]
    first = tl.sum(tl.where(offs_e < e, nblocks, 0), axis=0)
    mine = tl.sum(tl.where(offs_e == e, nblocks, 0), axis=0)
    tl.store(block_start_ptr + e, first)
    if e == num_experts - 1:
        tl.store(block_start_ptr + num_experts, first + mine)
    # rows: pairs of expert e in ascending pair id
    row0 = first * BLOCK_M
    seen = tl.zeros((), dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(expert_ids_ptr + offs, mask=offs < num_pairs, other=-1)
        hit = (ids == e).to(tl.int32)
        rank = seen + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_ids_ptr + row0 + rank, offs, mask=hit > 0)
        seen += tl.sum(hit, axis=0)
    # tag the expert's blocks
    for b in range(0, mine, BLOCK):
        offs_b = b + tl.arange(0, BLOCK)
        tl.store(block_expert_ptr + first + offs_b, tl.full((BLOCK,), 0, tl.int32) + e, mask=offs_b < mine)


class Alignment(NamedTuple):
    """Block-aligned layout of P pairs over NE experts (see the module docstring)."""

    sorted_ids: torch.Tensor  # [max_blocks * BM] int32, P = padding
    block_expert: torch.Tensor  # [max_blocks] int32, -1 = unused
    block_start: torch.Tensor  # [NE + 1] int32
    block_m: int
    num_pairs: int
    num_experts: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case number of blocks in use: ceil(P / BM) + NE."""
    return triton.cdiv(num_pairs, block_m) + num_experts


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort pairs by expert into blocks of ``block_m`` rows, each block holding one expert's pairs.

    Parameters
    ----------
    expert_ids : Tensor [P] int32 -- the flat expert (in [0, NE)) of each pair, pair p = t*K + k
    num_experts : int -- NE
    block_m : int -- BM, rows per block (a power of two, at least 16 for tl.dot)

    Returns
    -------
    Alignment with sorted_ids [max_blocks * BM], block_expert [max_blocks], block_start [NE + 1]
    (int32), where max_blocks = ceil(P / BM) + NE. No host synchronisation.
    """
    if expert_ids.dim() != 1 or expert_ids.dtype != torch.int32:
        raise ValueError(f"expert_ids must be a 1-D int32 tensor, got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    if not expert_ids.is_contiguous():
        raise ValueError("expert_ids must be contiguous")
    if num_experts < 1 or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"need num_experts >= 1 and a power-of-two block_m, got {num_experts}, {block_m}")
    P = expert_ids.numel()
    nb = max_blocks(P, num_experts, block_m)
    dev = expert_ids.device
    sorted_ids = torch.full((nb * block_m,), P, dtype=torch.int32, device=dev)
    block_expert = torch.full((nb,), -1, dtype=torch.int32, device=dev)
    block_start = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    BLOCK = min(1024, max(16, triton.next_power_of_2(P)))
    BLOCK_E = max(16, triton.next_power_of_2(num_experts))
    _moe_align_count_kernel[(num_experts,)](expert_ids, counts, P, BLOCK=BLOCK)
    _moe_align_scatter_kernel[(num_experts,)](expert_ids, counts, sorted_ids, block_expert, block_start, P,
                                              num_experts, BLOCK_M=block_m, BLOCK=BLOCK, BLOCK_E=BLOCK_E)
    return Alignment(sorted_ids, block_expert, block_start, block_m, P, num_experts)


def moe_align_reference(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """The same layout computed with a plain loop over experts (host side; for tests)."""
    ids = expert_ids.long().cpu()
    P = ids.numel()
    nb = max_blocks(P, num_experts, block_m)
    sorted_ids = torch.full((nb * block_m,), P, dtype=torch.int32)
    block_expert = torch.full((nb,), -1, dtype=torch.int32)
    block_start = torch.zeros(num_experts + 1, dtype=torch.int32)
    b = 0
    for e in range(num_experts):
        pairs = torch.nonzero(ids == e).flatten()  # ascending pair id
        n = triton.cdiv(pairs.numel(), block_m)
        block_start[e] = b
        sorted_ids[b * block_m : b * block_m + pairs.numel()] = pairs.to(torch.int32)
        block_expert[b : b + n] = e
        b += n
    block_start[num_experts] = b
    return Alignment(sorted_ids, block_expert, block_start, block_m, P, num_experts)
