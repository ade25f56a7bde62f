"""The op ``fastface.ops.d3diff_loss`` (fastface/ops/d3diff.py): its reference against the literal formulas, and every
backend against the reference, value and gradient.

Legend: M loss rows (masked image positions), V codebook size, m the mask ratio of a row, r = (1 - m) / m.

Backends (``fastface.backends``), one row each:
  reference  fastface/ops/d3diff.py:d3diff_loss_reference -- the oracle (autograd gives its gradient)
  cpp        csrc/d3diff.cpp through fastface._cpp (CPU, fused forward and backward); skipped when fastface._C is
             not built
  triton     fastface/kernels/d3diff.py, here on CPU tensors under TRITON_INTERPRET=1 (skipped otherwise)

Tolerances. Both kernels compute the loss in float32 from the logits as given, so its value matches the float32
reference to float32 rounding for float32 and bfloat16 logits alike (rtol 1e-5; atol 1e-6, or for cpp 1e-5 of the
loss's size). The gradient is float32 arithmetic too; for bfloat16 logits it is rounded once to bfloat16, as the
reference's gradient is (its ``.float()`` casts the gradient back): two roundings of nearly equal float32 values are
equal or one bfloat16 ulp apart, and one ulp is at most 2^-7 of the value (8 significant bits).

Sections: the reference against the literal per-position formulas; the contract, every backend side by side; then
what belongs to one backend: cpp (the portable path, the raw bindings' checks), triton (per-row terms and
multi-block rows, the backward's own entry, the launcher's checks).
"""

import math

import numpy as np
import pytest
import torch

from fastface import backends, ops
from fastface.ops.d3diff import d3diff_loss_reference, d3diff_terms
from fastface.testing import assert_close, backend_marks, backend_rows

try:
    from fastface import _C, _cpp
except ImportError:  # the cpp rows skip
    _C = _cpp = None

TRITON = backends.triton_usable("cpu")
if TRITON:
    from fastface.kernels import d3diff as triton_d3diff

MARKS = backend_marks("cpu")
needs_cpp, needs_triton = MARKS["cpp"][0], MARKS["triton"][0]


def rows(*names):
    return backend_rows(*names, marks=MARKS)


ALL = rows("reference", "cpp", "triton")
KERNELS = rows("cpp", "triton")  # every backend but the oracle
DTYPES = [torch.float32, torch.bfloat16]
BF16_ULP = 2.0**-7  # largest relative spacing of bfloat16 numbers


def loss_fn(backend):
    """The backend's implementation called directly (no registry, so no fallback can stand in for it)."""
    if backend == "reference":
        return d3diff_loss_reference
    if backend == "cpp":
        return _cpp.d3diff_loss
    return triton_d3diff.d3diff_loss


def value_tol(backend, expected):
    """(atol, rtol) for the loss: float32 rounding (the module docstring)."""
    if backend == "cpp":
        return dict(atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=1e-5)
    return dict(atol=1e-6, rtol=1e-5)


def grad_tol(expected, dtype):
    """(atol, rtol) for a gradient: float32 rounding, or one bfloat16 ulp; atol scaled to the gradient's size."""
    scale = float(expected.float().abs().max())
    if dtype == torch.bfloat16:
        return dict(atol=1e-6 * scale, rtol=BF16_ULP)
    return dict(atol=1e-6 * scale, rtol=1e-5)


def make_inputs(M, V, dtype, seed, *, m_min=1.0 / 64, full_rows=slice(0, 1), scale=3.0):
    """logits [M, V] (randn * scale), targets [M], mask ratios [M] in [m_min, 1) with the rows ``full_rows`` at
    m = 1 (r = 0: the score-entropy term is exactly 0)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(M, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (M,), generator=gen)
    ratio = torch.rand(M, generator=gen).clamp(m_min, 1.0)
    ratio[full_rows] = 1.0
    return logits, targets, ratio


EVERY_THIRD = dict(m_min=0.02, full_rows=slice(None, None, 3))  # every third row fully masked, m down to 0.02


def upstream(reduction, M, seed):
    """The upstream gradient of the every-third family: 1.7 for the mean, a random [M] for per-row values."""
    return torch.tensor(1.7) if reduction == "mean" else torch.randn(M, generator=torch.Generator().manual_seed(seed))


def value_and_grad(fn, logits, targets, ratio, grad_out=None, **kw):
    """The loss and its gradient with respect to the logits, for the upstream gradient ``grad_out`` (one for a
    scalar loss when None)."""
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, targets, ratio, **kw)
    (grad,) = torch.autograd.grad(loss, leaf, grad_out)
    return loss.detach(), grad


def check_against_reference(backend, logits, targets, ratio, grad_out=None, **kw):
    got, got_grad = value_and_grad(loss_fn(backend), logits, targets, ratio, grad_out, **kw)
    want, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, grad_out, **kw)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, name="loss", **value_tol(backend, want))
    assert got_grad.dtype == logits.dtype
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, logits.dtype))
    return got, got_grad


# ====================================================================================================================
# reference: the literal formulas, one position at a time
# ====================================================================================================================


def loop_d3diff(logits, targets, mask_ratio, alpha, r_max=None):
    """The literal formulas of fastface/ops/d3diff.py's docstring, one position at a time, in float64."""
    ce, se = [], []
    for i in range(logits.shape[0]):
        l = logits[i].double()
        m = float(mask_ratio[i])
        ce_i = torch.logsumexp(l, 0) - l[targets[i]]
        if m >= 1.0:
            se_i = torch.zeros((), dtype=torch.float64)
        else:
            sigma = -math.log(1 - m)
            r = 1 / (math.exp(sigma) - 1)
            if r_max is not None:
                r = min(r, r_max)
            s = l + math.log(r)  # log-scores with the (clipped) r
            se_i = s.exp().sum() - r * s[targets[i]] + r * (math.log(r) - 1)
        ce.append(ce_i)
        se.append(se_i)
    return torch.stack(ce).mean() + alpha * torch.stack(se).mean()


@pytest.mark.parametrize("M,V", [(1, 2), (7, 33), (64, 257)])
@pytest.mark.parametrize("r_max", [None, 3.0])
def test_d3diff_value_and_gradient_against_loop(M, V, r_max):
    gen = torch.Generator().manual_seed(M * V)
    logits = torch.randn(M, V, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (M,), generator=gen)
    mask_ratio = torch.rand(M, generator=gen).clamp(0.05, 1.0)
    mask_ratio[0] = 1.0  # everything masked: r = 0
    x = logits.float().requires_grad_()
    got = d3diff_loss_reference(x, targets, mask_ratio, alpha=0.3, r_max=r_max)
    got.backward()
    x64 = logits.clone().requires_grad_()
    want = loop_d3diff(x64, targets, mask_ratio, 0.3, r_max)
    want.backward()
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(x.grad, x64.grad, atol=1e-6, rtol=1e-4, name="grad")


def test_score_entropy_identity():
    """SE = r * (CE + Z - 1 - log Z) with Z = sum exp(l)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 40, (50,), generator=gen)
    m = torch.rand(50, generator=gen).clamp(0.05, 0.95)
    ce, se = d3diff_terms(logits, targets, m)
    r = (1 - m.double()) / m.double()
    Z = logits.exp().sum(-1)
    assert_close(se, r * (ce + Z - 1 - Z.log()), atol=1e-4, rtol=1e-5, name="SE identity")
    assert bool((se >= -1e-5).all()), "score entropy is non-negative"


# ====================================================================================================================
# the contract: every backend against the reference, value and gradient
# ====================================================================================================================

SHAPES = {
    # two input families: every third row fully masked (m >= 0.02, seed M * V), or the first row (m >= 1/64,
    # seed 100 M + V); one row and one column up to rows longer than a block, several blocks, and 8192 columns
    "every-third": [(1, 1), (3, 2), (7, 33), (129, 1000), (5, 8192), (3, 2049)],
    "first-row": [(1, 1), (3, 2), (5, 33), (7, 257), (4, 1000), (3, 5000)],
}
VALUE_CASES = [(family, M, V) for family, shapes in SHAPES.items() for M, V in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("family,M,V", VALUE_CASES)
@pytest.mark.parametrize("backend", KERNELS)
def test_value_and_gradient(backend, family, M, V, reduction, dtype):
    if family == "every-third":
        logits, targets, ratio = make_inputs(M, V, dtype, M * V, **EVERY_THIRD)
        check_against_reference(backend, logits, targets, ratio, upstream(reduction, M, 9), alpha=0.5,
                                reduction=reduction)
    else:
        logits, targets, ratio = make_inputs(M, V, dtype, M * 100 + V)
        grad_out = None if reduction == "mean" else torch.randn(M, generator=torch.Generator().manual_seed(0))
        check_against_reference(backend, logits, targets, ratio, grad_out, alpha=0.3, reduction=reduction)


R_MAX_CASES = [
    # 64 x 777, both reductions, every third row fully masked
    *[("64x777", dtype, r_max, alpha) for dtype in DTYPES for r_max, alpha in [(2.0, 0.3), (0.5, 1.0), (None, 0.0)]],
    # 9 x 65, two rows fully masked and one at m = 1/64 (r = 63: clipped by r_max)
    *[("9x65", torch.float32, r_max, alpha) for r_max in (None, 0.5, 4.0) for alpha in (0.0, 1.0)],
]


@pytest.mark.parametrize("case,dtype,r_max,alpha", R_MAX_CASES)
@pytest.mark.parametrize("backend", KERNELS)
def test_r_max_and_alpha(backend, case, dtype, r_max, alpha):
    kw = dict(alpha=alpha, r_max=r_max)
    if case == "64x777":
        logits, targets, ratio = make_inputs(64, 777, dtype, 0, **EVERY_THIRD)
        check_against_reference(backend, logits, targets, ratio, upstream("none", 64, 9), reduction="none", **kw)
        check_against_reference(backend, logits, targets, ratio, upstream("mean", 64, 9), reduction="mean", **kw)
    else:
        logits, targets, ratio = make_inputs(9, 65, dtype, 2, full_rows=slice(0, 2))
        ratio[2] = 1.0 / 64  # r = 63: clipped by r_max
        check_against_reference(backend, logits, targets, ratio, upstream("none", 9, 0), reduction="none", **kw)


@pytest.mark.parametrize("backend", KERNELS)
def test_small_mask_ratios_large_r(backend):
    """m down to 1/1024 (r up to 1023), logits near 0 so SE's self-normalisation term matters."""
    logits, targets, ratio = make_inputs(200, 512, torch.float32, 0, m_min=1 / 1024, full_rows=slice(None, None, 3),
                                         scale=0.01)
    check_against_reference(backend, logits, targets, ratio, upstream("none", 200, 9), alpha=0.1, reduction="none")
    check_against_reference(backend, logits, targets, ratio, upstream("mean", 200, 9), alpha=0.1, reduction="mean")


@pytest.mark.parametrize("backend", KERNELS)
def test_realistic_scale_many_rows(backend):
    """Logits of a trained-model scale (sharp rows), a few hundred rows, mean reduction."""
    logits, targets, ratio = make_inputs(300, 97, torch.float32, 4, full_rows=slice(0, 30), scale=8.0)
    check_against_reference(backend, logits, targets, ratio, alpha=0.1, r_max=16.0)


@pytest.mark.parametrize("backend", ALL)
def test_all_rows_fully_masked_have_no_score_term(backend):
    logits, targets, _ = make_inputs(17, 100, torch.float32, 1, **EVERY_THIRD)
    ones = torch.ones(17)
    with_se = loss_fn(backend)(logits, targets, ones, alpha=5.0, reduction="none")
    ce_only = loss_fn(backend)(logits, targets, ones, alpha=0.0, reduction="none")
    assert torch.equal(with_se, ce_only)


@pytest.mark.parametrize("backend", KERNELS)
def test_minus_inf_logits(backend):
    logits, targets, mask_ratio = make_inputs(9, 64, torch.float32, 2, **EVERY_THIRD)
    logits[:, 5] = -torch.inf
    targets[targets == 5] = 4
    loss, grad = value_and_grad(loss_fn(backend), logits, targets, mask_ratio, alpha=0.5)
    ref_loss, ref_grad = value_and_grad(d3diff_loss_reference, logits, targets, mask_ratio, alpha=0.5)
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert bool((grad[:, 5] == 0).all())


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_rows(backend):
    wide = torch.randn(6, 50) * 3
    logits = wide[:, 5:42]  # [6, 37] rows with stride 50
    _, targets, ratio = make_inputs(6, 37, torch.float32, 6)
    got, got_grad = value_and_grad(loss_fn(backend), logits, targets, ratio, alpha=0.2)
    want, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, alpha=0.2)
    assert_close(got, want, name="loss", **value_tol(backend, want))
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, torch.float32))


@pytest.mark.parametrize("backend", KERNELS)
def test_forward_saves_no_logits_sized_buffer(backend):
    logits, targets, mask_ratio = make_inputs(33, 300, torch.float32, 3, **EVERY_THIRD)
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(backend)(x, targets, mask_ratio, alpha=0.5)
    saved = loss.grad_fn.saved_tensors
    assert saved[0].data_ptr() == x.data_ptr()  # the input itself, not a copy
    assert sum(t.numel() for t in saved[1:]) == 3 * 33


THROUGH_OPS = {
    "10x50-float32": dict(M=10, V=50, dtype=torch.float32, seed=4, alpha=0.2),
    "4x21-bfloat16": dict(M=4, V=21, dtype=torch.bfloat16, seed=7, alpha=0.3),
}


@pytest.mark.parametrize("case", THROUGH_OPS)
@pytest.mark.parametrize("backend", ALL)
def test_through_ops(backend, case):
    """``ops.d3diff_loss(backend=...)`` runs that backend (no fallback): the reference's value and gradient."""
    c = THROUGH_OPS[case]
    kind = EVERY_THIRD if case == "10x50-float32" else {}
    logits, targets, ratio = make_inputs(c["M"], c["V"], c["dtype"], c["seed"], **kind)
    assert backends.resolve("d3diff_loss", backend, "cpu") == backend
    a = ops.d3diff_loss(logits, targets, ratio, alpha=c["alpha"], backend=backend)
    b = ops.d3diff_loss(logits, targets, ratio, alpha=c["alpha"], backend="reference")
    assert_close(a, b, atol=1e-6, rtol=1e-5)
    got, got_grad = value_and_grad(ops.d3diff_loss, logits, targets, ratio, alpha=c["alpha"], backend=backend)
    want, want_grad = value_and_grad(d3diff_loss_reference, logits, targets, ratio, alpha=c["alpha"])
    assert_close(got, want, name="loss", atol=1e-6, rtol=1e-5)
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, c["dtype"]))


@needs_cpp
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_and_cpp_agree(dtype):
    logits, targets, ratio = make_inputs(7, 257, dtype, 8)
    kw = dict(alpha=0.3, reduction="none", r_max=8.0)
    g = torch.randn(7, generator=torch.Generator().manual_seed(0))
    got, got_grad = value_and_grad(ops.d3diff_loss, logits, targets, ratio, g, backend="triton", **kw)
    want, want_grad = value_and_grad(ops.d3diff_loss, logits, targets, ratio, g, backend="cpp", **kw)
    assert_close(got, want, name="loss", atol=1e-6, rtol=1e-5)
    assert_close(got_grad, want_grad, name="grad", **grad_tol(want_grad, dtype))


@pytest.mark.parametrize("backend", [pytest.param("auto", id="auto"), *ALL])
def test_reduction_none_and_ops_validation(backend):
    """Per-row values average to the mean; the contract checks once, before any backend runs."""
    logits = torch.randn(6, 9)
    targets = torch.randint(0, 9, (6,))
    m = torch.full((6,), 0.5)
    per_row = ops.d3diff_loss(logits, targets, m, alpha=0.5, reduction="none", backend=backend)
    assert per_row.shape == (6,)
    assert_close(per_row.mean(), ops.d3diff_loss(logits, targets, m, alpha=0.5, backend=backend),
                 atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        ops.d3diff_loss(logits, torch.full((6,), 9), m, alpha=0.5, backend=backend)
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.d3diff_loss(logits, targets, torch.zeros(6), alpha=0.5, backend=backend)
    with pytest.raises(TypeError, match="targets"):
        ops.d3diff_loss(logits, targets.int(), m, alpha=0.5, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        ops.d3diff_loss(logits, targets, m, alpha=0.5, reduction="sum", backend=backend)
    with pytest.raises(ValueError, match="targets"):
        ops.d3diff_loss(logits, targets[:5], m, alpha=0.5, backend=backend)


# ====================================================================================================================
# cpp: the portable path, the raw bindings' checks
# ====================================================================================================================


@pytest.fixture
def portable_paths():
    _C.set_simd_kernels(False)
    yield
    _C.set_simd_kernels(True)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpp_portable_path(portable_paths, reduction, dtype):
    """The scalar code CPUs without AVX-512 run."""
    for M, V, r_max in [(33, 2049, 4.0), (3, 1, None)]:
        logits, targets, ratio = make_inputs(M, V, dtype, 0, **EVERY_THIRD)
        check_against_reference("cpp", logits, targets, ratio, upstream(reduction, M, 9), alpha=0.5,
                                reduction=reduction, r_max=r_max)


def raw_args(M=4, V=9):
    logits, targets, mask_ratio = make_inputs(M, V, torch.float32, 0, **EVERY_THIRD)
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


@needs_cpp
@pytest.mark.parametrize("change,error,match", BAD)
def test_cpp_raw_forward_rejects_bad_arguments(change, error, match):
    args = raw_args()
    change(args)
    with pytest.raises(error, match=match):
        _C.d3diff_forward(**args)


@needs_cpp
@pytest.mark.parametrize("change,error,match", BAD + [
    (lambda a: a.update(lse=a["lse"][:2].copy()), ValueError, "lse must have shape"),
    (lambda a: a.update(grad_rows=a["grad_rows"].astype(np.float64)), TypeError, "grad_rows must have dtype"),
])
def test_cpp_raw_backward_rejects_bad_arguments(change, error, match):
    args = raw_args()
    args["lse"] = np.zeros(4, np.float32)
    args["grad_rows"] = np.ones(4, np.float32)
    change(args)
    with pytest.raises(error, match=match):
        _C.d3diff_backward(**args)


# ====================================================================================================================
# triton: per-row terms and multi-block rows, the backward's own entry, the launcher's checks
# ====================================================================================================================


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [17, 100, 1000])
def test_triton_multi_block_rows(V, dtype):
    """Rows longer than the block (16 columns here): online logsumexp and a blockwise gradient."""
    logits, targets, ratio = make_inputs(5, V, dtype, seed=V)
    _, _, lse = triton_d3diff.d3diff_terms(logits, targets, ratio)
    ce, se, lse16 = triton_d3diff.d3diff_terms(logits, targets, ratio, block_v=16)
    assert_close(lse16, lse, name="lse", atol=1e-6, rtol=1e-5)
    want_ce, want_se = d3diff_terms(logits, targets, ratio)
    assert_close(ce, want_ce, name="ce", atol=1e-6, rtol=1e-5)
    assert_close(se, want_se, name="se", atol=1e-6, rtol=1e-5)
    g = torch.randn(5)
    got = triton_d3diff.d3diff_loss_backward(g, logits, targets, ratio, alpha=0.4, reduction="none", block_v=16)
    leaf = logits.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(d3diff_loss_reference(leaf, targets, ratio, alpha=0.4, reduction="none"), leaf, g)
    assert_close(got, want, name="grad", **grad_tol(want, dtype))


@needs_triton
def test_triton_terms_and_full_rows():
    """Per-row CE and SE; SE (and its gradient) exactly 0 where m = 1."""
    logits, targets, ratio = make_inputs(6, 40, torch.float32, seed=3, full_rows=slice(0, 3))
    ce, se, lse = triton_d3diff.d3diff_terms(logits, targets, ratio)
    want_ce, want_se = d3diff_terms(logits, targets, ratio)
    assert_close(ce, want_ce, name="ce", atol=1e-6, rtol=1e-5)
    assert_close(se, want_se, name="se", atol=1e-6, rtol=1e-5)
    assert_close(lse, torch.logsumexp(logits, -1), name="lse", atol=1e-6, rtol=1e-5)
    assert bool((se[:3] == 0).all())
    _, grad_se_only = value_and_grad(triton_d3diff.d3diff_loss, logits, targets, ratio,
                                     torch.randn(6, generator=torch.Generator().manual_seed(0)), alpha=1.0,
                                     reduction="none")
    _, grad_ce_only = value_and_grad(triton_d3diff.d3diff_loss, logits, targets, ratio,
                                     torch.randn(6, generator=torch.Generator().manual_seed(0)), alpha=0.0,
                                     reduction="none")
    assert torch.equal(grad_se_only[:3], grad_ce_only[:3])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backward_without_saved_lse_and_in_place(dtype):
    """The backward recomputing lse equals the one given it; the gradient can overwrite the logits' buffer."""
    logits, targets, ratio = make_inputs(5, 300, dtype, seed=5)
    _, _, lse = triton_d3diff.d3diff_terms(logits, targets, ratio)
    g = torch.randn(5)
    kw = dict(alpha=0.5, reduction="none", r_max=8.0)
    with_lse = triton_d3diff.d3diff_loss_backward(g, logits, targets, ratio, lse=lse, **kw)
    recomputed = triton_d3diff.d3diff_loss_backward(g, logits, targets, ratio, **kw)
    assert_close(recomputed, with_lse, name="grad", **grad_tol(with_lse, dtype))
    buffer = logits.clone()
    out = triton_d3diff.d3diff_loss_backward(g, buffer, targets, ratio, out=buffer, **kw)
    assert out is buffer
    assert torch.equal(out, recomputed)


@needs_triton
def test_triton_no_grad_path():
    """Without gradients the kernel computes the terms and reduces them, with no autograd Function."""
    logits, targets, ratio = make_inputs(4, 21, torch.bfloat16, seed=7)
    want = d3diff_loss_reference(logits, targets, ratio, alpha=0.3)
    with torch.no_grad():
        assert_close(triton_d3diff.d3diff_loss(logits, targets, ratio, alpha=0.3), want, name="loss", atol=1e-6,
                     rtol=1e-5)


@needs_triton
def test_triton_rejects_bad_arguments():
    logits, targets, ratio = make_inputs(3, 8, torch.float32, seed=0)
    with pytest.raises(ValueError):
        triton_d3diff.d3diff_loss(logits, targets[:2], ratio, alpha=0.1)
    with pytest.raises(ValueError):
        triton_d3diff.d3diff_loss(logits, targets, ratio, alpha=0.1, reduction="sum")
    with pytest.raises(ValueError):
        triton_d3diff.d3diff_terms(logits.half(), targets, ratio)
