"""The op ``fastface.ops.attention`` (fastface/ops/attention.py): the C++ kernel against the formula in float64 and
against PyTorch's scaled dot-product attention, odd shapes, every mask kind, strided inputs, both paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastface import backends, ops
from fastface.ops.attention import attention_reference

try:
    from fastface import _C, _cpp
except ImportError:
    _C = _cpp = None

needs_cpp = pytest.mark.skipif(_C is None, reason="fastface._C not built")
# float32: the kernel's fp32 sums in another order; bfloat16: inputs exact, the output rounded once (2^-8 relative)
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.bfloat16: dict(atol=8e-3, rtol=8e-3)}


def formula(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v in float64."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ v.double()


def inputs(B, nh, L, Lk, hd, dtype, seed=0, mask="bool", mask_heads=1, mask_batch=None):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, nh, n, hd, generator=gen).to(dtype) for n in (L, Lk, Lk))
    allowed = torch.rand(mask_batch or B, mask_heads, L, Lk, generator=gen) > 0.3
    allowed[..., 0] = True  # every row sees at least one key
    if mask == "bool":
        m = allowed
    elif mask == "none":
        m = None
    else:
        m = torch.zeros(allowed.shape, dtype=torch.float32 if mask == "float32" else dtype).masked_fill(
            ~allowed, -math.inf)
        m[..., -1] += 0.5  # additive values besides 0 / -inf
    return q, k, v, m


@pytest.fixture(params=["simd", "simd-widened", "portable"])
def simd(request):
    """The kernel's paths: AVX-512 (bf16 products by vdpbf16ps where the CPU has AVX512-BF16), AVX-512 with bf16
    inputs widened to fp32 products, and the portable loop."""
    _C.set_simd_kernels(request.param != "portable")
    _C.attention_set_bf16_dot(request.param == "simd")
    yield request.param
    _C.set_simd_kernels(True)
    _C.attention_set_bf16_dot(True)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["bool", "float32", "dtype", "none"])
@pytest.mark.parametrize("B,nh,L,Lk,hd", [(2, 3, 8, 1, 8), (1, 2, 37, 41, 24), (3, 2, 19, 130, 32), (2, 1, 9, 17, 1),
                                          (1, 2, 64, 300, 64), (1, 1, 33, 65, 80), (1, 1, 12, 40, 128),
                                          (1, 1, 10, 20, 136)])
def test_cpp_kernel_equals_formula_and_torch(simd, dtype, mask, B, nh, L, Lk, hd):
    q, k, v, m = inputs(B, nh, L, Lk, hd, dtype, seed=L + Lk + hd, mask=mask)
    got = _cpp.attention(q, k, v, m)
    assert got.dtype == dtype and got.shape == (B, nh, L, hd)
    want = formula(q, k, v, m)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    torch.testing.assert_close(got, attention_reference(q, k, v, m), **TOL[dtype])


@needs_cpp
@pytest.mark.parametrize("mask_batch,mask_heads", [(1, 1), (3, 1), (1, 4), (3, 4)])
def test_cpp_mask_broadcast_over_batch_and_heads(simd, mask_batch, mask_heads):
    q, k, v, m = inputs(3, 4, 20, 33, 16, torch.float32, seed=3, mask_heads=mask_heads, mask_batch=mask_batch)
    torch.testing.assert_close(_cpp.attention(q, k, v, m).double(), formula(q, k, v, m), **TOL[torch.float32])


@needs_cpp
def test_cpp_strided_inputs_as_the_model_passes_them():
    """q, k, v as views of one [B, L, 3, nh, hd] projection, and keys/values as the first positions of a longer
    cache: read in place."""
    B, L, nh, hd = 2, 24, 4, 16
    qkv = torch.randn(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4)  # 3 x [B, nh, L, hd], rows 3 * nh * hd apart
    cache = torch.randn(2, B, nh, 50, hd)
    cache[:, :, :, :L] = qkv[1:]
    k, v = cache[0, :, :, : L + 5], cache[1, :, :, : L + 5]
    mask = torch.ones(B, 1, L, L + 5, dtype=torch.bool)
    got = _cpp.attention(qkv[0], k, v, mask)
    torch.testing.assert_close(got.double(), formula(qkv[0], k, v, mask), **TOL[torch.float32])
    assert got.transpose(1, 2).is_contiguous()  # the model's reshape to [B, L, H] copies nothing


@needs_cpp
def test_cpp_a_row_is_the_same_alone_or_in_a_batch():
    q, k, v, m = inputs(5, 3, 30, 45, 32, torch.float32, seed=8)
    batched = _cpp.attention(q, k, v, m)
    for b in range(5):
        assert torch.equal(_cpp.attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], m[b : b + 1])[0], batched[b])


@needs_cpp
def test_cpp_few_queries_go_to_torch():
    q, k, v, m = inputs(2, 2, _cpp.ATTENTION_MIN_QUERIES - 1, 20, 16, torch.float32, seed=1)
    assert torch.equal(_cpp.attention(q, k, v, m), F.scaled_dot_product_attention(q, k, v, attn_mask=m))


@needs_cpp
@pytest.mark.parametrize("simd_on", [True, False])
def test_cpp_row_with_no_key_is_an_error(simd_on):
    q, k, v, m = inputs(1, 2, 9, 12, 16, torch.float32, seed=2)
    m[0, 0, 4] = False
    _C.set_simd_kernels(simd_on)
    try:
        with pytest.raises(ValueError, match="mask allows no key"):
            _cpp.attention(q, k, v, m)
    finally:
        _C.set_simd_kernels(True)


@needs_cpp
def test_cpp_raw_binding_rejects_bad_arguments():
    q, k, v, _ = inputs(1, 2, 9, 12, 16, torch.float32)
    out = torch.empty(1, 9, 2, 16)
    n = _cpp.to_numpy
    _C.attention(n(q), n(k), n(v), None, n(out), 0.25)
    cases = [
        ((n(q), n(k[:, :1]), n(v), None, n(out), 0.25), ValueError, "k must have shape"),
        ((n(q), n(k), n(v[:, :, :5]), None, n(out), 0.25), ValueError, "v must have shape"),
        ((n(q), n(k.bfloat16()), n(v), None, n(out), 0.25), TypeError, "k dtype"),
        ((n(q), n(k), n(v), None, n(out[:, :3]), 0.25), ValueError, "out must have shape"),
        ((n(q), n(k), n(v), None, n(out), float("nan")), ValueError, "scale"),
        ((n(q), n(k), n(v), n(torch.ones(1, 1, 9, 11, dtype=torch.bool)), n(out), 0.25), ValueError, "mask must"),
        ((n(q), n(k), n(v), n(torch.ones(1, 1, 9, 12, dtype=torch.int64)), n(out), 0.25), TypeError, "mask"),
        ((n(q), n(k), n(v), n(torch.zeros(1, 1, 9, 12, dtype=torch.bfloat16)), n(out), 0.25), TypeError, "bfloat16"),
        ((n(q.transpose(2, 3)), n(k), n(v), None, n(out), 0.25), ValueError, "q must"),
        ((n(q), n(k), n(v), None, n(torch.empty(1, 2, 9, 16).transpose(1, 2)), 0.25), ValueError, "out must"),
        ((n(q), n(k), n(v), None, "out", 0.25), TypeError, "out must be a numpy array"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            _C.attention(*args)


def test_contract_checks_before_any_backend():
    q, k, v, m = inputs(1, 2, 9, 12, 16, torch.float32)
    for backend in ("reference", "auto", "cpp"):
        with pytest.raises(ValueError, match="k and v must have shape"):
            ops.attention(q, k[:, :, :, :8], v, m, backend=backend)
        with pytest.raises(TypeError, match="share a dtype"):
            ops.attention(q, k.bfloat16(), v, m, backend=backend)
        with pytest.raises(ValueError, match="mask must have shape"):
            ops.attention(q, k, v, m[:, :, :4], backend=backend)
        with pytest.raises(TypeError, match="mask must be"):
            ops.attention(q, k, v, m.long(), backend=backend)
        with pytest.raises(TypeError, match="q"):
            ops.attention(q.double(), k, v, m, backend=backend)


@needs_cpp
def test_auto_picks_the_kernel_on_avx512_and_trains_on_torch():
    q, k, v, m = inputs(1, 2, 9, 12, 16, torch.float32)
    want = "cpp" if backends.cpu_has_avx512() else "reference"
    assert backends.resolve("attention", "auto", "cpu", dtype=torch.float32) == want
    assert backends.resolve("attention", "auto", "cpu", dtype=torch.float32, grad=True) == "reference"
    q.requires_grad_(True)
    y = ops.attention(q, k, v, m, backend="cpp")  # gradients wanted: torch's kernel runs
    (g,) = torch.autograd.grad(y.sum(), q)
    q2 = q.detach().requires_grad_(True)
    (want_g,) = torch.autograd.grad(attention_reference(q2, k, v, m).sum(), q2)
    assert torch.equal(g, want_g)


# ---- rotary -----------------------------------------------------------------------------------------------------


def rotary_inputs(B, L, nh, hd, rd, dtype, seed=0):
    from fastface.model import rotary_tables

    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, nh, hd, generator=gen).to(dtype)
    positions = torch.randint(0, 500, (B, L), generator=gen)
    cos, sin = rotary_tables(positions, rd, 10000.0)
    return qkv, cos, sin


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,nh,hd,rd", [(2, 5, 3, 32, 32), (1, 7, 2, 8, 8), (3, 4, 2, 64, 32), (1, 3, 1, 40, 34),
                                          (2, 9, 4, 80, 80), (1, 2, 1, 6, 4)])
def test_cpp_rotary_is_bitwise_the_reference(simd, dtype, B, L, nh, hd, rd):
    from fastface.ops.attention import rotary_reference

    qkv, cos, sin = rotary_inputs(B, L, nh, hd, rd, dtype, seed=hd + rd)
    qk = qkv[:, :, :2]  # the strided view the model passes
    got = _cpp.rotary(qk, cos, sin)
    want = rotary_reference(qk, cos, sin)
    assert got.dtype == dtype and got.shape == qk.shape
    assert torch.equal(got, want)
    assert torch.equal(_cpp.rotary(qk.contiguous(), cos, sin), want)


def test_rotary_contract_checks():
    qkv, cos, sin = rotary_inputs(2, 5, 3, 16, 16, torch.float32)
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match="q and k along dim 2"):
            ops.rotary(qkv, cos, sin, backend=backend)
        with pytest.raises(ValueError, match="cos must have shape"):
            ops.rotary(qkv[:, :, :2], cos[:, :, :4], sin, backend=backend)
        with pytest.raises(ValueError, match="sin must have shape"):
            ops.rotary(qkv[:, :, :2], cos, torch.zeros(2, 1, 5, 18), backend=backend)
        with pytest.raises(TypeError, match="cos"):
            ops.rotary(qkv[:, :, :2], cos.double(), sin, backend=backend)
        with pytest.raises(TypeError, match="qk"):
            ops.rotary(qkv[:, :, :2].double(), cos, sin, backend=backend)


@needs_cpp
def test_cpp_rotary_raw_binding_rejects_bad_arguments():
    n = _cpp.to_numpy
    x, c, s = torch.randn(4, 2, 8), torch.randn(4, 8), torch.randn(4, 8)
    out = torch.empty(4, 2, 8)
    _C.rotary(n(x), n(c), n(s), n(out))
    for args, error, match in [
        ((n(x), n(c[:3]), n(s), n(out)), ValueError, "cos must have shape"),
        ((n(x), n(c[:, :7].contiguous()), n(s[:, :7].contiguous()), n(out)), ValueError, "even width"),
        ((n(x), n(torch.randn(4, 10)), n(torch.randn(4, 10)), n(out)), ValueError, "even width"),
        ((n(x), n(c), n(s), n(out[:, :1].contiguous())), ValueError, "out must have shape"),
        ((n(x), n(c), n(s), n(out.bfloat16())), TypeError, "out dtype"),
        ((n(x.transpose(1, 2)), n(c), n(s), n(out)), ValueError, "x must"),
        ((n(x), n(c.double()), n(s), n(out)), TypeError, "cos"),
    ]:
        with pytest.raises(error, match=match):
            _C.rotary(*args)
