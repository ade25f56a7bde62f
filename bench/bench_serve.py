"""Load test of ``fastface serve`` on 127.0.0.1: throughput and latency with and without dynamic batching.

    python bench/bench_serve.py                      # concurrency 1, 4, 16; batched, unbatched, reference
    python bench/bench_serve.py --quick              # fewer requests and steps (a smoke run)

Each configuration starts its own server process (``fastface serve``, the embedded model, ``--threads``), waits
for /health, sends a fixed number of image requests (``POST /v1/images/generations``, one image each, distinct
seeds) from ``concurrency`` client threads, and stops the server; the whole run is bounded (every request has a
timeout, every server is killed at the end). Configurations, side by side in one run:

- ``batched``    -- ``--max-batch 16 --max-wait-ms 10``: concurrent requests decode in one engine call;
- ``unbatched``  -- ``--max-batch 1``: one request per engine call, as servers that batch late or not at all do
  (the peer behaviour this server is measured against);
- ``reference``  -- batched, ``--backend reference`` (the plain PyTorch loop, a full forward every step).

Two tasks: ``images`` (one image per request) and ``answers`` (``POST /v1/chat/completions``, a question about one
face, greedy). Per configuration, task and concurrency: requests/s (image tokens/s for images), p50/p99 latency,
and the engine's own batch sizes read from /metrics.
JSON (machine, CPU features, torch GEMM ceilings, versions, commit) in bench/results/serve-*.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_common import RESULTS, gemm_gflops, machine_info  # noqa: E402

CONFIGS = {
    "batched": ["--max-batch", "16", "--max-wait-ms", "10"],
    "unbatched": ["--max-batch", "1", "--max-wait-ms", "0"],
    "reference": ["--max-batch", "16", "--max-wait-ms", "10", "--backend", "reference"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], threads: int, timeout_s: float = 120):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fastface.cli", "serve", "--port", str(self.port), "--threads", str(threads),
               "--log-level", "warning", "--max-queue", "4096", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.1)

    def batch_rows(self, task: str) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            for stat in ("count", "sum"):
                if line.startswith(f'fastface_batch_rows_{stat}{{task="{task}"}}'):
                    out[stat] = float(line.split()[-1])
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


QUESTIONS = ["what colour is her hair?", "is she wearing glasses?", "what colour are her eyes?", "is she smiling?"]


def request_body(task: str, i: int, steps: int, image_url: str | None) -> tuple[str, dict]:
    """Request i of a task: an image of its own seed, or a question about the one test face."""
    if task == "images":
        return "/v1/images/generations", {"prompt": f"a smiling woman with red hair, portrait {i}", "n": 1,
                                          "seed": 1000 + i, "steps": steps, "guidance": 2.0}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": QUESTIONS[i % 4]}]}]}


def load(url: str, *, task: str, concurrency: int, requests: int, steps: int, timeout_s: float,
         image_url: str | None = None) -> dict:
    """``requests`` requests of ``task`` from ``concurrency`` threads; latency per request, wall time of all."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies, failures = [], []

    def worker():
        with httpx.Client(timeout=timeout_s) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                path, body = request_body(task, i, steps, image_url)
                t0 = time.perf_counter()
                r = client.post(url + path, json=body)
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else failures).append(dt if r.status_code == 200
                                                                              else r.status_code)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"concurrency": concurrency, "requests": requests, "ok": len(latencies), "failures": failures,
            "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None}


def engine_ceiling(pipe, face, *, steps: int, batch: int, threads: int) -> dict:
    """What batching can gain at most on this machine: the library's own requests/s at batch 1 and ``batch``, in
    this process, no server (the server's batched rate cannot exceed the engine's at its batch size)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for b in (1, batch):
            prompts = [f"a smiling woman with red hair, portrait {i}" for i in range(b)]
            pipe.generate_tokens(prompts[:1], steps=2, seed=0)
            t0 = time.perf_counter()
            pipe.generate(prompts, steps=steps, seed=list(range(b)))
            out[f"images_per_s_b{b}"] = b / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            pipe.answer([face] * b, [QUESTIONS[i % 4] for i in range(b)])
            out[f"answers_per_s_b{b}"] = b / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    out[f"images_b{batch}_over_b1"] = out[f"images_per_s_b{batch}"] / out["images_per_s_b1"]
    out[f"answers_b{batch}_over_b1"] = out[f"answers_per_s_b{batch}"] / out["answers_per_s_b1"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--tasks", nargs="+", default=["images", "answers"], choices=["images", "answers"])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="requests per client thread (at least 4 requests)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="server torch threads")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    p.add_argument("--quick", action="store_true", help="4 steps, 1 round, batched and unbatched only")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/serve-<time>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 4, 1
        args.configs = [c for c in args.configs if c != "reference"]

    import fastface
    from fastface import _C

    info = machine_info()
    info["cpu_features"] = _C.cpu_features()
    info["gemm_GFLOPs"] = {"float32": gemm_gflops(torch.float32), "bfloat16": gemm_gflops(torch.bfloat16)}
    info["fastface"] = fastface.__version__
    for name in ("fastapi", "uvicorn", "httpx"):
        info[name] = __import__(name).__version__
    print(f"cpu features {info['cpu_features']}; torch GEMM fp32 {info['gemm_GFLOPs']['float32']:.0f}, "
          f"bf16 {info['gemm_GFLOPs']['bfloat16']:.0f} GFLOP/s; server threads {args.threads}", flush=True)

    pipe = fastface.load()
    tokens_per_image = pipe.config.image_tokens
    face = pipe.generate(["a smiling woman with red hair"], steps=args.steps, seed=0)[0]
    buf = io.BytesIO()
    face.save(buf, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    ceiling = engine_ceiling(pipe, face, steps=args.steps, batch=max(args.concurrency), threads=args.threads)
    print("engine alone, no server: " + ", ".join(f"{k} {v:.2f}" for k, v in ceiling.items()), flush=True)
    del pipe
    rows = []
    for config in args.configs:
        server = ServerProcess(CONFIGS[config], args.threads)
        try:
            for task in args.tasks:
                load(server.url, task=task, concurrency=1, requests=1, steps=2, timeout_s=args.timeout,
                     image_url=image_url)  # warm-up
                for c in args.concurrency:
                    before = server.batch_rows(task)
                    row = load(server.url, task=task, concurrency=c, requests=max(4, c * args.rounds),
                               steps=args.steps, timeout_s=args.timeout, image_url=image_url)
                    after = server.batch_rows(task)
                    calls = after.get("count", 0) - before.get("count", 0)
                    row.update(config=config, task=task, steps=args.steps if task == "images" else None,
                               engine_calls=calls, mean_batch_rows=(after.get("sum", 0) - before.get("sum", 0)) / calls
                               if calls else None)
                    if task == "images":
                        row["image_tokens_per_s"] = row["requests_per_s"] * tokens_per_image
                    rows.append(row)
                    print(f"{config:10s} {task:8s} c={c:<3d} {row['requests_per_s']:7.2f} req/s "
                          f"p50 {row['p50_s']:6.2f} s p99 {row['p99_s']:6.2f} s  "
                          f"batch {row['mean_batch_rows'] or 0:4.1f}  failures {len(row['failures'])}", flush=True)
        finally:
            server.stop()

    def rate(config, task, c):
        return next((r["requests_per_s"] for r in rows
                     if r["config"] == config and r["task"] == task and r["concurrency"] == c), None)

    summary = {}
    top = max(args.concurrency)
    for task in args.tasks:
        if rate("batched", task, 1) and rate("batched", task, top):
            summary[f"{task}_batched_c{top}_over_c1"] = rate("batched", task, top) / rate("batched", task, 1)
        if rate("unbatched", task, top) and rate("batched", task, top):
            summary[f"{task}_batched_over_unbatched_c{top}"] = rate("batched", task, top) / rate("unbatched", task, top)
        if rate("reference", task, top) and rate("batched", task, top):
            summary[f"{task}_auto_over_reference_c{top}"] = rate("batched", task, top) / rate("reference", task, top)
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")
    out = Path(args.out) if args.out else RESULTS / f"serve-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "settings": vars(args), "engine_ceiling": ceiling, "rows": rows,
                               "summary": summary},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
