"""Triton grouped-expert dispatch against the reference: alignment, routing, forward and every gradient.

Legend: T tokens, H hidden, G groups, E experts per group, S shared experts, F ffn, Fs shared ffn, K top-k.

On a CPU these run under TRITON_INTERPRET=1 (slow: shapes stay small); on a CUDA device they run compiled.
Small 16-wide blocks make H = 40, F = 24 span several ragged tiles.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from fastface import backends

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
if not backends.triton_usable(DEVICE):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastface import ops  # noqa: E402
from fastface.kernels import grouped_moe as gm  # noqa: E402
from fastface.kernels.moe_align import max_blocks, moe_align, moe_align_reference  # noqa: E402
from fastface.ops.moe import grouped_moe_reference, route  # noqa: E402
from fastface.testing import TOLERANCES, assert_close, make_moe_inputs  # noqa: E402

SMALL = gm.BlockConfig(16, 16, 16)
WEIGHTS = ("x", "router_weight", "gate_up_proj", "down_proj", "shared_gate_up_proj", "shared_down_proj")
H, F, FS = 40, 24, 20  # not multiples of 16


def _inputs(T, *, dtype=torch.float32, seed=0, E=4, S=1, G=2):
    return make_moe_inputs(T, H, F, G=G, E=E, S=S, Fs=FS, dtype=dtype, seed=seed, device=DEVICE)


def _assert_grad_close(actual, expected, dtype, name):
    """float32: TOLERANCES as they are. bfloat16: a weight gradient sums, over up to T tokens, products whose
    factors (h, the pre-activation gradient, per-slot outputs) are stored in bf16, so its error grows with the
    size of the terms rather than of the result (values reach ~40 here). The whole tensor must agree to 1% in
    norm (a few bf16 roundings; measured ~0.3%), and element-wise atol is taken relative to the rms of the
    expected gradient."""
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.bfloat16:
        e = expected.float()
        rel = ((actual.float() - e).norm() / e.norm().clamp_min(1e-12)).item()
        assert rel < 1e-2, f"{name}: relative norm error {rel:.3g}"
        atol = 2 * atol * max(1.0, e.pow(2).mean().sqrt().item())
    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)


def _run_both(args, dy, dl, **kw):
    """Forward and backward of the kernel and of the reference on the same inputs; returns both results."""
    results = []
    for fn in (lambda **a: gm.grouped_moe(**a, block_config=SMALL), grouped_moe_reference):
        leaf = {k: (v.detach().clone().requires_grad_(True) if k in WEIGHTS else v) for k, v in args.items()}
        y, logits = fn(**leaf, return_router_logits=True, **kw)
        ((y.float() * dy.float()).sum() + (logits * dl).sum()).backward()
        results.append((y.detach(), logits.detach(), {k: leaf[k].grad for k in WEIGHTS if k in leaf}))
    return results


# ------------------------------------------------------------------------------------------------ alignment


@pytest.mark.parametrize("P,NE,BM", [(1, 4, 16), (7, 8, 16), (268, 8, 16), (134, 16, 32), (0, 3, 16), (2050, 5, 64)])
def test_align_matches_loop_and_is_block_aligned(P, NE, BM):
    gen = torch.Generator().manual_seed(P + NE)
    ids = torch.randint(0, NE, (P,), generator=gen)
    if P > 8:
        ids[ids == 1] = 2  # an empty expert in the middle
    al = moe_align(ids.to(torch.int32).to(DEVICE), NE, BM)
    ref = moe_align_reference(ids.to(torch.int32), NE, BM)
    for got, want, name in zip(al[:3], ref[:3], ("sorted_ids", "block_expert", "block_start")):
        assert torch.equal(got.cpu(), want), name
    nb = max_blocks(P, NE, BM)
    sorted_ids, block_expert, block_start = (t.cpu().long() for t in al[:3])
    assert sorted_ids.numel() == nb * BM and block_expert.numel() == nb
    real = sorted_ids[sorted_ids < P]
    assert torch.equal(real.sort().values, torch.arange(P)), "every pair appears exactly once"
    assert bool((sorted_ids <= P).all()), "padding rows hold the sentinel P"
    used = int(block_start[NE])
    assert bool((block_expert[used:] == -1).all()) and bool((block_expert[:used] >= 0).all())
    rows = sorted_ids.view(nb, BM)[:used]
    for b in range(used):
        pairs = rows[b][rows[b] < P]
        assert pairs.numel() > 0, "no block in use is all padding"
        assert bool((ids[pairs] == block_expert[b]).all()), "blocks are expert-pure"
        assert bool((pairs.diff() > 0).all()), "pairs keep ascending order inside an expert"
    counts = torch.bincount(ids, minlength=NE)
    assert torch.equal(block_start.diff(), (counts + BM - 1) // BM)


# ------------------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("K,normalize", [(1, True), (2, True), (3, False), (4, True)])
def test_route_matches_reference(K, normalize):
    T, E, G = 67, 6, 3
    gen = torch.Generator().manual_seed(K)
    logits = torch.randn(T, E, generator=gen)
    group_ids = torch.randint(0, G, (T,), generator=gen)
    w, experts = gm.route(logits.to(DEVICE), group_ids.to(DEVICE), K, normalize)
    w_ref, e_ref = route(logits, K, normalize)
    assert torch.equal(experts.cpu().long(), e_ref + group_ids[:, None] * E)
    assert_close(w.cpu(), w_ref, atol=1e-6, rtol=1e-6, name="weights")


def test_route_ties_go_to_lower_index():
    logits = torch.tensor([[0.5, 2.0, 2.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0], [3.0, -1.0, 3.0, 0.0, 3.0]])
    w, experts = gm.route(logits.to(DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE), 3, False)
    assert experts.cpu().tolist() == [[1, 2, 3], [0, 1, 2], [0, 2, 4]]
    assert_close(w.cpu(), torch.softmax(logits, -1).gather(1, experts.cpu().long()), atol=1e-7, rtol=1e-6,
                 name="weights")


# ------------------------------------------------------------------------------------------------ forward


FORWARD_CASES = [
    # T, K, S, normalize, activation, dtype
    (1, 1, 1, True, "silu", torch.float32),
    (7, 2, 0, True, "silu", torch.float32),
    (67, 4, 2, True, "silu", torch.float32),
    (67, 3, 1, False, "gelu", torch.float32),
    (7, 4, 1, True, "gelu", torch.bfloat16),
    (67, 2, 2, False, "silu", torch.bfloat16),
]


@pytest.mark.parametrize("T,K,S,normalize,activation,dtype", FORWARD_CASES)
def test_forward_matches_reference(T, K, S, normalize, activation, dtype):
    args = _inputs(T, dtype=dtype, seed=T + K, S=S)
    kw = dict(top_k=K, normalize_topk=normalize, activation=activation, return_router_logits=True)
    y, logits = gm.grouped_moe(**args, block_config=SMALL, **kw)
    y_ref, logits_ref = grouped_moe_reference(**args, **kw)
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype and logits.dtype == torch.float32
    assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5, name="router_logits")
    assert_close(y, y_ref, atol=atol, rtol=rtol, name="y")


@pytest.mark.parametrize("table_entry", [None, 1, 2])
def test_forward_block_table_entries_and_mixed_shared_width(table_entry):
    # None: the table's pick for these shapes; 1, 2: the larger-M entries forced; tiles overhang H = 72, F = 40
    args = make_moe_inputs(67, 72, 40, G=3, E=5, S=2, Fs=24, seed=3, device=DEVICE)
    cfg = None if table_entry is None else gm.BLOCK_CONFIGS[table_entry][1]
    y = gm.grouped_moe(**args, top_k=2, block_config=cfg)
    assert_close(y, grouped_moe_reference(**args, top_k=2), atol=1e-5, rtol=1e-5, name="y")


def test_empty_experts_and_single_group():
    # 8 experts, 2 tokens, top-2: most experts get no pair; every token in group 1 leaves group 0 idle
    args = _inputs(2, seed=5, E=8, S=1)
    args["group_ids"] = torch.ones(2, dtype=torch.int64, device=DEVICE)
    dy = torch.randn(2, H, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dl = torch.zeros(2, 8, device=DEVICE)
    (y, logits, grads), (y_ref, logits_ref, grads_ref) = _run_both(args, dy, dl, top_k=2)
    assert_close(y, y_ref, atol=1e-5, rtol=1e-5, name="y")
    for name in WEIGHTS:
        assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5, name=f"d {name}")
    assert not grads["gate_up_proj"][0].any() and not grads["shared_down_proj"][0].any(), "idle group: zero grads"


def test_zero_tokens():
    args = _inputs(0, seed=1)
    y, logits = gm.grouped_moe(**args, top_k=2, block_config=SMALL, return_router_logits=True)
    assert y.shape == (0, H) and logits.shape == (0, 4)


def test_ops_dispatch_reaches_triton():
    args = _inputs(7, seed=2)
    y = ops.grouped_moe(**args, top_k=2, backend="triton")
    assert_close(y, grouped_moe_reference(**args, top_k=2), atol=1e-5, rtol=1e-5, name="y")


# ------------------------------------------------------------------------------------------------ backward


BACKWARD_CASES = [
    # T, K, S, normalize, activation, dtype
    (1, 2, 1, True, "silu", torch.float32),
    (7, 4, 0, False, "gelu", torch.float32),
    (67, 2, 2, True, "silu", torch.float32),
    (67, 1, 1, True, "gelu", torch.float32),
    (67, 3, 1, True, "silu", torch.bfloat16),
    (7, 2, 2, False, "gelu", torch.bfloat16),
]


@pytest.mark.parametrize("T,K,S,normalize,activation,dtype", BACKWARD_CASES)
def test_backward_matches_reference_autograd(T, K, S, normalize, activation, dtype):
    args = _inputs(T, dtype=dtype, seed=100 + T + K, S=S, E=5)
    gen = torch.Generator().manual_seed(T)
    dy = torch.randn(T, H, generator=gen).to(dtype=dtype, device=DEVICE)
    dl = torch.randn(T, 5, generator=gen).to(DEVICE)  # a loss on the router logits too (load balancing)
    (y, logits, grads), (y_ref, logits_ref, grads_ref) = _run_both(
        args, dy, dl, top_k=K, normalize_topk=normalize, activation=activation)
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, y_ref, atol=atol, rtol=rtol, name="y")
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert grads[name] is not None and grads[name].dtype == dtype, name
        _assert_grad_close(grads[name], grads_ref[name], dtype, f"d {name}")


def test_tile_multiple_shapes():
    # H, F, Fs multiples of the 16-wide blocks: the unmasked (EVEN_K) main loops
    args = make_moe_inputs(7, 32, 16, G=2, E=4, S=1, Fs=32, seed=8, device=DEVICE)
    gen = torch.Generator().manual_seed(8)
    dy = torch.randn(7, 32, generator=gen).to(DEVICE)
    dl = torch.randn(7, 4, generator=gen).to(DEVICE)
    (y, logits, grads), (y_ref, logits_ref, grads_ref) = _run_both(args, dy, dl, top_k=2)
    assert_close(y, y_ref, atol=1e-5, rtol=1e-5, name="y")
    for name in WEIGHTS:
        assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5, name=f"d {name}")


def test_partial_requires_grad():
    # only the expert weights train (router frozen, x a constant): the other gradients are not formed
    args = _inputs(7, seed=9)
    args["gate_up_proj"].requires_grad_(True)
    args["down_proj"].requires_grad_(True)
    y = gm.grouped_moe(**args, top_k=2, block_config=SMALL)
    y.sum().backward()
    ref = {k: v.detach().clone().requires_grad_(k in ("gate_up_proj", "down_proj")) for k, v in args.items()}
    grouped_moe_reference(**ref, top_k=2).sum().backward()
    for name in ("gate_up_proj", "down_proj"):
        assert_close(args[name].grad, ref[name].grad, atol=1e-5, rtol=1e-5, name=f"d {name}")


# ------------------------------------------------------------------------------------------------ determinism


def test_deterministic_forward_and_backward():
    args = _inputs(31, dtype=torch.bfloat16, seed=11, S=1)
    dy = torch.randn(31, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEVICE)
    dl = torch.zeros(31, 4, device=DEVICE)
    runs = []
    for _ in range(2):
        leaf = {k: (v.detach().clone().requires_grad_(True) if k in WEIGHTS else v) for k, v in args.items()}
        y, logits = gm.grouped_moe(**leaf, top_k=3, block_config=SMALL, return_router_logits=True)
        ((y.float() * dy.float()).sum() + (logits * dl).sum()).backward()
        runs.append([y.detach()] + [leaf[k].grad for k in WEIGHTS])
    for a, b in zip(*runs):
        assert torch.equal(a, b), "bitwise identical across runs"


# ------------------------------------------------------------------------------------------------ block table


def test_block_table_and_override():
    decode = gm.pick_block_config(num_pairs=2 * 8, num_experts=2 * 64)
    prefill = gm.pick_block_config(num_pairs=8192 * 8, num_experts=2 * 64)
    assert decode.block_m < prefill.block_m and decode.block_n <= prefill.block_n
    assert gm.pick_block_config(16, 8, {"block_m": 32, "block_n": 16, "block_k": 16}) == gm.BlockConfig(32, 16, 16)
    with pytest.raises(ValueError):
        gm.BlockConfig(8, 16, 16)  # tl.dot needs 16


def test_bad_arguments_raise():
    args = _inputs(3)
    with pytest.raises(ValueError):
        gm.grouped_moe(**args, top_k=5)
    with pytest.raises(ValueError):
        gm.grouped_moe(**args, top_k=1, activation="relu")
    with pytest.raises(TypeError):
        gm.grouped_moe(**{**args, "down_proj": args["down_proj"].double()}, top_k=1)


def test_backward_from_inputs_only():
    # the tensor-only entry (forward recomputed inside backward) gives the autograd.Function's gradients
    args = _inputs(7, seed=4, S=1)
    dy = torch.randn(7, H, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    dl = torch.randn(7, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (_, _, grads), _ = _run_both(args, dy, dl, top_k=2)
    recomputed = gm.grouped_moe_backward(dy, dl, *(args[k] for k in ("x", "group_ids", "router_weight", "gate_up_proj",
                                                                      "down_proj", "shared_gate_up_proj",
                                                                      "shared_down_proj")),
                                         top_k=2, block_config=tuple(dataclasses.astuple(SMALL)))
    for name, g in zip(WEIGHTS, recomputed):
        assert torch.equal(g, grads[name]), name


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and host syncs exist on CUDA only")
def test_no_host_sync_and_cuda_graph_capture():
    args = _inputs(67, dtype=torch.bfloat16, seed=6, S=1)
    torch.cuda.set_sync_debug_mode("error")  # any device -> host sync raises
    try:
        y_eager = gm.grouped_moe(**args, top_k=2)
        leaf = {k: (v.detach().clone().requires_grad_(True) if k in WEIGHTS else v) for k, v in args.items()}
        gm.grouped_moe(**leaf, top_k=2).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = gm.grouped_moe(**args, top_k=2)
    new_x = torch.randn_like(args["x"])
    args["x"].copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y_graph, gm.grouped_moe(**args, top_k=2), atol=0, rtol=0, name="graph replay")
    assert not torch.equal(y_graph, y_eager)
