"""C++ grouped-expert kernel (csrc/grouped_moe.cpp) against fastface.ops.moe.grouped_moe_reference.

Legend: T tokens, H hidden, G groups, E experts per group, S shared experts, F ffn width, K top-k.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fastface import ops
from fastface.ops.moe import expert_ffn, grouped_moe_reference
from fastface.testing import TOLERANCES, assert_close, make_moe_inputs

_C = pytest.importorskip("fastface._C", reason="fastface._C is not built")
from fastface import _cpp  # noqa: E402

PATHS = ["auto", "avx512", "avx2", "scalar"]  # auto = amx for bf16 where the CPU has it


@pytest.fixture(params=PATHS)
def matmul_path(request):
    """Every matmul core this CPU has (auto first); the default is restored afterwards."""
    _C.set_matmul_path(request.param)
    yield request.param
    _C.set_matmul_path("auto")


def tolerance(dtype, ref):
    """(atol, rtol) for comparing with the float32 reference rounded to ``dtype``.

    float32: the kernel only reorders float32 sums, 1e-5 relative (fastface.testing.TOLERANCES).
    bfloat16: both results are rounded to bf16 once at the end, so they can land one ulp apart (a bf16
    ulp is 2^-8 to 2^-7 of the value, so rtol = 2^-7), and the kernel also rounds act(gate) * up to bf16
    before the down projection. That rounding error is at most half an ulp, 2^-9 to 2^-8 of the value,
    with a standard deviation of about 2^-9 of it (uniform within the ulp, mantissa spread over [1, 2)),
    and each output sums F of them with independent signs: an error of std ~ 2^-9 * rms(y), bounded at
    6 sigma elementwise (up to ~1e5 elements per test, and a sum of F terms of unequal size has heavier
    tails than a normal).
    """
    if dtype == torch.float32:
        return TOLERANCES[torch.float32]
    rms = ref.float().pow(2).mean().sqrt().item()
    return 6 * 2**-9 * rms, 2**-7


def run_both(args, **kw):
    ref = grouped_moe_reference(**args, return_router_logits=True, **kw)
    got = _cpp.grouped_moe(**args, return_router_logits=True, **kw)
    return got, ref


def check(args, name="y", **kw):
    (y, logits), (ry, rlogits) = run_both(args, **kw)
    assert y.dtype == args["x"].dtype and y.shape == args["x"].shape
    atol, rtol = tolerance(y.dtype, ry)
    assert_close(y, ry, atol=atol, rtol=rtol, name=name)
    assert_close(logits, rlogits, atol=1e-5, rtol=1e-5, name="router_logits")
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 129, 1000])
def test_matches_reference(T, dtype, matmul_path):
    # H, F not multiples of 16 (nor of 32: the bf16 vector step); mixed groups; one shared expert
    args = make_moe_inputs(T, 100, 72, G=2, E=6, S=1, Fs=40, dtype=dtype, seed=T)
    check(args, top_k=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("S", [0, 2])
def test_top_k_and_shared(top_k, S, dtype):
    args = make_moe_inputs(57, 48, 35, G=3, E=4, S=S, dtype=dtype, seed=10 * top_k + S)
    check(args, top_k=top_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_and_unnormalised(dtype, matmul_path):
    args = make_moe_inputs(129, 67, 93, G=2, E=5, S=1, dtype=dtype, seed=3)
    check(args, top_k=3, activation="gelu", normalize_topk=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_without_tokens(dtype):
    # x[:, 0] = 4 for every token and router row (0, 2) reads it with weight -8: logit 2 of group 0 is ~ -32,
    # so expert 2 of group 0 is never chosen; all tokens are in group 0, so group 1 gets none at all
    args = make_moe_inputs(129, 40, 24, G=2, E=4, S=1, dtype=dtype, seed=5)
    args["group_ids"] = torch.zeros_like(args["group_ids"])
    args["x"][:, 0] = 4
    args["router_weight"][0, :, 0] = 0
    args["router_weight"][0, 2, 0] = -8
    (y, logits), (ry, rlogits) = run_both(args, top_k=2)
    assert int((logits.topk(2, dim=-1).indices == 2).sum()) == 0
    atol, rtol = tolerance(dtype, ry)
    assert_close(y, ry, atol=atol, rtol=rtol)


def test_single_token_uses_few_experts():
    args = make_moe_inputs(1, 33, 17, G=2, E=8, S=0, seed=11)
    check(args, top_k=1)


def test_empty_batch():
    args = make_moe_inputs(0, 32, 16, G=2, E=4, S=1)
    y, logits = _cpp.grouped_moe(**args, top_k=2, return_router_logits=True)
    assert y.shape == (0, 32) and logits.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_and_batch_invariant(dtype, matmul_path):
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


def test_router_logits_and_choice_match_reference():
    args = make_moe_inputs(129, 64, 32, G=2, E=8, S=0, seed=2)
    (_, logits), (_, rlogits) = run_both(args, top_k=3)
    assert_close(logits, rlogits, atol=1e-5, rtol=1e-5, name="router_logits")
    # the same experts are chosen (no near-ties in these random logits)
    chosen = torch.topk(torch.softmax(logits, -1), 3).indices
    assert torch.equal(chosen, torch.topk(torch.softmax(rlogits, -1), 3).indices)


def test_ties_go_to_the_lower_expert():
    """Identical router rows: all E scores tie exactly, and the kernel keeps experts 0..K-1 (the rule documented
    in fastface.ops.moe.route). torch.topk itself does not promise an order among exact ties (on this CPU it
    returns experts 2, 3 here), so this is checked against the rule, not against the reference."""
    args = make_moe_inputs(5, 32, 16, G=1, E=4, S=0, seed=4)
    args["router_weight"] = args["router_weight"][:, :1].expand(1, 4, 32).contiguous()
    x, gu, dn = args["x"], args["gate_up_proj"][0], args["down_proj"][0]
    expected = 0.5 * expert_ffn(x, gu[0], dn[0]) + 0.5 * expert_ffn(x, gu[1], dn[1])
    assert_close(_cpp.grouped_moe(**args, top_k=2), expected, atol=1e-5, rtol=1e-5)


def test_through_ops_and_non_contiguous_inputs():
    args = make_moe_inputs(33, 48, 24, G=2, E=4, S=1, seed=9)
    ref = grouped_moe_reference(**args, top_k=2)
    wide = args["x"].t().contiguous().t()  # the same values, column-major
    assert not wide.is_contiguous()
    y = ops.grouped_moe(**dict(args, x=wide), top_k=2, backend="cpp")
    assert_close(y, ref, atol=1e-5, rtol=1e-5)


# ---- the C++ layer validates by itself: call the raw binding ----------------------------------------------


def raw_args(T=5, H=16, F=8, G=2, E=4, S=1, dtype=torch.float32):
    a = make_moe_inputs(T, H, F, G=G, E=E, S=S, dtype=dtype)
    return {k: _cpp.to_numpy(v, k) for k, v in a.items()}


def call_raw(a, top_k=2, **over):
    a = dict(a, **over)
    return _C.grouped_moe(a["x"], a["group_ids"], a["router_weight"], a["gate_up_proj"], a["down_proj"], top_k,
                          a.get("shared_gate_up_proj"), a.get("shared_down_proj"), True, "silu", False)


def test_raw_binding_runs():
    y, logits = call_raw(raw_args())
    assert y.shape == (5, 16) and logits is None


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
def test_raw_binding_rejects(case, exc, match):
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


def test_raw_experts_binding_rejects():
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


def test_wrapper_errors():
    args = make_moe_inputs(3, 16, 8)
    with pytest.raises(ValueError, match="on the CPU"):
        _cpp.to_numpy(torch.empty(2, device="meta"), "x")
    with pytest.raises(ValueError, match="top_k=9 out of range"):
        _cpp.grouped_moe(**args, top_k=9)


def test_backend_registry_picks_cpp():
    from fastface import backends

    assert backends.available("grouped_moe", "cpp")
    assert backends.resolve("grouped_moe", "cpp") == "cpp"


# ---- routing given (the transformers entry point) ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, K", [(1, 1), (7, 2), (129, 4)])
def test_moe_experts_matches_loop(T, K, dtype):
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
    atol, rtol = tolerance(dtype, ref)
    assert_close(y, ref, atol=atol, rtol=rtol)


# ---- transformers: a Mixtral sparse block with experts_implementation="fastface" ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_block_fastface_equals_eager(dtype):
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
    atol, rtol = tolerance(dtype, ref)
    assert_close(got, ref, atol=atol, rtol=rtol, name="mixtral block")


def test_mixtral_model_loads_with_fastface_experts(monkeypatch):
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
