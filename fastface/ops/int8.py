"""int8 weights: per-channel quantisation, and the linear layer over them with int8 activations.

Legend: M rows (tokens), K input features, N output features.

    w8 = ops.quantize_int8(weight)          # weight [..., N, K] float -> Int8Weight (int8 values, per-row scales)
    y = ops.int8_linear(x, w8, bias)        # x [..., K] float32/bfloat16 -> [..., N] in x's dtype

Weights: each output row n gets ``scale[n] = amax_k |w[n, k]| / 127`` and ``q[n, k] = round(w[n, k] / scale[n])``
(symmetric, per channel; a row of zeros gets scale 1). Activations are quantised the same way per row at every call
(dynamic, symmetric, per token), so an outlier token costs only its own row's precision. The product is
``y[m, n] = float(sum_k qx[m, k] q[n, k]) * sx[m] * scale[n] (+ bias[n])``: the integer sums are exact, then each
float operation is rounded in that order and the result once to x's dtype. The reference below does exactly that
(its sums in float64, exact for K <= 65536), so a kernel is tested bitwise against it; the C++ kernel
(csrc/int8_linear.cpp: AVX512-VNNI or AVX2 products, a portable loop elsewhere) is, on every path.

This is an approximation of the float layer (about 0.5-1% relative error per matmul at these widths); its effect on
generated faces is measured in bench/bench_int8.py. Nothing here imports the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastface import backends
from fastface.checks import check_tensor

MAX_K = 65536  # 255 * 127 * K must fit int32 in the VNNI kernel's sums


@dataclass(frozen=True)
class Int8Weight:
    """A quantised weight [..., N, K]: int8 values packed in the kernels' layout, float32 scales [..., N], int32 row
    sums [..., N] (what the VNNI kernel subtracts), and K.

    ``packed`` [..., ceil(N/16), ceil(K/4), 64]: panels of 16 output features; within a panel k in groups of 4, each
    group 16 features x 4 values (zero padded). ``q`` unpacks to [..., N, K]. Indexing takes the leading dims:
    ``w8[g, e]`` is expert e of group g, itself an ``Int8Weight``."""

    packed: torch.Tensor
    scale: torch.Tensor
    sums: torch.Tensor
    in_features: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scale.shape, self.in_features)

    @property
    def q(self) -> torch.Tensor:
        """The int8 values [..., N, K]."""
        *lead, P, G, _ = self.packed.shape
        n = len(lead)
        blocks = self.packed.view(*lead, P, G, 16, 4).permute(*range(n), n, n + 2, n + 1, n + 3)
        return blocks.reshape(*lead, P * 16, G * 4)[..., : self.scale.shape[-1], : self.in_features]

    def __getitem__(self, index) -> Int8Weight:
        return Int8Weight(self.packed[index], self.scale[index], self.sums[index], self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these int8 values stand for."""
        return self.q.float() * self.scale[..., None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.sums))


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 values [..., N, K] -> the packed layout [..., ceil(N/16), ceil(K/4), 64] (see ``Int8Weight``)."""
    *lead, N, K = q.shape
    P, G = -(-N // 16), -(-K // 4)
    padded = torch.nn.functional.pad(q, (0, G * 4 - K, 0, P * 16 - N))
    n = len(lead)
    blocks = padded.reshape(*lead, P, 16, G, 4).permute(*range(n), n, n + 2, n + 1, n + 3)
    return blocks.reshape(*lead, P, G, 64).contiguous()


def quantize_rows(x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x [..., K] (read as float32): (q int8 [..., K], scale float32 [...])."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):
        row = int(torch.nonzero(~torch.isfinite(amax).reshape(-1))[0])
        raise ValueError(f"int8_linear: {name} row {row} holds a non-finite value")
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.clamp(torch.round(x / scale[..., None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8 of weight [..., N, K] (rows = output features, the nn.Linear layout)."""
    check_tensor("weight", weight, None, (torch.float32, torch.bfloat16))
    if weight.dim() < 2 or 0 in weight.shape[-2:]:
        raise ValueError(f"weight must have shape [..., N, K] with N, K > 0, got {tuple(weight.shape)}")
    if weight.shape[-1] > MAX_K:
        raise ValueError(f"weight's in features must be at most {MAX_K}, got {weight.shape[-1]}")
    q, scale = quantize_rows(weight.detach(), "weight")
    return Int8Weight(pack_int8(q), scale.contiguous(), q.sum(dim=-1, dtype=torch.int32).contiguous(),
                      weight.shape[-1])


def int8_linear_reference(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: exact integer sums (float64), then the float operations in the documented order."""
    K, N = x.shape[-1], weight.scale.shape[0]
    qx, sx = quantize_rows(x.reshape(-1, K))
    acc = (qx.double() @ weight.q.double().t()).to(torch.int32)  # exact: |sum| < 2^31 < 2^53
    y = acc.float() * sx[:, None] * weight.scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def check_int8_args(x, weight, bias) -> None:
    check_tensor("x", x, None, (torch.float32, torch.bfloat16))
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be an Int8Weight (ops.quantize_int8), got {type(weight).__name__}")
    if weight.scale.dim() != 1:
        raise ValueError(f"weight must be one matrix [N, K], got shape {weight.shape}")
    N, K = weight.shape
    if weight.packed.dtype != torch.int8 or weight.packed.shape != (-(-N // 16), -(-K // 4), 64):
        raise ValueError(f"weight.packed must be int8 [{-(-N // 16)}, {-(-K // 4)}, 64] for a [{N}, {K}] weight, got "
                         f"{weight.packed.dtype} {tuple(weight.packed.shape)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., {K}] for a weight of shape {weight.shape}, got {tuple(x.shape)}")
    if weight.scale.shape != (N,) or weight.scale.dtype != torch.float32:
        raise ValueError(f"weight.scale must be float32 [{N}], got {weight.scale.dtype} {tuple(weight.scale.shape)}")
    if weight.sums.shape != (N,) or weight.sums.dtype != torch.int32:
        raise ValueError(f"weight.sums must be int32 [{N}], got {weight.sums.dtype} {tuple(weight.sums.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1, (torch.float32, torch.bfloat16))
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, weight.packed, weight.scale, weight.sums) + (() if bias is None else (bias,))}
    if len(devices) > 1:
        raise ValueError(f"x, weight and bias must be on one device, got {sorted(map(str, devices))}")


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None, *,
                backend: str = "auto") -> torch.Tensor:
    """``x @ weight^T (+ bias)`` with weight in int8 and x quantised per row (see the module docstring); forward
    only. ``backend`` as ``fastface.backends``."""
    check_int8_args(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("int8_linear is forward only (quantised weights are not trained): x requires grad; run "
                         "under torch.no_grad() or train the float model")
    _, fn = backends.implementation("int8_linear", backend, x.device.type, dtype=x.dtype)
    return fn(x, weight, bias)
