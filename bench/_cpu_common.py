"""Shared helpers of the CPU kernel benchmark scripts: timing, machine info, measured memory bandwidth."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, *, repeat: int, warmup: int = 1) -> dict:
    """Median / min / max wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeat": repeat}


def memcpy_bandwidth(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Measured memcpy bandwidth in GB/s (bytes read + bytes written per second), torch's threads."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeat=repeat)["min_s"]
    return 2 * nbytes / t / 1e9


def gemm_gflops(dtype, n=2048, repeat=5) -> float:
    """Measured torch.matmul throughput of an n x n x n GEMM (best of ``repeat``)."""
    from fastface.benchmark import gemm_gflops as measure

    return measure(dtype, n=n, repeat=repeat)


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
    }
    try:
        from fastface import _C

        info["fastface_C_cpu_features"] = _C.cpu_features()
        info["decode_math"] = _C.reference_math()
    except ImportError:
        info["fastface_C"] = "not built"
    return info


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
