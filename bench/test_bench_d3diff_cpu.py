"""pytest-benchmark: D3Diff loss forward + backward on the CPU, C++ kernel vs the reference under autograd.

    pytest bench/test_bench_d3diff_cpu.py -o addopts="" --benchmark-only

M = 2048 rows x V = 8192. The full table (M = 8192, peak memory) comes from bench/bench_d3diff_cpu.py.
"""

import pytest
import torch

pytest.importorskip("fastface._C", reason="fastface._C is not built")

from fastface import _cpp  # noqa: E402
from fastface.ops.d3diff import d3diff_loss_reference  # noqa: E402

IMPLS = {"cpp": _cpp.d3diff_loss, "reference": d3diff_loss_reference}


def forward_backward(fn, logits, targets, mask_ratio):
    x = logits.detach().requires_grad_(True)
    fn(x, targets, mask_ratio, alpha=0.5, r_max=64.0).backward()
    return x.grad


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_d3diff_forward_backward(benchmark, impl, dtype):
    gen = torch.Generator().manual_seed(0)
    M, V = 2048, 8192
    logits = (torch.randn(M, V, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, V, (M,), generator=gen)
    mask_ratio = torch.rand(M, generator=gen).clamp(min=1 / 256)
    benchmark.group = f"d3diff fwd+bwd M={M} V={V} {dtype}"
    rounds = 10 if impl == "cpp" else 3
    grad = benchmark.pedantic(forward_backward, args=(IMPLS[impl], logits, targets, mask_ratio), rounds=rounds,
                              warmup_rounds=1)
    assert grad.dtype == dtype
