"""Fused D3Diff loss (kernels/d3diff.py) against the reference loss: value and gradient.

Runs under TRITON_INTERPRET=1 on a CPU (skipped when Triton cannot run here).

Tolerances. The loss is computed in float32 from the logits as given, so its value matches the float32 reference
to float32 rounding for float32 and bfloat16 logits alike (rtol 1e-5). The gradient is float32 arithmetic too;
for bfloat16 logits it is rounded once to bfloat16, as the reference's gradient is (its ``.float()`` casts the
gradient back): two roundings of nearly equal float32 values are equal or one bfloat16 ulp apart, and one ulp
is at most 2^-7 of the value (8 significant bits).
"""

import pytest
import torch

from fastface import ops
from fastface.backends import available, triton_usable
from fastface.ops.d3diff import d3diff_loss_reference
from fastface.testing import assert_close

pytestmark = pytest.mark.skipif(not triton_usable("cpu"), reason="Triton not usable here (set TRITON_INTERPRET=1)")

if triton_usable("cpu"):
    from fastface.kernels.d3diff import d3diff_loss, d3diff_loss_backward, d3diff_terms

VALUE_TOL = dict(atol=1e-6, rtol=1e-5)
BF16_ULP = 2.0**-7  # largest relative spacing of bfloat16 numbers


def grad_tol(expected, dtype):
    """(atol, rtol) for a gradient: float32 rounding, or one bfloat16 ulp; atol scaled to the gradient's size."""
    scale = float(expected.abs().max())
    if dtype == torch.bfloat16:
        return dict(atol=1e-6 * scale, rtol=BF16_ULP)
    return dict(atol=1e-6 * scale, rtol=1e-5)


def make_inputs(M, V, dtype, seed, *, full_rows=1, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(M, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (M,), generator=gen)
    ratio = torch.rand(M, generator=gen).clamp(1.0 / 64, 1.0)
    ratio[:full_rows] = 1.0  # m = 1: r = 0, SE = 0
    return logits, targets, ratio


def value_and_grad(fn, logits, targets, ratio, grad_seed=0, **kw):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, targets, ratio, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed)) if loss.dim() else None
    (grad,) = torch.autograd.grad(loss, leaf, g)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("M,V", [(1, 1), (3, 2), (5, 33), (7, 257), (4, 1000), (3, 5000)])
def test_value_and_gradient(M, V, reduction, dtype):
    logits, targets, ratio = make_inputs(M, V, dtype, seed=M * 100 + V)
    kw = dict(alpha=0.3, reduction=reduction)
    got, got_grad = value_and_grad(d3diff_loss, logits, targets, ratio, **kw)
    want, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, **kw)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, name="loss", **VALUE_TOL)
    assert got_grad.dtype == dtype
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [17, 100, 1000])
def test_multi_block_rows(V, dtype):
    """Rows longer than the block (16 columns here): online logsumexp and a blockwise gradient."""
    logits, targets, ratio = make_inputs(5, V, dtype, seed=V)
    _, _, lse = d3diff_terms(logits, targets, ratio)
    ce, se, lse16 = d3diff_terms(logits, targets, ratio, block_v=16)
    assert_close(lse16, lse, name="lse", **VALUE_TOL)
    from fastface.ops.d3diff import d3diff_terms as reference_terms

    want_ce, want_se = reference_terms(logits, targets, ratio)
    assert_close(ce, want_ce, name="ce", **VALUE_TOL)
    assert_close(se, want_se, name="se", **VALUE_TOL)
    g = torch.randn(5)
    got = d3diff_loss_backward(g, logits, targets, ratio, alpha=0.4, reduction="none", block_v=16)
    leaf = logits.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(d3diff_loss_reference(leaf, targets, ratio, alpha=0.4, reduction="none"), leaf, g)
    assert_close(got, want, name="grad", **grad_tol(want, dtype))


@pytest.mark.parametrize("r_max", [None, 0.5, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_r_max_and_alpha(alpha, r_max):
    logits, targets, ratio = make_inputs(9, 65, torch.float32, seed=2, full_rows=2)
    ratio[2] = 1.0 / 64  # r = 63: clipped by r_max
    kw = dict(alpha=alpha, reduction="none", r_max=r_max)
    got, got_grad = value_and_grad(d3diff_loss, logits, targets, ratio, **kw)
    want, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, **kw)
    assert_close(got, want, name="loss", **VALUE_TOL)
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, torch.float32))


def test_terms_and_full_rows():
    """Per-row CE and SE; SE (and its gradient) exactly 0 where m = 1."""
    from fastface.ops.d3diff import d3diff_terms as reference_terms

    logits, targets, ratio = make_inputs(6, 40, torch.float32, seed=3, full_rows=3)
    ce, se, lse = d3diff_terms(logits, targets, ratio)
    want_ce, want_se = reference_terms(logits, targets, ratio)
    assert_close(ce, want_ce, name="ce", **VALUE_TOL)
    assert_close(se, want_se, name="se", **VALUE_TOL)
    assert_close(lse, torch.logsumexp(logits, -1), name="lse", **VALUE_TOL)
    assert bool((se[:3] == 0).all())
    _, grad_se_only = value_and_grad(d3diff_loss, logits, targets, ratio, alpha=1.0, reduction="none")
    _, grad_ce_only = value_and_grad(d3diff_loss, logits, targets, ratio, alpha=0.0, reduction="none")
    assert torch.equal(grad_se_only[:3], grad_ce_only[:3])


def test_realistic_scale_many_rows():
    """Logits of a trained-model scale (sharp rows), a few hundred rows, mean reduction."""
    logits, targets, ratio = make_inputs(300, 97, torch.float32, seed=4, full_rows=30, scale=8.0)
    got, got_grad = value_and_grad(d3diff_loss, logits, targets, ratio, alpha=0.1, r_max=16.0)
    want, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, alpha=0.1, r_max=16.0)
    assert_close(got, want, name="loss", **VALUE_TOL)
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_without_saved_lse_and_in_place(dtype):
    """The backward recomputing lse equals the one given it; the gradient can overwrite the logits' buffer."""
    logits, targets, ratio = make_inputs(5, 300, dtype, seed=5)
    _, _, lse = d3diff_terms(logits, targets, ratio)
    g = torch.randn(5)
    kw = dict(alpha=0.5, reduction="none", r_max=8.0)
    with_lse = d3diff_loss_backward(g, logits, targets, ratio, lse=lse, **kw)
    recomputed = d3diff_loss_backward(g, logits, targets, ratio, **kw)
    assert_close(recomputed, with_lse, name="grad", **grad_tol(with_lse, dtype))
    buffer = logits.clone()
    out = d3diff_loss_backward(g, buffer, targets, ratio, out=buffer, **kw)
    assert out is buffer
    assert torch.equal(out, recomputed)


def test_strided_rows():
    wide = torch.randn(6, 50) * 3
    logits = wide[:, 5:42]  # [6, 37] rows with stride 50
    _, targets, ratio = make_inputs(6, 37, torch.float32, seed=6)
    got, got_grad = value_and_grad(d3diff_loss, logits, targets, ratio, alpha=0.2)
    want, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, alpha=0.2)
    assert_close(got, want, name="loss", **VALUE_TOL)
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, torch.float32))


def test_no_grad_path_and_ops_backend():
    logits, targets, ratio = make_inputs(4, 21, torch.bfloat16, seed=7)
    want = d3diff_loss_reference(logits, targets, ratio, alpha=0.3)
    with torch.no_grad():
        assert_close(d3diff_loss(logits, targets, ratio, alpha=0.3), want, name="loss", **VALUE_TOL)
    got, got_grad = value_and_grad(ops.d3diff_loss, logits, targets, ratio, alpha=0.3, backend="triton")
    _, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, alpha=0.3)
    assert_close(got, want, name="loss", **VALUE_TOL)
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, torch.bfloat16))


@pytest.mark.skipif(not available("d3diff_loss", "cpp"), reason="cpp backend has no d3diff_loss here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_cpp_agree(dtype):
    logits, targets, ratio = make_inputs(7, 257, dtype, seed=8)
    kw = dict(alpha=0.3, reduction="none", r_max=8.0)
    got, got_grad = value_and_grad(ops.d3diff_loss, logits, targets, ratio, backend="triton", **kw)
    want, want_grad = value_and_grad(ops.d3diff_loss, logits, targets, ratio, backend="cpp", **kw)
    assert_close(got, want, name="loss", **VALUE_TOL)
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, dtype))


def test_rejects_bad_arguments():
    logits, targets, ratio = make_inputs(3, 8, torch.float32, seed=0)
    with pytest.raises(ValueError):
        d3diff_loss(logits, targets[:2], ratio, alpha=0.1)
    with pytest.raises(ValueError):
        d3diff_loss(logits, targets, ratio, alpha=0.1, reduction="sum")
    with pytest.raises(ValueError):
        d3diff_terms(logits.half(), targets, ratio)
