"""pytest-benchmark: grouped MoE layer on the CPU, fastface C++ vs transformers' experts vs the reference.

    python -m pytest bench/test_bench_grouped_moe.py -o addopts="" --benchmark-group-by=param:dtype,param:T

Same layer and weights as bench/bench_grouped_moe_cpu.py (Mixtral-like H=1024, F=2816, E=8, K=2); that
script also measures the machine's ceilings and writes the JSON with roofline fractions.
Legend: T tokens, H hidden, E experts, F ffn width, K top-k.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastface._C", reason="fastface._C is not built")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grouped_moe_cpu import MIXTRAL, contenders, make_layer  # noqa: E402

IMPLS = ["fastface", "fastface_hf", "eager", "grouped_mm", "batched_mm", "reference"]


@functools.cache
def layer(dtype):
    return make_layer(MIXTRAL["H"], MIXTRAL["F"], MIXTRAL["E"], MIXTRAL["K"], dtype)


@pytest.mark.parametrize("T", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_moe_layer(benchmark, impl, dtype, T):
    w, blocks = layer(dtype)
    fns = contenders(w, blocks, T, MIXTRAL["K"])
    if impl not in fns:
        pytest.skip(f"{impl} is not run at T={T} (it materialises a [T*K, 2F, H] weight copy)")
    if impl == "reference" and T > 512:
        pytest.skip("the reference is timed by the script; too slow for the default run here")
    x = torch.randn(T, MIXTRAL["H"], generator=torch.Generator().manual_seed(T)).to(dtype)
    gid = torch.zeros(T, dtype=torch.int64)
    benchmark.extra_info.update(flops=2 * T * MIXTRAL["K"] * 3 * MIXTRAL["H"] * MIXTRAL["F"])
    with torch.no_grad():
        benchmark.pedantic(fns[impl], args=(x, gid), rounds=5 if T >= 512 else 20, warmup_rounds=1)
