"""pytest-benchmark: one masked-decode step on the CPU, C++ kernel vs the reference step.

    pytest bench/test_bench_decode_cpu.py -o addopts="" --benchmark-only

B = 8 with guidance (16 logits rows per position), N = 256, V = 8192, every position masked (step 0).
The full table with bandwidth fractions comes from bench/bench_decode_cpu.py.
"""

import pytest
import torch

pytest.importorskip("fastface._C", reason="fastface._C is not built")

from fastface import _cpp  # noqa: E402
from fastface.ops.masked_decode import masked_decode_step_reference  # noqa: E402
from fastface.testing import make_decode_inputs  # noqa: E402

IMPLS = {"cpp": _cpp.masked_decode_step, "reference": masked_decode_step_reference}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_step(benchmark, impl, dtype):
    logits, tokens, masked, u = make_decode_inputs(8, 256, 8192, guidance=2.0, masked_fraction=1.0, dtype=dtype)
    kw = dict(step=0, steps=16, guidance=2.0, confidence_temperature=4.5)
    benchmark.group = f"decode step B=8 N=256 V=8192 guided {dtype}"
    rounds = 10 if impl == "cpp" else 2
    tokens_out, masked_out = benchmark.pedantic(IMPLS[impl], args=(logits, tokens, masked, u), kwargs=kw,
                                                rounds=rounds, warmup_rounds=1)
    assert int(masked_out.sum()) > 0 and tokens_out.shape == tokens.shape
