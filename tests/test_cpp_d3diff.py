"""C++ fused D3Diff loss (csrc/d3diff.cpp), value and gradient, against the reference loss under autograd."""

import numpy as np
import pytest
import torch

pytest.importorskip("fastface._C", reason="fastface._C is not built (python setup.py build_ext --inplace)")

from fastface import _cpp, ops  # noqa: E402
from fastface._cpp import _C  # noqa: E402
from fastface.ops.d3diff import d3diff_loss_reference  # noqa: E402
from fastface.testing import assert_close  # noqa: E402

# Both sides compute in float32 from the same inputs, so values agree to float32 rounding in either dtype.
# The bf16 gradient is the float32 gradient rounded to bf16 on both sides: they differ by at most one bf16
# ulp where the float32 values straddle a rounding boundary, i.e. relative 2^-7 (8 significand bits).
VALUE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5)}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def inputs(M, V, dtype, seed, *, m_min=0.02, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(M, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (M,), generator=gen)
    mask_ratio = torch.rand(M, generator=gen).clamp(min=m_min)
    mask_ratio[::3] = 1.0  # r = 0 rows: SE is exactly 0
    return logits, targets, mask_ratio


def run(fn, logits, targets, mask_ratio, grad_out, **kw):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, targets, mask_ratio, **kw)
    loss.backward(grad_out)
    return loss.detach(), x.grad


def check(M, V, dtype, *, reduction, r_max, alpha, seed=0, **kw):
    logits, targets, mask_ratio = inputs(M, V, dtype, seed, **kw)
    grad_out = torch.tensor(1.7) if reduction == "mean" else torch.randn(M, generator=torch.Generator().manual_seed(9))
    args = dict(alpha=alpha, reduction=reduction, r_max=r_max)
    loss, grad = run(_cpp.d3diff_loss, logits, targets, mask_ratio, grad_out, **args)
    ref_loss, ref_grad = run(d3diff_loss_reference, logits, targets, mask_ratio, grad_out, **args)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad.dtype == dtype
    atol, rtol = VALUE_TOL[dtype]
    assert_close(loss, ref_loss, atol=atol * max(1.0, float(ref_loss.abs().max())), rtol=rtol, name="loss")
    g_scale = float(ref_grad.float().abs().max())
    assert_close(grad, ref_grad, atol=1e-6 * g_scale, rtol=GRAD_RTOL[dtype], name="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("M,V", [(1, 1), (3, 2), (7, 33), (129, 1000), (5, 8192), (3, 2049)])
def test_value_and_grad(M, V, reduction, dtype):
    check(M, V, dtype, reduction=reduction, r_max=None, alpha=0.5, seed=M * V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r_max,alpha", [(2.0, 0.3), (0.5, 1.0), (None, 0.0)])
def test_r_max_and_alpha(r_max, alpha, dtype):
    check(64, 777, dtype, reduction="none", r_max=r_max, alpha=alpha)
    check(64, 777, dtype, reduction="mean", r_max=r_max, alpha=alpha)


def test_small_mask_ratios_large_r():
    """m down to 1/1024 (r up to 1023), logits near 0 so SE's self-normalisation term matters."""
    check(200, 512, torch.float32, reduction="none", r_max=None, alpha=0.1, m_min=1 / 1024, scale=0.01)
    check(200, 512, torch.float32, reduction="mean", r_max=None, alpha=0.1, m_min=1 / 1024, scale=0.01)


def test_all_rows_fully_masked_have_no_score_term():
    logits, targets, _ = inputs(17, 100, torch.float32, 1)
    ones = torch.ones(17)
    with_se = _cpp.d3diff_loss(logits, targets, ones, alpha=5.0, reduction="none")
    ce_only = _cpp.d3diff_loss(logits, targets, ones, alpha=0.0, reduction="none")
    assert torch.equal(with_se, ce_only)


def test_minus_inf_logits():
    logits, targets, mask_ratio = inputs(9, 64, torch.float32, 2)
    logits[:, 5] = -torch.inf
    targets[targets == 5] = 4
    loss, grad = run(_cpp.d3diff_loss, logits, targets, mask_ratio, torch.tensor(1.0), alpha=0.5)
    ref_loss, ref_grad = run(d3diff_loss_reference, logits, targets, mask_ratio, torch.tensor(1.0), alpha=0.5)
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert bool((grad[:, 5] == 0).all())


def test_forward_saves_no_logits_sized_buffer():
    logits, targets, mask_ratio = inputs(33, 300, torch.float32, 3)
    x = logits.clone().requires_grad_(True)
    loss = _cpp.d3diff_loss(x, targets, mask_ratio, alpha=0.5)
    saved = loss.grad_fn.saved_tensors
    assert saved[0].data_ptr() == x.data_ptr()  # the input itself, not a copy
    assert sum(t.numel() for t in saved[1:]) == 3 * 33


@pytest.fixture
def portable_paths():
    _C.set_simd_kernels(False)
    yield
    _C.set_simd_kernels(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_portable_path(portable_paths, reduction, dtype):
    """The scalar code CPUs without AVX-512 run."""
    check(33, 2049, dtype, reduction=reduction, r_max=4.0, alpha=0.5)
    check(3, 1, dtype, reduction=reduction, r_max=None, alpha=0.5)


def test_ops_dispatch():
    logits, targets, mask_ratio = inputs(10, 50, torch.float32, 4)
    a = ops.d3diff_loss(logits, targets, mask_ratio, alpha=0.2, backend="cpp")
    b = ops.d3diff_loss(logits, targets, mask_ratio, alpha=0.2, backend="reference")
    assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------- the raw binding's checks


def raw_args(M=4, V=9):
    logits, targets, mask_ratio = inputs(M, V, torch.float32, 0)
    return dict(logits=logits.numpy(), targets=targets.numpy(), mask_ratio=mask_ratio.numpy(), alpha=0.5, r_max=None)


BAD = [
    (lambda a: a.update(logits=a["logits"].astype(np.float64)), TypeError, "logits must have dtype"),
    (lambda a: a.update(targets=a["targets"].astype(np.int32)), TypeError, "targets must have dtype"),
    (lambda a: a.update(mask_ratio=a["mask_ratio"].astype(np.float16)), TypeError, "mask_ratio must have dtype"),
    (lambda a: a.update(logits=np.asfortranarray(a["logits"])), ValueError, "logits must be C-contiguous"),
    (lambda a: a.update(logits=a["logits"][:, ::2]), ValueError, "logits must be C-contiguous"),
    (lambda a: a.update(targets=a["targets"][:3].copy()), ValueError, "targets must have shape"),
    (lambda a: a.update(mask_ratio=a["mask_ratio"][None]), ValueError, "mask_ratio must have 1 dims"),
    (lambda a: a["targets"].__setitem__(2, 9), ValueError, r"targets must lie in \[0, 9\), got 9 at index 2"),
    (lambda a: a["targets"].__setitem__(0, -1), ValueError, "targets must lie in"),
    (lambda a: a["mask_ratio"].__setitem__(1, 0.0), ValueError, "mask_ratio must lie in"),
    (lambda a: a["mask_ratio"].__setitem__(1, 1.5), ValueError, "mask_ratio must lie in"),
    (lambda a: a.update(r_max=-1.0), ValueError, "r_max must be positive"),
    (lambda a: a.update(alpha=float("inf")), ValueError, "alpha must be finite"),
    (lambda a: a.update(logits=np.zeros((4, 0), np.float32)), ValueError, "at least one column"),
]


@pytest.mark.parametrize("change,error,match", BAD)
def test_raw_forward_rejects_bad_arguments(change, error, match):
    args = raw_args()
    change(args)
    with pytest.raises(error, match=match):
        _C.d3diff_forward(**args)


@pytest.mark.parametrize("change,error,match", BAD + [
    (lambda a: a.update(lse=a["lse"][:2].copy()), ValueError, "lse must have shape"),
    (lambda a: a.update(grad_rows=a["grad_rows"].astype(np.float64)), TypeError, "grad_rows must have dtype"),
])
def test_raw_backward_rejects_bad_arguments(change, error, match):
    args = raw_args()
    args["lse"] = np.zeros(4, np.float32)
    args["grad_rows"] = np.ones(4, np.float32)
    change(args)
    with pytest.raises(error, match=match):
        _C.d3diff_backward(**args)
