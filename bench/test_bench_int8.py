"""The int8 benchmark runs end to end on tiny shapes and a tiny random model and writes its JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_int8  # noqa: E402


def test_bench_int8_quick(tmp_path):
    out = tmp_path / "int8.json"
    assert bench_int8.main(["--quick", "--random", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "gemm_gflops" in result["machine"] and "torch" in result["machine"]
    assert set(result["matmuls"]) == set(bench_int8.QUICK_SHAPES)
    for case in result["matmuls"].values():
        rows = case["results"]
        assert {"torch fp32", "torch bf16", "torch int8 (quantize_dynamic)", "fastface int8, fp32 in"} <= set(rows)
        assert rows["torch bf16"]["vs_torch_bf16"]["median"] == 1.0
        assert rows["torch fp32"]["rel_error"] < 1e-5 < rows["fastface int8, fp32 in"]["rel_error"] < 0.02
    (case,) = result["decoding"]
    assert case["weight_bytes"]["int8"] < case["weight_bytes"]["float"]
    rows = case["results"]
    assert {"float float32", "int8 float32", "reference loop fp32"} <= set(rows)
    assert 0 <= rows["int8 float32"]["token_agreement_with_float"] <= 1
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
