"""The serving load test runs end to end (a small, bounded configuration) and writes its JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve  # noqa: E402


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--quick", "--concurrency", "1", "2", "--configs", "batched", "--tasks", "answers",
                             "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["concurrency"] for r in result["rows"]} == {1, 2}
    assert all(r["ok"] == r["requests"] and not r["failures"] for r in result["rows"])
    assert "cpu_features" in result["machine"] and "gemm_GFLOPs" in result["machine"]
    assert result["engine_ceiling"]["answers_per_s_b1"] > 0
