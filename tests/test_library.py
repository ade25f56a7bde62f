"""torch.library registration of the three ops (fastface/library.py): opcheck, and torch.compile with fullgraph=True.

The triton cases run under TRITON_INTERPRET=1 and are skipped when Triton cannot run here.
"""

import shutil

import pytest
import torch

from fastface import library, ops
from fastface.backends import available, triton_usable
from fastface.ops.d3diff import d3diff_loss_reference
from fastface.ops.masked_decode import masked_decode_step_reference
from fastface.ops.moe import grouped_moe_reference
from fastface.testing import assert_close, make_decode_inputs, make_moe_inputs

BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(
        not all(available(op, "cpp") for op in ("grouped_moe", "masked_decode_step", "d3diff_loss")),
        reason="cpp backend not built")),
    pytest.param("triton", marks=pytest.mark.skipif(
        not triton_usable("cpu"), reason="Triton not usable here (set TRITON_INTERPRET=1)")),
]
TOL = dict(atol=1e-5, rtol=1e-5)
# torch's own modules (inductor) use torch.jit.script_method when imported; nothing here calls it
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def moe_args(T=7, H=16, F=12, dtype=torch.float32, S=1, seed=0):
    a = make_moe_inputs(T, H, F, S=S, dtype=dtype, seed=seed)
    return (a["x"], a["group_ids"], a["router_weight"], a["gate_up_proj"], a["down_proj"],
            a.get("shared_gate_up_proj"), a.get("shared_down_proj"))


def d3diff_args(M=6, V=33, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ratio = torch.rand(M, generator=gen).clamp(0.05, 1.0)
    ratio[0] = 1.0
    return torch.randn(M, V, generator=gen) * 2, torch.randint(0, V, (M,), generator=gen), ratio


# ---------------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False])
def test_opcheck_grouped_moe(backend, shared):
    args = [t.requires_grad_() if t is not None and t.is_floating_point() else t
            for t in moe_args(S=1 if shared else 0)]
    torch.library.opcheck(torch.ops.fastface.grouped_moe.default, tuple(args),
                          dict(top_k=2, normalize_topk=True, activation="silu", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_opcheck_masked_decode_step(backend, guidance):
    args = make_decode_inputs(2, 7, 33, guidance=guidance, seed=1)
    torch.library.opcheck(torch.ops.fastface.masked_decode_step.default, args,
                          dict(step=1, steps=4, guidance=guidance, sample_temperature=1.0,
                               confidence_temperature=4.5, schedule="cosine", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,r_max", [("mean", None), ("none", 2.0)])
def test_opcheck_d3diff_loss(backend, reduction, r_max):
    logits, targets, ratio = d3diff_args()
    torch.library.opcheck(torch.ops.fastface.d3diff_loss.default, (logits.requires_grad_(), targets, ratio),
                          dict(alpha=0.3, reduction=reduction, r_max=r_max, backend=backend))


# ---------------------------------------------------------------------------------------------------- eager


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrappers_match_reference_with_gradients(backend):
    x, gid, rw, gu, dn, sgu, sdn = (t.requires_grad_() if t.is_floating_point() else t for t in moe_args(seed=2))
    kw = dict(top_k=2, shared_gate_up_proj=sgu, shared_down_proj=sdn, return_router_logits=True)
    y, logits = library.grouped_moe(x, gid, rw, gu, dn, backend=backend, **kw)
    want_y, want_logits = grouped_moe_reference(x, gid, rw, gu, dn, **kw)
    assert_close(y, want_y, name="y", **TOL)
    assert_close(logits, want_logits, name="router_logits", **TOL)
    upstream = torch.randn_like(y)
    leaves = (x, rw, gu, dn, sgu, sdn)
    got = torch.autograd.grad((y * upstream).sum() + logits.square().sum(), leaves)
    want = torch.autograd.grad((want_y * upstream).sum() + want_logits.square().sum(), leaves)
    for name, g, w in zip(("x", "router_weight", "gate_up_proj", "down_proj", "shared_gate_up", "shared_down"),
                          got, want):
        assert_close(g, w, name=f"d {name}", atol=1e-4, rtol=1e-4)

    logits, targets, ratio = d3diff_args(seed=3)
    leaf = logits.clone().requires_grad_()
    loss = library.d3diff_loss(leaf, targets, ratio, alpha=0.3, r_max=4.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf)
    want = d3diff_loss_reference(logits.requires_grad_(), targets, ratio, alpha=0.3, r_max=4.0)
    assert_close(loss, want, name="d3diff", **TOL)
    assert_close(grad, torch.autograd.grad(want, logits)[0], name="d3diff grad", atol=1e-7, rtol=1e-5)

    dec = make_decode_inputs(3, 9, 17, guidance=1.5, seed=4)
    kw = dict(step=0, steps=3, guidance=1.5, confidence_temperature=4.5)
    for got, want in zip(library.masked_decode_step(*dec, backend=backend, **kw),
                         masked_decode_step_reference(*dec, **kw)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------- compile


class TinyFaceBlock(torch.nn.Module):
    """x -> x + grouped MoE(x) -> codebook head -> D3Diff loss (+ a router z-loss), all through the custom ops."""

    def __init__(self, H=16, F=12, V=33, backend="reference"):
        super().__init__()
        _, _, rw, gu, dn, sgu, sdn = moe_args(H=H, F=F, seed=5)
        self.router_weight, self.gate_up_proj, self.down_proj = (torch.nn.Parameter(t) for t in (rw, gu, dn))
        self.shared_gate_up_proj, self.shared_down_proj = torch.nn.Parameter(sgu), torch.nn.Parameter(sdn)
        self.head = torch.nn.Linear(H, V)
        self.backend = backend

    def forward(self, x, group_ids, targets, mask_ratio):
        y, router_logits = library.grouped_moe(
            x, group_ids, self.router_weight, self.gate_up_proj, self.down_proj, top_k=2,
            shared_gate_up_proj=self.shared_gate_up_proj, shared_down_proj=self.shared_down_proj,
            return_router_logits=True, backend=self.backend)
        logits = self.head(torch.nn.functional.layer_norm(x + y, x.shape[-1:]))
        loss = library.d3diff_loss(logits, targets, mask_ratio, alpha=0.3, backend=self.backend)
        return loss + 1e-3 * router_logits.square().mean(), logits


def _compile_and_compare(backend, compiler):
    torch.manual_seed(0)
    model = TinyFaceBlock(backend=backend)
    x = torch.randn(7, 16)
    group_ids = torch.randint(0, 2, (7,))
    targets, mask_ratio = torch.randint(0, 33, (7,)), torch.rand(7).clamp(0.05, 1.0)
    loss, logits = model(x, group_ids, targets, mask_ratio)
    loss.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)  # fullgraph: a graph break raises
    got_loss, got_logits = compiled(x, group_ids, targets, mask_ratio)
    got_loss.backward()
    assert_close(got_loss, loss, name="loss", **TOL)
    assert_close(got_logits, logits, name="logits", **TOL)
    for (name, p), want in zip(model.named_parameters(), want_grads):
        assert_close(p.grad, want, name=f"d {name}", **TOL)

    @torch.compile(backend=compiler, fullgraph=True)
    def decode_step(logits, tokens, masked, u):
        tokens, masked = library.masked_decode_step(logits, tokens, masked, u, step=1, steps=4, guidance=2.0,
                                                    confidence_temperature=4.5, backend=backend)
        return tokens, masked, masked.sum(-1)

    dec = make_decode_inputs(2, 9, 17, guidance=2.0, seed=6)
    tokens, masked, count = decode_step(*dec)
    want = masked_decode_step_reference(*dec, step=1, steps=4, guidance=2.0, confidence_temperature=4.5)
    assert torch.equal(tokens, want[0]) and torch.equal(masked, want[1])
    assert torch.equal(count, want[1].sum(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_aot_eager(backend):
    _compile_and_compare(backend, "aot_eager")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compile_fullgraph_inductor():
    _compile_and_compare("reference", "inductor")


def test_ops_and_library_agree_on_auto():
    """backend="auto" resolves inside the op, at run time, as fastface.ops resolves it."""
    dec = make_decode_inputs(2, 5, 11, seed=7)
    kw = dict(step=0, steps=2)
    for got, want in zip(library.masked_decode_step(*dec, **kw), ops.masked_decode_step(*dec, **kw)):
        assert torch.equal(got, want)
