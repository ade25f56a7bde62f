"""The captioning benchmark runs end to end on a tiny random model and writes its JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_describe  # noqa: E402


def test_bench_describe_quick(tmp_path):
    out = tmp_path / "describe.json"
    assert bench_describe.main(["--quick", "--random", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    contenders = {r["contender"] for r in result["results"]}
    assert contenders == {f"{d} {m}" for d in ("reference", "engine")
                          for m in ("diffusion-2", "diffusion-4", "autoregressive")}
    assert {r["batch"] for r in result["results"]} == {1, 4}
    assert all(r["tokens_per_s"] > 0 for r in result["results"])
    assert "gemm_gflops" in result["machine"] and "torch" in result["machine"]
