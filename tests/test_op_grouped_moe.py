"""The op ``fastface.ops.grouped_moe`` (fastface/ops/moe.py): its reference, and every backend against it.

Legend: T tokens, H hidden, G groups, E experts per group, S shared experts, F ffn width, Fs shared ffn width,
K top-k.

Backends (``fastface.backends``), one row each:
  reference  fastface/ops/moe.py:grouped_moe_reference -- the oracle, a loop over groups and experts
  torch      fastface/torch_backend.py:grouped_moe_sorted -- each routed expert on its gathered tokens, the shared
             experts as two matmuls; forward only; not bit-exact with the reference (tolerance in ``tolerance``)
  cpp        csrc/grouped_moe.cpp through fastface._cpp (CPU; forward only); skipped when fastface._C is not built
  triton     fastface/kernels/grouped_moe.py (forward and backward); on a CUDA device compiled, on a CPU only under
             TRITON_INTERPRET=1 (slow: shapes stay small, and 16-wide blocks make H = 40, F = 24 span ragged tiles)

Sections: the contract, every backend side by side; the reference (per-token loop, routing, load balancing);
then what belongs to one backend: torch (the packed-weight cache), cpp (matmul cores, batch invariance, the raw
bindings, the transformers entry point and the Mixtral integration), triton (alignment, the routing kernel, block
table, backward, launcher checks, CUDA only).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from fastface import backends, ops
from fastface.loss import load_balancing_loss
from fastface.ops.moe import expert_ffn, grouped_moe_per_token, grouped_moe_reference, route
from fastface.testing import TOLERANCES, assert_close, backend_marks, backend_rows, make_moe_inputs
from fastface.torch_backend import grouped_moe_sorted

try:
    from fastface import _C, _cpp
except ImportError:  # the cpp rows skip
    _C = _cpp = None

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TRITON = backends.triton_usable(DEVICE)
INTERPRETED = DEVICE == "cpu"  # Triton, where usable here, runs in its (slow) interpreter
if TRITON:
    from fastface.kernels import grouped_moe as gm
    from fastface.kernels.moe_align import max_blocks, moe_align, moe_align_reference

MARKS = backend_marks(DEVICE)
needs_cpp, needs_triton = MARKS["cpp"][0], MARKS["triton"][0]


def rows(*names):
    return backend_rows(*names, marks=MARKS)


ALL = rows("reference", "torch", "cpp", "triton")
KERNELS = rows("torch", "cpp", "triton")  # every backend but the oracle
DTYPES = [torch.float32, torch.bfloat16]
WEIGHTS = ("x", "router_weight", "gate_up_proj", "down_proj", "shared_gate_up_proj", "shared_down_proj")
if TRITON:
    SMALL = gm.BlockConfig(16, 16, 16)
H, F, FS = 40, 24, 20  # the Triton tests' shapes: not multiples of 16


def device(backend):
    return DEVICE if backend == "triton" else "cpu"


def run(backend, args, **kw):
    """The backend's implementation called directly (no registry, so no fallback can stand in for it)."""
    if backend == "reference":
        return grouped_moe_reference(**args, **kw)
    if backend == "torch":
        return grouped_moe_sorted(**args, **kw)
    if backend == "cpp":
        return _cpp.grouped_moe(**args, **kw)
    return gm.grouped_moe(**args, block_config=SMALL, **kw)


def skip_if_slow_interpreted(backend, reason="a large shape: too slow under TRITON_INTERPRET; it runs on CUDA"):
    if backend == "triton" and INTERPRETED:
        pytest.skip(reason)


def tolerance(backend, dtype, ref):
    """(atol, rtol) for comparing ``backend``'s output with the float32 reference rounded to ``dtype``.

    float32, every backend: the kernels only reorder float32 sums, 1e-5 relative (fastface.testing.TOLERANCES;
    the dense torch path measured at most 3.4e-6 * rms(y)).

    bfloat16:
    * cpp: both results are rounded to bf16 once at the end, so they can land one ulp apart (a bf16 ulp is 2^-8
      to 2^-7 of the value, so rtol = 2^-7), and the kernel also rounds act(gate) * up to bf16 before the down
      projection. That rounding error is at most half an ulp, 2^-9 to 2^-8 of the value, with a standard deviation
      of about 2^-9 of it (uniform within the ulp, mantissa spread over [1, 2)), and each output sums F of them
      with independent signs: an error of std ~ 2^-9 * rms(y), bounded at 6 sigma elementwise (up to ~1e5
      elements per test, and a sum of F terms of unequal size has heavier tails than a normal).
    * triton: fastface.testing.TOLERANCES (a few bf16 roundings of the inputs and intermediates).
    * torch (dense): five intermediates are rounded to bf16 before the down projection (the gate and up
      pre-activations, act(gate), act(gate) * up and its product with the routing weight) where the reference
      rounds once at the end: about sqrt(5) times the cpp kernel's one rounding per term, and the terms of an
      output cancel (their sizes, not the output's, set the error). Elementwise: 2^-4 * rms(y) beyond rtol 2^-7
      (measured worst 2^-4.5 * rms over several hundred random cases up to 1e5 elements), and in norm within 1.5%
      (measured at most 0.71%); see ``assert_matches``. A wrong expert, weight or missing shared expert is off by
      O(rms).
    """
    if dtype == torch.float32:
        return TOLERANCES[torch.float32]
    rms = ref.float().pow(2).mean().sqrt().item()
    if backend == "cpp":
        return 6 * 2**-9 * rms, 2**-7
    if backend == "torch":
        return 2**-4 * rms, 2**-7
    return TOLERANCES[dtype]


def assert_matches(backend, y, ref, name="y"):
    atol, rtol = tolerance(backend, y.dtype, ref)
    if backend == "torch" and y.dtype == torch.bfloat16:
        e = ref.float()
        rel = ((y.float() - e).norm() / e.norm().clamp_min(1e-12)).item()
        assert rel < 1.5e-2, f"{name}: relative norm error {rel:.3g}"
    assert_close(y, ref, atol=atol, rtol=rtol, name=name)


@pytest.fixture
def matmul_path(request):
    """The C++ matmul core for the cpp rows (each in turn, auto first; the default restored afterwards)."""
    path = getattr(request, "param", None)
    if path is None:
        yield None
        return
    _C.set_matmul_path(path)
    yield path
    _C.set_matmul_path("auto")


PATHS = ["auto", "avx512", "avx2", "scalar"]  # auto = amx for bf16 where the CPU has it
# (backend, matmul core): the cpp rows sweep every core this CPU has, the other backends have one row
WITH_PATHS = [pytest.param("cpp", p, marks=[needs_cpp], id=f"cpp-{p}") for p in PATHS] + [
    pytest.param("torch", None, id="torch"), pytest.param("triton", None, marks=[needs_triton], id="triton")]


# ====================================================================================================================
# the contract: every backend against the reference
# ====================================================================================================================


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    H: int
    F: int
    G: int
    E: int
    S: int
    Fs: int | None
    K: int
    normalize: bool
    activation: str
    dtype: torch.dtype
    seed: int
    slow_interpreted: bool = False  # the Triton row skips under TRITON_INTERPRET (it runs on CUDA)

    def __str__(self):
        kind = f"{self.activation}{'' if self.normalize else '-unnormalised'}-{str(self.dtype)[6:]}"
        return f"T{self.T}-H{self.H}-F{self.F}-G{self.G}-E{self.E}-S{self.S}-K{self.K}-{kind}"

    def inputs(self, device="cpu"):
        return make_moe_inputs(self.T, self.H, self.F, G=self.G, E=self.E, S=self.S, Fs=self.Fs, dtype=self.dtype,
                               seed=self.seed, device=device)

    def kwargs(self):
        return dict(top_k=self.K, normalize_topk=self.normalize, activation=self.activation)


FORWARD_CASES = [
    # every top-k with no / two shared experts: 57 tokens in 3 groups, H = 48, F = 35
    *[Case(57, 48, 35, 3, 4, S, None, K, True, "silu", dtype, 10 * K + S, slow_interpreted=True)
      for dtype in DTYPES for K in (1, 2, 3, 4) for S in (0, 2)],
    # a single token among 8 experts, top-1: most experts get nothing
    Case(1, 33, 17, 2, 8, 0, None, 1, True, "silu", torch.float32, 11),
    # H = 40, F = 24, Fs = 20: ragged 16-wide Triton tiles; gelu and unnormalised top-k
    Case(1, H, F, 2, 4, 1, FS, 1, True, "silu", torch.float32, 2),
    Case(7, H, F, 2, 4, 0, FS, 2, True, "silu", torch.float32, 9),
    Case(67, H, F, 2, 4, 2, FS, 4, True, "silu", torch.float32, 71),
    Case(67, H, F, 2, 4, 1, FS, 3, False, "gelu", torch.float32, 70),
    Case(7, H, F, 2, 4, 1, FS, 4, True, "gelu", torch.bfloat16, 11),
    Case(67, H, F, 2, 4, 2, FS, 2, False, "silu", torch.bfloat16, 69),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_forward_matches_reference(backend, case):
    if case.slow_interpreted:
        skip_if_slow_interpreted(backend, "2-5 s a case under TRITON_INTERPRET (16 of them); it runs on CUDA")
    args = case.inputs(device(backend))
    y, logits = run(backend, args, return_router_logits=True, **case.kwargs())
    ref, ref_logits = grouped_moe_reference(**args, return_router_logits=True, **case.kwargs())
    assert y.dtype == case.dtype and y.shape == args["x"].shape and logits.dtype == torch.float32
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, name="router_logits")
    assert_matches(backend, y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 129, 1000])
@pytest.mark.parametrize("backend, matmul_path", WITH_PATHS, indirect=["matmul_path"])
def test_odd_shapes_match_reference(backend, matmul_path, T, dtype):
    # H, F not multiples of 16 (nor of 32: the bf16 vector step); mixed groups; one shared expert
    if T > 1:
        skip_if_slow_interpreted(backend)
    args = make_moe_inputs(T, 100, 72, G=2, E=6, S=1, Fs=40, dtype=dtype, seed=T, device=device(backend))
    y, logits = run(backend, args, top_k=2, return_router_logits=True)
    ref, ref_logits = grouped_moe_reference(**args, top_k=2, return_router_logits=True)
    assert y.dtype == dtype and y.shape == args["x"].shape
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, name="router_logits")
    assert_matches(backend, y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, matmul_path", WITH_PATHS, indirect=["matmul_path"])
def test_gelu_and_unnormalised(backend, matmul_path, dtype):
    skip_if_slow_interpreted(backend)
    args = make_moe_inputs(129, 67, 93, G=2, E=5, S=1, dtype=dtype, seed=3, device=device(backend))
    kw = dict(top_k=3, activation="gelu", normalize_topk=False, return_router_logits=True)
    (y, logits), (ref, ref_logits) = run(backend, args, **kw), grouped_moe_reference(**args, **kw)
    assert y.dtype == dtype and y.shape == args["x"].shape
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, name="router_logits")
    assert_matches(backend, y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNELS)
def test_experts_without_tokens(backend, dtype):
    # x[:, 0] = 4 for every token and router row (0, 2) reads it with weight -8: logit 2 of group 0 is ~ -32,
    # so expert 2 of group 0 is never chosen; all tokens are in group 0, so group 1 gets none at all
    args = make_moe_inputs(129, 40, 24, G=2, E=4, S=1, dtype=dtype, seed=5)
    args["group_ids"] = torch.zeros_like(args["group_ids"])
    args["x"][:, 0] = 4
    args["router_weight"][0, :, 0] = 0
    args["router_weight"][0, 2, 0] = -8
    args = {k: v.to(device(backend)) for k, v in args.items()}
    y, logits = run(backend, args, top_k=2, return_router_logits=True)
    ref = grouped_moe_reference(**args, top_k=2)
    assert int((logits.topk(2, dim=-1).indices == 2).sum()) == 0
    assert_matches(backend, y, ref)


EMPTY = {"H32-F16": dict(H=32, F=16, Fs=None, seed=0), "H40-F24-Fs20": dict(H=H, F=F, Fs=FS, seed=1)}


@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("backend", ALL)
def test_empty_batch(backend, shape):
    s = EMPTY[shape]
    args = make_moe_inputs(0, s["H"], s["F"], G=2, E=4, S=1, Fs=s["Fs"], seed=s["seed"], device=device(backend))
    y, logits = run(backend, args, top_k=2, return_router_logits=True)
    assert y.shape == (0, s["H"]) and logits.shape == (0, 4)


@pytest.mark.parametrize("backend", KERNELS)
def test_router_logits_and_choice_match_reference(backend):
    args = make_moe_inputs(129, 64, 32, G=2, E=8, S=0, seed=2, device=device(backend))
    _, logits = run(backend, args, top_k=3, return_router_logits=True)
    _, ref_logits = grouped_moe_reference(**args, top_k=3, return_router_logits=True)
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, name="router_logits")
    # the same experts are chosen (no near-ties in these random logits)
    chosen = torch.topk(torch.softmax(logits, -1), 3).indices
    assert torch.equal(chosen, torch.topk(torch.softmax(ref_logits, -1), 3).indices)


@pytest.mark.parametrize("backend", ALL)
def test_ties_go_to_the_lower_expert(backend):
    """Identical router rows: all E scores tie exactly, and the kernel keeps experts 0..K-1 (the rule documented
    in fastface.ops.moe.route). torch.topk itself does not promise an order among exact ties (on this CPU it
    returns experts 2, 3 here), so this is checked against the rule, not against the reference."""
    args = make_moe_inputs(5, 32, 16, G=1, E=4, S=0, seed=4)
    args["router_weight"] = args["router_weight"][:, :1].expand(1, 4, 32).contiguous()
    x, gu, dn = args["x"], args["gate_up_proj"][0], args["down_proj"][0]
    expected = 0.5 * expert_ffn(x, gu[0], dn[0]) + 0.5 * expert_ffn(x, gu[1], dn[1])
    y = run(backend, {k: v.to(device(backend)) for k, v in args.items()}, top_k=2)
    assert_close(y, expected, atol=1e-5, rtol=1e-5)


THROUGH_OPS = {
    "column-major-x": lambda: make_moe_inputs(33, 48, 24, G=2, E=4, S=1, seed=9),
    "ragged-tiles": lambda: make_moe_inputs(7, H, F, G=2, E=4, S=1, Fs=FS, seed=2),
    "tiny": lambda: make_moe_inputs(5, 8, 6),
}


@pytest.mark.parametrize("case", THROUGH_OPS)
@pytest.mark.parametrize("backend", ALL)
def test_through_ops(backend, case):
    """``ops.grouped_moe(backend=...)`` runs that backend (no fallback) and gives its result; the reference row is
    the reference function itself, bit for bit. The inputs need not be contiguous."""
    args = {k: v.to(device(backend)) for k, v in THROUGH_OPS[case]().items()}
    assert backends.resolve("grouped_moe", backend, device(backend), dtype=torch.float32) == backend
    ref = grouped_moe_reference(**args, top_k=2)
    x = args["x"].t().contiguous().t() if case == "column-major-x" else args["x"]  # the same values, column-major
    assert x.is_contiguous() == (case != "column-major-x")
    y = ops.grouped_moe(**dict(args, x=x), top_k=2, backend=backend)
    if backend == "reference":
        assert torch.equal(y, ref)
    else:
        assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_moe_group_routing_on_mixed_batch(backend):
    """Each token is routed by its own group's router and uses its own group's experts."""
    args = make_moe_inputs(40, 16, 12, E=4, S=1, seed=3, device=device(backend))
    gids = args["group_ids"]
    assert (gids == 0).any() and (gids == 1).any()
    y, logits = run(backend, args, top_k=2, return_router_logits=True)
    for g in (0, 1):
        rows_g = gids == g
        assert_close(logits[rows_g], args["x"][rows_g] @ args["router_weight"][g].t(), atol=1e-5, rtol=1e-5,
                     name=f"router logits of group {g}")
    # zeroing the other group's experts does not change this group's outputs
    for g in (0, 1):
        other = dict(args)
        for k in ("gate_up_proj", "down_proj", "shared_gate_up_proj", "shared_down_proj"):
            w = args[k].clone()
            w[1 - g] = 0
            other[k] = w
        y2 = run(backend, other, top_k=2)
        rows_g = gids == g
        assert torch.equal(y2[rows_g], y[rows_g])
        assert not torch.allclose(y2[~rows_g], y[~rows_g])


@pytest.mark.parametrize("backend", [pytest.param("auto", id="auto"), *ALL])
def test_contract_rejects_bad_arguments(backend):
    """The contract checks once, before any backend runs: whichever is asked for, a bad argument raises."""
    args = make_moe_inputs(5, 8, 6)
    with pytest.raises(ValueError, match="top_k"):
        ops.grouped_moe(**args, top_k=5, backend=backend)
    bad = dict(args, group_ids=torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="group_ids"):
        ops.grouped_moe(**bad, top_k=2, backend=backend)
    with pytest.raises(TypeError, match="x"):
        ops.grouped_moe(**dict(args, x=args["x"].double()), top_k=2, backend=backend)
    with pytest.raises(ValueError, match="down_proj"):
        ops.grouped_moe(**dict(args, down_proj=args["down_proj"][..., :-1]), top_k=2, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ops.grouped_moe(**args, top_k=2, backend="cuda")


@pytest.mark.parametrize("backend", ALL)
def test_backend_registry_resolves_to_itself(backend):
    assert backends.available("grouped_moe", backend, device(backend))
    assert backends.resolve("grouped_moe", backend, device(backend)) == backend


# ====================================================================================================================
# reference: the per-token loop, routing, the load-balancing loss on the router logits
# ====================================================================================================================


@pytest.mark.parametrize("T,H,F,E,K,S", [(1, 8, 6, 4, 1, 0), (7, 24, 20, 4, 2, 1), (33, 17, 11, 5, 3, 2),
                                         (50, 16, 16, 4, 4, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_moe_equals_per_token_loop(T, H, F, E, K, S, normalize):
    args = make_moe_inputs(T, H, F, E=E, S=S, seed=T * 7 + E)
    got = grouped_moe_reference(**args, top_k=K, normalize_topk=normalize)
    want = grouped_moe_per_token(**args, top_k=K, normalize_topk=normalize)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="grouped_moe_reference")


def test_topk_selection_and_weights():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    w, e = route(logits, 2, True)
    assert e.tolist() == [[1, 3]]
    p = torch.softmax(logits, -1)[0]
    assert_close(w[0], torch.stack([p[1], p[3]]) / (p[1] + p[3]), atol=1e-6, rtol=1e-6)
    w, _ = route(logits, 2, False)
    assert_close(w[0], torch.stack([p[1], p[3]]), atol=1e-6, rtol=1e-6)


def test_load_balancing_loss_is_one_when_balanced():
    logits = torch.zeros(8, 4)  # uniform probs: top-2 of the ties picks two experts -> f = .5 twice, P = .25
    loss = load_balancing_loss(logits, torch.zeros(8, dtype=torch.long), 2, 2)
    assert_close(loss, torch.tensor(1.0), atol=1e-6, rtol=0)
    skewed = torch.tensor([[5.0, 0, 0, 0]]).repeat(8, 1)
    assert load_balancing_loss(skewed, torch.zeros(8, dtype=torch.long), 2, 1) > 1.5


# ====================================================================================================================
# torch: the sorted formulation (each routed expert on its tokens; the shared experts packed, two matmuls)
# ====================================================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_one_group_path_equals_the_gathered_path(dtype):
    """A batch of one group runs without a gather; in a mixed batch each group's rows are gathered: the same rows
    give the same outputs either way."""
    args = make_moe_inputs(50, 36, 20, G=3, E=5, S=1, Fs=12, dtype=dtype, seed=6)
    y, logits = grouped_moe_sorted(**args, top_k=2, return_router_logits=True)
    for g in range(3):
        rows_g = args["group_ids"] == g
        alone = dict(args, x=args["x"][rows_g], group_ids=args["group_ids"][rows_g])
        y_g, logits_g = grouped_moe_sorted(**alone, top_k=2, return_router_logits=True)
        assert torch.equal(y_g, y[rows_g]), f"group {g}"
        assert torch.equal(logits_g, logits[rows_g]), f"group {g} router logits"


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_experts_without_tokens_and_shared_alone(dtype):
    """An expert no token chose runs nothing; without shared experts the routed ones are the whole output."""
    args = make_moe_inputs(2, 24, 16, G=1, E=6, S=0, dtype=dtype, seed=9)  # 2 tokens x top-2: >= 2 idle experts
    _, experts = route(args["x"].float() @ args["router_weight"][0].float().t(), 2, True)
    assert experts.unique().numel() <= 4
    atol, rtol = TOLERANCES[dtype]
    assert_close(grouped_moe_sorted(**args, top_k=2), grouped_moe_reference(**args, top_k=2), atol=atol, rtol=rtol)


def test_torch_packed_weights_follow_in_place_updates():
    """The packed expert matrices are cached per weight tensor and rebuilt when any of them changes in place (an
    optimizer step, ``load_state_dict``)."""
    args = make_moe_inputs(21, 24, 16, G=2, E=4, S=1, seed=7)
    assert_close(grouped_moe_sorted(**args, top_k=2), grouped_moe_reference(**args, top_k=2), atol=1e-5, rtol=1e-5)
    for name in ("gate_up_proj", "down_proj", "shared_gate_up_proj", "shared_down_proj"):
        with torch.no_grad():
            args[name].mul_(1.5)
        assert_close(grouped_moe_sorted(**args, top_k=2), grouped_moe_reference(**args, top_k=2), atol=1e-5,
                     rtol=1e-5, name=f"after {name} changed in place")


@pytest.mark.parametrize("name", ["down_proj", "shared_down_proj"])
def test_torch_packed_weights_follow_new_tensors(name):
    args = make_moe_inputs(21, 24, 16, G=2, E=4, S=1, seed=8)
    grouped_moe_sorted(**args, top_k=2)
    other = dict(args, **{name: args[name] * 2})  # a new tensor (in-place version 0) beside the same gate_up_proj
    assert_close(grouped_moe_sorted(**other, top_k=2), grouped_moe_reference(**other, top_k=2), atol=1e-5, rtol=1e-5)


def test_torch_is_forward_only_and_the_op_trains_elsewhere():
    args = make_moe_inputs(9, 16, 12, seed=4)
    args["down_proj"].requires_grad_(True)
    assert "torch" in backends.FORWARD_ONLY["grouped_moe"]
    assert not grouped_moe_sorted(**args, top_k=2).requires_grad  # computes no graph
    y = ops.grouped_moe(**args, top_k=2, backend="torch")  # gradients wanted: the op runs one that has them
    (g,) = torch.autograd.grad(y.sum(), args["down_proj"])
    (want,) = torch.autograd.grad(grouped_moe_reference(**args, top_k=2).sum(), args["down_proj"])
    assert torch.equal(g, want)


# ====================================================================================================================
# cpp: matmul cores, batch invariance, the raw bindings, routing given, transformers
# ====================================================================================================================


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("matmul_path", PATHS, indirect=True)
def test_cpp_deterministic_and_batch_invariant(dtype, matmul_path):
    """A token's output is bitwise the same alone, in any batch, and on every run."""
    args = make_moe_inputs(300, 80, 56, G=2, E=5, S=1, dtype=dtype, seed=7)
    y = _cpp.grouped_moe(**args, top_k=2)
    assert torch.equal(y, _cpp.grouped_moe(**args, top_k=2))
    for t in (0, 1, 150, 299):
        alone = dict(args, x=args["x"][t : t + 1].clone(), group_ids=args["group_ids"][t : t + 1].clone())
        assert torch.equal(_cpp.grouped_moe(**alone, top_k=2)[0], y[t]), f"token {t}"
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    shuffled = dict(args, x=args["x"][perm].contiguous(), group_ids=args["group_ids"][perm].contiguous())
    assert torch.equal(_cpp.grouped_moe(**shuffled, top_k=2), y[perm])


# ---- the C++ layer validates by itself: call the raw binding ----------------------------------------------------


def raw_args(T=5, H=16, F=8, G=2, E=4, S=1, dtype=torch.float32):
    a = make_moe_inputs(T, H, F, G=G, E=E, S=S, dtype=dtype)
    return {k: _cpp.to_numpy(v, k) for k, v in a.items()}


def call_raw(a, top_k=2, **over):
    a = dict(a, **over)
    return _C.grouped_moe(a["x"], a["group_ids"], a["router_weight"], a["gate_up_proj"], a["down_proj"], top_k,
                          a.get("shared_gate_up_proj"), a.get("shared_down_proj"), True, "silu", False)


@needs_cpp
def test_cpp_raw_binding_runs():
    y, logits = call_raw(raw_args())
    assert y.shape == (5, 16) and logits is None


@needs_cpp
@pytest.mark.parametrize("case, exc, match", [
    ("x_float64", TypeError, "x must have dtype"),
    ("x_int32", TypeError, "x must have dtype"),
    ("weights_dtype_mismatch", TypeError, "gate_up_proj dtype"),
    ("group_ids_int32", TypeError, "group_ids must have dtype"),
    ("x_not_contiguous", ValueError, "x must be C-contiguous"),
    ("weight_not_contiguous", ValueError, "down_proj must be C-contiguous"),
    ("x_ndim", ValueError, "x must have 2 dims"),
    ("group_ids_length", ValueError, "group_ids must have shape"),
    ("router_hidden", ValueError, "router_weight must have shape"),
    ("gate_up_odd", ValueError, "gate_up_proj must have shape"),
    ("down_shape", ValueError, "down_proj must have shape"),
    ("shared_shape", ValueError, "shared_down_proj must have shape"),
    ("shared_alone", ValueError, "given together"),
    ("group_too_large", ValueError, "group_ids must lie in"),
    ("group_negative", ValueError, "group_ids must lie in"),
    ("top_k_too_large", ValueError, "top_k=5 out of range"),
    ("top_k_zero", ValueError, "top_k=0 out of range"),
    ("activation", ValueError, "activation must be"),
    ("not_an_array", TypeError, "x must be a numpy array"),
])
def test_cpp_raw_binding_rejects(case, exc, match):
    a = raw_args()
    top_k, act = 2, "silu"
    if case == "x_float64":
        a["x"] = a["x"].astype(np.float64)
    elif case == "x_int32":
        a["x"] = a["x"].view(np.int32)
    elif case == "weights_dtype_mismatch":
        a["gate_up_proj"] = raw_args(dtype=torch.bfloat16)["gate_up_proj"]
    elif case == "group_ids_int32":
        a["group_ids"] = a["group_ids"].astype(np.int32)
    elif case == "x_not_contiguous":
        a["x"] = np.asfortranarray(a["x"])
    elif case == "weight_not_contiguous":
        a["down_proj"] = np.ascontiguousarray(np.swapaxes(a["down_proj"], 2, 3)).swapaxes(2, 3)
    elif case == "x_ndim":
        a["x"] = a["x"].reshape(5, 4, 4)
    elif case == "group_ids_length":
        a["group_ids"] = a["group_ids"][:4]
    elif case == "router_hidden":
        a["router_weight"] = np.ascontiguousarray(a["router_weight"][:, :, :15])
    elif case == "gate_up_odd":
        a["gate_up_proj"] = np.ascontiguousarray(a["gate_up_proj"][:, :, :15])
    elif case == "down_shape":
        a["down_proj"] = np.ascontiguousarray(a["down_proj"][:, :, :, :7])
    elif case == "shared_shape":
        a["shared_down_proj"] = np.ascontiguousarray(a["shared_down_proj"][:, :, :, :7])
    elif case == "shared_alone":
        a["shared_down_proj"] = None
    elif case == "group_too_large":
        a["group_ids"] = a["group_ids"].copy()
        a["group_ids"][3] = 2
    elif case == "group_negative":
        a["group_ids"] = a["group_ids"].copy()
        a["group_ids"][0] = -1
    elif case == "top_k_too_large":
        top_k = 5
    elif case == "top_k_zero":
        top_k = 0
    elif case == "activation":
        act = "relu"
    elif case == "not_an_array":
        a["x"] = [[1.0] * 16] * 5
    with pytest.raises(exc, match=match):
        _C.grouped_moe(a["x"], a["group_ids"], a["router_weight"], a["gate_up_proj"], a["down_proj"], top_k,
                       a["shared_gate_up_proj"], a["shared_down_proj"], True, act, False)


@needs_cpp
def test_cpp_raw_experts_binding_rejects():
    a = raw_args(G=1, S=0)
    x, gu, dn = a["x"], a["gate_up_proj"][0], a["down_proj"][0]
    idx = np.zeros((5, 2), dtype=np.int64)
    w = np.full((5, 2), 0.5, dtype=np.float32)
    assert _C.moe_experts(x, idx, w, gu, dn, "silu").shape == (5, 16)
    bad = idx.copy()
    bad[2, 1] = 4
    with pytest.raises(ValueError, match="top_k_index must lie in"):
        _C.moe_experts(x, bad, w, gu, dn, "silu")
    with pytest.raises(ValueError, match="top_k_weights must have shape"):
        _C.moe_experts(x, idx, w[:, :1].copy(), gu, dn, "silu")
    with pytest.raises(TypeError, match="top_k_weights must have dtype"):
        _C.moe_experts(x, idx, w.astype(np.float64), gu, dn, "silu")
    with pytest.raises(ValueError, match="down_proj must have shape"):
        _C.moe_experts(x, idx, w, gu, np.ascontiguousarray(dn[:, :, :7]), "silu")


@needs_cpp
def test_cpp_wrapper_errors():
    args = make_moe_inputs(3, 16, 8)
    with pytest.raises(ValueError, match="on the CPU"):
        _cpp.to_numpy(torch.empty(2, device="meta"), "x")
    with pytest.raises(ValueError, match="top_k=9 out of range"):
        _cpp.grouped_moe(**args, top_k=9)


# ---- routing given (the transformers entry point) -----------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, K", [(1, 1), (7, 2), (129, 4)])
def test_cpp_moe_experts_matches_loop(T, K, dtype):
    a = make_moe_inputs(T, 44, 30, G=1, E=6, S=0, dtype=dtype, seed=T + K)
    gen = torch.Generator().manual_seed(T)
    idx = torch.stack([torch.randperm(6, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen)
    gu, dn = a["gate_up_proj"][0], a["down_proj"][0]
    xf = a["x"].float()
    ref = torch.zeros(T, 44)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            gate, up = (xf[t] @ gu[e].float().t()).chunk(2)
            ref[t] += w[t, k] * ((torch.nn.functional.silu(gate) * up) @ dn[e].float().t())
    ref = ref.to(dtype)
    y = _cpp.moe_experts(a["x"], idx, w, gu, dn)
    atol, rtol = tolerance("cpp", dtype, ref)
    assert_close(y, ref, atol=atol, rtol=rtol)


# ---- transformers: a Mixtral sparse block with experts_implementation="fastface" ----------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_mixtral_block_fastface_equals_eager(dtype):
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import fastface.hf

    assert fastface.hf.register()
    cfg = MixtralConfig(hidden_size=72, intermediate_size=100, num_local_experts=6, num_experts_per_tok=2)
    torch.manual_seed(0)
    cfg._experts_implementation = "eager"
    eager = MixtralSparseMoeBlock(cfg)
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.1)
    eager = eager.to(dtype).eval()
    cfg_ff = MixtralConfig(hidden_size=72, intermediate_size=100, num_local_experts=6, num_experts_per_tok=2)
    cfg_ff._experts_implementation = "fastface"
    fast = MixtralSparseMoeBlock(cfg_ff).to(dtype).eval()
    fast.load_state_dict(eager.state_dict())
    x = torch.randn(3, 11, 72).to(dtype)
    with torch.no_grad():
        got = fast(x)
        if dtype == torch.float32:
            ref = eager(x)
        else:
            # eager in bf16 rounds after every op (its error is several ulps); the exact result of the block on
            # these bf16 weights is eager in float32, which the kernel must match within bf16 rounding
            ref = eager.float()(x.float())
    atol, rtol = tolerance("cpp", dtype, ref)
    assert_close(got, ref, atol=atol, rtol=rtol, name="mixtral block")


@needs_cpp
def test_cpp_mixtral_model_loads_with_fastface_experts(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import MixtralConfig, MixtralForCausalLM

    import fastface.hf  # noqa: F401 - registers "fastface"

    cfg = MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    # _from_config writes the implementation into the config it is given: one copy each
    eager = MixtralForCausalLM._from_config(copy.deepcopy(cfg), experts_implementation="eager").eval()
    fast = MixtralForCausalLM._from_config(copy.deepcopy(cfg), experts_implementation="fastface").eval()
    assert eager.config._experts_implementation == "eager"
    fast.load_state_dict(eager.state_dict())
    calls = []
    kernel = _cpp.moe_experts
    monkeypatch.setattr(_cpp, "moe_experts", lambda *a, **k: (calls.append(1), kernel(*a, **k))[1])
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(fast(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5, name="logits")
    assert len(calls) == 2  # one kernel call per layer


# ====================================================================================================================
# triton: alignment, the routing kernel, block table, backward, launcher checks, CUDA only
# ====================================================================================================================


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


# ---- alignment --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("P,NE,BM", [(1, 4, 16), (7, 8, 16), (268, 8, 16), (134, 16, 32), (0, 3, 16), (2050, 5, 64)])
def test_triton_align_matches_loop_and_is_block_aligned(P, NE, BM):
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
    blocks = sorted_ids.view(nb, BM)[:used]
    for b in range(used):
        pairs = blocks[b][blocks[b] < P]
        assert pairs.numel() > 0, "no block in use is all padding"
        assert bool((ids[pairs] == block_expert[b]).all()), "blocks are expert-pure"
        assert bool((pairs.diff() > 0).all()), "pairs keep ascending order inside an expert"
    counts = torch.bincount(ids, minlength=NE)
    assert torch.equal(block_start.diff(), (counts + BM - 1) // BM)


# ---- the routing kernel -----------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("K,normalize", [(1, True), (2, True), (3, False), (4, True)])
def test_triton_route_matches_reference(K, normalize):
    T, E, G = 67, 6, 3
    gen = torch.Generator().manual_seed(K)
    logits = torch.randn(T, E, generator=gen)
    group_ids = torch.randint(0, G, (T,), generator=gen)
    w, experts = gm.route(logits.to(DEVICE), group_ids.to(DEVICE), K, normalize)
    w_ref, e_ref = route(logits, K, normalize)
    assert torch.equal(experts.cpu().long(), e_ref + group_ids[:, None] * E)
    assert_close(w.cpu(), w_ref, atol=1e-6, rtol=1e-6, name="weights")


@needs_triton
def test_triton_route_ties_go_to_lower_index():
    logits = torch.tensor([[0.5, 2.0, 2.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0], [3.0, -1.0, 3.0, 0.0, 3.0]])
    w, experts = gm.route(logits.to(DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE), 3, False)
    assert experts.cpu().tolist() == [[1, 2, 3], [0, 1, 2], [0, 2, 4]]
    assert_close(w.cpu(), torch.softmax(logits, -1).gather(1, experts.cpu().long()), atol=1e-7, rtol=1e-6,
                 name="weights")


# ---- forward: the block table -----------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("table_entry", [None, 1, 2])
def test_triton_forward_block_table_entries_and_mixed_shared_width(table_entry):
    # None: the table's pick for these shapes; 1, 2: the larger-M entries forced; tiles overhang H = 72, F = 40
    args = make_moe_inputs(67, 72, 40, G=3, E=5, S=2, Fs=24, seed=3, device=DEVICE)
    cfg = None if table_entry is None else gm.BLOCK_CONFIGS[table_entry][1]
    y = gm.grouped_moe(**args, top_k=2, block_config=cfg)
    assert_close(y, grouped_moe_reference(**args, top_k=2), atol=1e-5, rtol=1e-5, name="y")


@needs_triton
def test_triton_block_table_and_override():
    decode = gm.pick_block_config(num_pairs=2 * 8, num_experts=2 * 64)
    prefill = gm.pick_block_config(num_pairs=8192 * 8, num_experts=2 * 64)
    assert decode.block_m < prefill.block_m and decode.block_n <= prefill.block_n
    assert gm.pick_block_config(16, 8, {"block_m": 32, "block_n": 16, "block_k": 16}) == gm.BlockConfig(32, 16, 16)
    with pytest.raises(ValueError):
        gm.BlockConfig(8, 16, 16)  # tl.dot needs 16


# ---- backward ---------------------------------------------------------------------------------------------------


@needs_triton
def test_triton_empty_experts_and_single_group():
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


BACKWARD_CASES = [
    # T, K, S, normalize, activation, dtype
    (1, 2, 1, True, "silu", torch.float32),
    (7, 4, 0, False, "gelu", torch.float32),
    (67, 2, 2, True, "silu", torch.float32),
    (67, 1, 1, True, "gelu", torch.float32),
    (67, 3, 1, True, "silu", torch.bfloat16),
    (7, 2, 2, False, "gelu", torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("T,K,S,normalize,activation,dtype", BACKWARD_CASES)
def test_triton_backward_matches_reference_autograd(T, K, S, normalize, activation, dtype):
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


@needs_triton
def test_triton_tile_multiple_shapes():
    # H, F, Fs multiples of the 16-wide blocks: the unmasked (EVEN_K) main loops
    args = make_moe_inputs(7, 32, 16, G=2, E=4, S=1, Fs=32, seed=8, device=DEVICE)
    gen = torch.Generator().manual_seed(8)
    dy = torch.randn(7, 32, generator=gen).to(DEVICE)
    dl = torch.randn(7, 4, generator=gen).to(DEVICE)
    (y, logits, grads), (y_ref, logits_ref, grads_ref) = _run_both(args, dy, dl, top_k=2)
    assert_close(y, y_ref, atol=1e-5, rtol=1e-5, name="y")
    for name in WEIGHTS:
        assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5, name=f"d {name}")


@needs_triton
def test_triton_partial_requires_grad():
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


@needs_triton
def test_triton_backward_from_inputs_only():
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


@needs_triton
def test_triton_deterministic_forward_and_backward():
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


# ---- the launcher's own checks ----------------------------------------------------------------------------------


@needs_triton
def test_triton_bad_arguments_raise():
    args = _inputs(3)
    with pytest.raises(ValueError):
        gm.grouped_moe(**args, top_k=5)
    with pytest.raises(ValueError):
        gm.grouped_moe(**args, top_k=1, activation="relu")
    with pytest.raises(TypeError):
        gm.grouped_moe(**{**args, "down_proj": args["down_proj"].double()}, top_k=1)


# ---- CUDA only --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and host syncs exist on CUDA only")
def test_triton_no_host_sync_and_cuda_graph_capture():
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
