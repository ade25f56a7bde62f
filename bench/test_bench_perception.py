"""The perception benchmark runs end to end on tiny random models and writes its JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_perception  # noqa: E402


def test_bench_perception_quick(tmp_path):
    out = tmp_path / "perception.json"
    assert bench_perception.main(["--quick", "--random", "--batches", "1", "3", "--threads", "1",
                                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {(r["dtype"], r["batch"]) for r in result["rows"]} == {(d, b) for d in ("float32", "bfloat16")
                                                                  for b in (1, 3)}
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert "gemm_GFLOPs" in result["machine"] and "torch" in result["machine"]
