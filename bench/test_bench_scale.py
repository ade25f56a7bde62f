"""The scale benchmark runs end to end on the tiny preset (each case in its own process) and writes its JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402


def test_bench_scale_tiny(tmp_path):
    out = tmp_path / "scale.json"
    assert bench_scale.main(["--presets", "tiny", "--batch", "2", "--steps", "2", "--dtype", "bfloat16",
                             "--impls", "showo-loop", "reference", "reference-fp32", "auto", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "cpu_features" in result["machine"] and "gemm_GFLOPs" in result["machine"]
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"showo-loop", "reference", "reference-fp32", "auto"}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["reference-fp32"]["dtype"] == "float32" and rows["reference"]["dtype"] == "bfloat16"
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["batch"] == 2 and row["steps"] == 2
        assert row["x_reference_fp32"] > 0 and row["x_showo_loop"] > 0
    assert rows["reference-fp32"]["x_reference_fp32"] == 1.0
    assert out.with_suffix(".png").is_file()
