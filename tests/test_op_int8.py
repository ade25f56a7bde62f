"""The op ``fastface.ops.int8_linear`` (fastface/ops/int8.py): the quantiser and packed layout, the reference against
PyTorch's exact int8 matmul (``torch._int_mm``) and against the float layer, and the C++ kernel bitwise against the
reference on every path (AVX512-VNNI, AVX2 and portable products; SIMD and scalar quantisation and epilogue), odd
shapes, both dtypes, with and without bias; bad arguments rejected before memory is touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastface import backends, ops
from fastface.ops.int8 import Int8Weight, int8_linear_reference, pack_int8, quantize_rows

try:
    from fastface import _C, _cpp
except ImportError:
    _C = _cpp = None

needs_cpp = pytest.mark.skipif(_C is None, reason="fastface._C not built")

# (M, K, N): ragged everywhere -- K not a multiple of 4, N not of 16, M not of the kernel's 6-row block or 48-row chunk
SHAPES = [(1, 5, 3), (7, 70, 13), (13, 3, 17), (5, 64, 48), (64, 256, 96), (130, 1000, 77), (97, 33, 161)]


def make(M, K, N, dtype=torch.float32, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen) * 3).to(dtype)
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    b = torch.randn(N, generator=gen) if bias else None
    return x, w, b


# name -> (products, SIMD quantisation and epilogue); "avx2" is what an AVX2-only CPU runs (AVX2 products, AVX2
# quantisation and epilogue, also on a CPU with AVX-512)
PATHS = {"vnni": ("vnni", True), "avx2": ("avx2", True), "avx2-scalar": ("avx2", False),
         "portable-products": ("portable", True), "portable": ("portable", False)}


@pytest.fixture(params=list(PATHS))
def path(request):
    """The kernel's paths: AVX512-VNNI products with AVX-512 quantisation and epilogue; AVX2 products with AVX2
    quantisation and epilogue (an AVX2-only CPU), and with scalar ones; the portable product loop with the best
    quantisation and epilogue here; everything portable."""
    products, simd = PATHS[request.param]
    feature = {"vnni": "avx512_vnni", "avx2": "avx2_fma"}.get(products)
    if feature and not _C.cpu_features()[feature]:
        pytest.skip(f"this CPU has no {feature}")
    _C.int8_linear_set_products(products)
    _C.set_simd_kernels(simd)
    assert _C.int8_linear_products() == products
    yield request.param
    _C.int8_linear_set_products("auto")
    _C.set_simd_kernels(True)


# ---------------------------------------------------------------- the quantiser and the layout
def test_quantize_rows_is_symmetric_per_row_with_the_row_max_at_127():
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [3.0, 1e-3, -3.0]])
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([2.0 / 127, 1.0, 3.0 / 127]))
    assert q[0].tolist() == [32, -127, 64] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 0, -127]


@pytest.mark.parametrize("N,K", [(1, 1), (16, 4), (17, 5), (3, 70), (40, 33)])
def test_pack_round_trips_and_puts_groups_of_four_in_16_feature_panels(N, K):
    q = torch.randint(-127, 128, (2, N, K), dtype=torch.int8)
    w8 = Int8Weight(pack_int8(q), torch.ones(2, N), q.sum(-1, dtype=torch.int32), K)
    assert w8.packed.shape == (2, -(-N // 16), -(-K // 4), 64)
    assert torch.equal(w8.q, q)
    assert torch.equal(w8[1].q, q[1]) and w8[1].shape == (N, K)
    # panel p, k-group g, slot 4 * j + i holds q[16 p + j, 4 g + i] (zero where that is out of range)
    padded = torch.zeros(2, -(-N // 16) * 16, -(-K // 4) * 4, dtype=torch.int8)
    padded[:, :N, :K] = q
    packed = w8.packed[0].tolist()
    for p in range(-(-N // 16)):
        for g in range(-(-K // 4)):
            for j in range(16):
                for i in range(4):
                    assert packed[p][g][4 * j + i] == padded[0, 16 * p + j, 4 * g + i]


def test_quantize_int8_scales_per_output_channel_and_dequantizes_within_half_a_step():
    w = torch.randn(37, 29) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different sizes
    w8 = ops.quantize_int8(w)
    assert w8.shape == (37, 29) and w8.scale.shape == (37,) and w8.sums.dtype == torch.int32
    torch.testing.assert_close(w8.scale, w.abs().amax(-1) / 127)
    err = (w8.dequantize() - w).abs()
    assert bool((err <= w8.scale[:, None] / 2 * (1 + 1e-5)).all())  # round to nearest: at most half a step
    assert torch.equal(w8.sums, w8.q.sum(-1, dtype=torch.int32))
    big = torch.randn(256, 512)
    assert ops.quantize_int8(big).nbytes() < big.numel() * 4 * 0.27  # a quarter of float32, plus scales and sums


# ---------------------------------------------------------------- the reference against outside oracles
def test_reference_integer_sums_are_pytorch_int_mm():
    """torch._int_mm is PyTorch's exact int8 x int8 -> int32 matmul: the reference's sums, before any float step,
    are its sums, so y / (sx * scale) recovers them."""
    M, K, N = 32, 200, 48  # _int_mm wants M > 16 and K, N multiples of 8
    x, w, _ = make(M, K, N, bias=False)
    w8 = ops.quantize_int8(w)
    qx, sx = quantize_rows(x)
    acc = torch._int_mm(qx, w8.q.t().contiguous())
    want = acc.float() * sx[:, None] * w8.scale
    assert torch.equal(int8_linear_reference(x, w8), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_approximates_the_float_layer(dtype):
    """Per-channel weights and per-token activations at 8 bits: about 1% relative error at these widths."""
    x, w, b = make(64, 512, 96, dtype)
    y = int8_linear_reference(x, ops.quantize_int8(w), b)
    want = torch.nn.functional.linear(x.float(), w, b)
    rel = ((y.float() - want).norm() / want.norm()).item()
    assert y.dtype == dtype and rel < 0.02, rel


def test_reference_keeps_leading_dims():
    x, w, b = make(6, 10, 7)
    w8 = ops.quantize_int8(w)
    y = int8_linear_reference(x.view(2, 3, 10), w8, b)
    assert y.shape == (2, 3, 7) and torch.equal(y.view(6, 7), int8_linear_reference(x, w8, b))


# ---------------------------------------------------------------- the C++ kernel
@needs_cpp
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_int8_linear_is_bitwise_the_reference(path, M, K, N, dtype, bias):
    x, w, b = make(M, K, N, dtype, seed=M * 1000 + K + N, bias=bias)
    w8 = ops.quantize_int8(w)
    got = ops.int8_linear(x, w8, b, backend="cpp")
    want = int8_linear_reference(x, w8, b)
    assert got.dtype == dtype and got.shape == (M, N)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


@needs_cpp
def test_cpp_int8_linear_extreme_values_and_zero_rows(path):
    """Rows of zeros (scale 1), rows at +-127 exactly (the VNNI offset's extremes), huge and tiny magnitudes."""
    M, K, N = 9, 67, 21
    x, w, b = make(M, K, N)
    x[0] = 0
    x[1] = torch.where(torch.arange(K) % 2 == 0, 1.0, -1.0)
    x[2] *= 1e30
    x[3] *= 1e-30
    w[0] = 0
    w[1] = -1
    w8 = ops.quantize_int8(w)
    assert torch.equal(ops.int8_linear(x, w8, b, backend="cpp"), int8_linear_reference(x, w8, b))


@needs_cpp
def test_cpp_int8_linear_threads_give_the_same_bits():
    x, w, b = make(200, 300, 130)
    w8 = ops.quantize_int8(w)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(ops.int8_linear(x, w8, b, backend="cpp"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_auto_picks_cpp_where_built_and_a_strided_input_is_accepted():
    x, w, b = make(20, 40, 12)
    w8 = ops.quantize_int8(w)
    chosen, _ = backends.implementation("int8_linear", "auto", "cpu", dtype=torch.float32)
    assert chosen == ("cpp" if _C is not None else "reference")
    xt = torch.randn(40, 20).t()  # not contiguous
    assert torch.equal(ops.int8_linear(xt, w8, b), int8_linear_reference(xt, w8, b))


# ---------------------------------------------------------------- bad arguments
def test_int8_linear_rejects_bad_arguments_by_name():
    x, w, b = make(4, 8, 5)
    w8 = ops.quantize_int8(w)
    with pytest.raises(TypeError, match="Int8Weight"):
        ops.int8_linear(x, w, b)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 8\]"):
        ops.int8_linear(x[:, :7], w8, b)
    with pytest.raises(TypeError, match="x"):
        ops.int8_linear(x.double(), w8, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        ops.int8_linear(x, w8, b[:4])
    with pytest.raises(ValueError, match="weight.packed"):
        ops.int8_linear(x, Int8Weight(w8.packed[:, :1], w8.scale, w8.sums, 8), b)
    with pytest.raises(ValueError, match="weight.scale"):
        ops.int8_linear(x, Int8Weight(w8.packed, w8.scale.double(), w8.sums, 8), b)
    with pytest.raises(ValueError, match="one matrix"):
        ops.int8_linear(x, ops.quantize_int8(torch.randn(2, 5, 8)), b)
    with pytest.raises(ValueError, match="backend"):
        ops.int8_linear(x, w8, b, backend="nope")
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.quantize_int8(torch.randn(5))
    with pytest.raises(ValueError, match="weight row 1"):
        ops.quantize_int8(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_int8_linear_rejects_a_non_finite_input_row(backend):
    x, w, b = make(6, 8, 5)
    x[4, 2] = float("inf")
    with pytest.raises(ValueError, match="x row 4 holds a non-finite value"):
        ops.int8_linear(x, ops.quantize_int8(w), b, backend=backend)


@needs_cpp
@pytest.mark.parametrize("where", [2, 12, 15])  # in a full SIMD chunk, in the K % 8 tail, in the K % 16 tail
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_cpp_int8_linear_finds_the_first_non_finite_row_on_every_path(path, where, value):
    x, w, b = make(6, 16 if where == 15 else 13, 5)
    x[3, where] = value
    x[5, 0] = value
    with pytest.raises(ValueError, match="x row 3 holds a non-finite value"):
        ops.int8_linear(x, ops.quantize_int8(w), b, backend="cpp")


def test_int8_linear_refuses_gradients():
    x, w, b = make(4, 8, 5)
    with pytest.raises(ValueError, match="forward only|backward|grad"):
        ops.int8_linear(x.requires_grad_(), ops.quantize_int8(w), b, backend="reference")


@needs_cpp
def test_cpp_int8_linear_binding_validates_before_touching_memory():
    M, K, N = 4, 10, 20
    x = np.zeros((M, K), np.float32)
    w = np.zeros(((N + 15) // 16, (K + 3) // 4, 64), np.int8)
    s, sums, b = np.ones(N, np.float32), np.zeros(N, np.int32), np.zeros(N, np.float32)
    out = np.zeros((M, N), np.float32)
    _C.int8_linear(x, w, s, sums, b, out)  # the valid call
    args = dict(x=x, weight=w, scale=s, sums=sums, bias=b, out=out)
    bad_shape = [
        (dict(weight=w[:1, :1]), "weight"), (dict(scale=s[:3]), "weight"), (dict(sums=sums[:3]), "sums"),
        (dict(bias=b[:3]), "bias"), (dict(out=out[:, :3].copy()), "out"), (dict(x=x[:, ::2]), "x"),
        (dict(x=np.zeros((M, 70000), np.float32)), "65536"), (dict(out=out.T.copy()), "out"),
        (dict(weight=w[None]), "weight"),
    ]
    for change, match in bad_shape:
        with pytest.raises(ValueError, match=match):
            _C.int8_linear(**{**args, **change})
    bad_dtype = [
        (dict(weight=w.astype(np.uint8)), "weight"), (dict(sums=sums.astype(np.int64)), "sums"),
        (dict(scale=s.astype(np.float64)), "scale"), (dict(out=np.zeros((M, N), np.uint16)), "out"),
        (dict(x=x.astype(np.float64)), "x"), (dict(bias=b.astype(np.float64)), "bias"),
    ]
    for change, match in bad_dtype:
        with pytest.raises(TypeError, match=match):
            _C.int8_linear(**{**args, **change})
    ro = out.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out"):
        _C.int8_linear(**{**args, "out": ro})
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="x row 1"):
        _C.int8_linear(**args)


@needs_cpp
def test_cpp_int8_linear_products_are_chosen_from_the_cpu_and_forcing_checks_them():
    f = _C.cpu_features()
    assert _C.int8_linear_products() == ("vnni" if f["avx512_vnni"] else "avx2" if f["avx2_fma"] else "portable")
    with pytest.raises(ValueError, match="'auto', 'vnni', 'avx2', 'portable'"):
        _C.int8_linear_set_products("amx")
    for products, feature in (("vnni", "avx512_vnni"), ("avx2", "avx2_fma")):
        if not f[feature]:
            with pytest.raises(ValueError, match=f"no {products}"):
                _C.int8_linear_set_products(products)
    assert _C.int8_linear_products() in ("vnni", "avx2", "portable")


@needs_cpp
def test_cpp_int8_linear_empty_shapes():
    for M, K, N in [(0, 8, 5), (3, 0, 5), (3, 8, 0)]:
        x = np.zeros((M, K), np.float32)
        w = np.zeros(((N + 15) // 16, (K + 3) // 4, 64), np.int8)
        out = np.full((M, N), 7.0, np.float32)
        _C.int8_linear(x, w, np.ones(N, np.float32), np.zeros(N, np.int32), None, out)
        assert (out == 0).all()
