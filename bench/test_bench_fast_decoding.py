"""The faster-than-exact decoding benchmark runs end to end on a tiny random model and writes its JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fast_decoding  # noqa: E402


def test_bench_fast_decoding_quick(tmp_path):
    out = tmp_path / "fast.json"
    assert bench_fast_decoding.main(["--quick", "--random", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert set(rows) == {"exact", "reference loop", "guidance 2 of 4 steps", "kv refresh every 2", "int8 weights"}
    assert rows["int8 weights"]["work"] == 1.0 and result["dtype"] == "float32"
    assert rows["exact"]["work"] == 1.0 and rows["exact"]["vs_exact"] == 1.0
    assert rows["guidance 2 of 4 steps"]["work"] == 0.75  # 2 of 4 steps at half the rows
    assert 0 < rows["kv refresh every 2"]["work"] < 1
    assert rows["reference loop"]["work"] is None
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert "gemm_gflops" in result["machine"] and "torch" in result["machine"]
