"""GPU benchmark: each Triton kernel against the reference and the best peer on the same device, in one run.

    python bench/bench_gpu.py                                   # all ops; JSON to bench/results/
    python bench/bench_gpu.py --ops decode d3diff --dtypes bfloat16 --reps 50
    TRITON_INTERPRET=1 python bench/bench_gpu.py --smoke        # tiny shapes on the CPU: checks the script only

Without a CUDA device (and without ``--smoke``) it says so and exits with status 0.

Ops, shapes (the CPU benchmarks', plus a 2048-wide grouped MoE labelled showo-1b) and implementations:

  moe        grouped MoE forward. Mixtral-like H=1024, F=2816, E=8, k=2 and showo-1b-like H=2048, F=2048, E=8,
             k=2, one group and no shared expert (as transformers models), T = 1, 8, 64, 512, 4096; and showo-1b as
             fastface runs it (G=2 groups, mixed, one shared expert) at T = 64 and 4096.
             impls: triton (fastface.kernels.grouped_moe), reference (fastface.ops.moe: a loop over experts),
             transformers MixtralSparseMoeBlock with experts_implementation "grouped_mm" (torch grouped GEMMs, the
             peer) and "eager" -- same weights, router included everywhere.
  moe_bwd    forward + backward (grads of x and every weight) at T = 512, 4096: triton, reference, transformers
             grouped_mm.
  decode     one masked-decode step, B=8 with guidance (16 logits rows per position), N = 256 (showo-1b: 16x16
             image tokens) and 1024, V = 8192 (the showo-1b codebook), all positions masked (step 0) and half
             masked (a middle step): triton, reference, torch.compile(reference) (the peer).
  d3diff     D3Diff loss forward + backward at M = 8192 rows x V = 8192, and showo-1b's batch of 16 images at a
             mean mask ratio of 1/2 (M = 2048): triton, reference, torch.compile(reference) (the peer); peak extra
             memory of each (bytes allocated beyond the inputs).

Timing: warm up (compiles, autotunes), then CUDA-graph replay (torch.cuda.CUDAGraph) wherever the callable can be
captured -- the reference MoE and the eager transformers experts sync with the host and are timed eagerly; a failed
capture falls back to eager timing with a note. Each of ``--reps`` samples times enough back-to-back replays to last
``--min-sample-ms`` (CUDA events); the JSON has the median, p10/p90 and min. Ceilings are measured on the device
(copy bandwidth, bf16 and fp32 matmul FLOP/s) and every row gets its roofline bound, max(bytes / bandwidth,
FLOPs / peak), as a fraction of its median. The triton outputs are compared with the reference on the same inputs
(decode: count of differing tokens and mask entries, which should be 0).

Output: bench/results/gpu_<gpu>_<UTC time>.json with machine, versions, commit and time; a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bfloat16", "float32")
OPS = ("moe", "moe_bwd", "decode", "d3diff")


# ---------------------------------------------------------------------------------------------------
# machine, versions, commit
# ---------------------------------------------------------------------------------------------------


def _run(cmd):
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device):
    import torch

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0])
    return info


def versions():
    import torch
    import triton

    import fastface

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton.__version__, "fastface": fastface.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    return out


def commit_info():
    return {"commit": _run(["git", "rev-parse", "HEAD"]) or None,
            "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))}


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------


class Clock:
    """Wall time of a callable: CUDA events on a GPU, perf_counter on the CPU (smoke runs)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time_ms(self, run, inner: int) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            run()
        return (time.perf_counter() - t0) * 1e3 / inner


def cuda_graph(fn):
    """Capture ``fn`` (warmed up on a side stream first, as torch requires); returns (graph, replay)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph, graph.replay


def measure(fn, clock: Clock, *, reps: int, min_sample_ms: float, capture: bool) -> dict:
    """Median / spread of ``fn`` in ms, replayed from a CUDA graph when ``capture`` and capture succeeds."""
    for _ in range(2):  # compile / autotune / allocate outside the timing
        fn()
    clock.sync()
    run, graph, note = fn, None, None
    if capture and clock.cuda:
        try:
            graph, run = cuda_graph(fn)
        except Exception as e:  # noqa: BLE001 - any capture failure means eager timing, noted in the results
            note = f"graph capture failed, timed eagerly: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            clock.sync()
    elif capture:
        note = "no CUDA: eager"
    else:
        note = "eager (syncs with the host: not capturable)"
    run()
    clock.sync()
    one = clock.time_ms(run, 1)
    inner = max(1, min(1000, math.ceil(min_sample_ms / max(one, 1e-3))))
    samples = sorted(clock.time_ms(run, inner) for _ in range(reps))
    del graph
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]
    return {"median_ms": statistics.median(samples), "p10_ms": q(0.1), "p90_ms": q(0.9), "min_ms": samples[0],
            "reps": reps, "inner": inner, "cuda_graph": run is not fn, "note": note}


def peak_extra_bytes(fn, clock: Clock):
    """Bytes allocated by one call of ``fn`` beyond what was allocated before it (CUDA only)."""
    torch = clock.torch
    if not clock.cuda:
        return None
    clock.sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    clock.sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def _copy_ms(device, n_bytes, clock, reps):
    import torch

    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), clock, reps=reps, min_sample_ms=1.0, capture=True)["min_ms"]


def _matmul_ms(device, n, dtype, clock, reps):
    import torch

    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    return measure(lambda: x @ y, clock, reps=reps, min_sample_ms=1.0, capture=True)["min_ms"]


def ceilings(device, clock: Clock, smoke: bool) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and matmul FLOP/s (bf16; fp32 without TF32)."""
    import torch

    n_bytes, n, reps = (2**20, 256, 5) if smoke else (2**30, 8192, 20)
    out = {"copy_bandwidth_gbs": 2 * n_bytes / _copy_ms(device, n_bytes, clock, reps) / 1e6}
    for name in ("bfloat16", "float32"):
        out[f"matmul_{name}_tflops"] = 2 * n**3 / _matmul_ms(device, n, getattr(torch, name), clock, reps) / 1e9
    return out


def roofline(row: dict, ceil: dict, dtype: str):
    """Fill the row's lower-bound time and the fraction of it achieved."""
    bound_s = max(row.get("bytes", 0) / (ceil["copy_bandwidth_gbs"] * 1e9),
                  row.get("flops", 0) / (ceil[f"matmul_{dtype}_tflops"] * 1e12))
    row["roofline_ms"] = bound_s * 1e3
    row["roofline_fraction"] = row["roofline_ms"] / row["median_ms"] if row["median_ms"] else None


# ---------------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------------


def _dt(name):
    import torch

    return getattr(torch, name)


def _mixtral_block(x, args, top_k, implementation):
    """transformers' Mixtral sparse-MoE block (router + experts) on group 0's weights."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    _, E, H = args["router_weight"].shape
    F = args["down_proj"].shape[-1]
    cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=top_k)
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(args["router_weight"][0])
        block.experts.gate_up_proj.copy_(args["gate_up_proj"][0])
        block.experts.down_proj.copy_(args["down_proj"][0])
    return block


def moe_cases(smoke):
    if smoke:
        return [("mixtral-like", dict(H=32, F=48, E=4, k=2, G=1, S=0), (1, 7)),
                ("showo-1b", dict(H=32, F=32, E=4, k=2, G=2, S=1), (7,))]
    return [("mixtral-like", dict(H=1024, F=2816, E=8, k=2, G=1, S=0), (1, 8, 64, 512, 4096)),
            ("showo-1b-like", dict(H=2048, F=2048, E=8, k=2, G=1, S=0), (1, 8, 64, 512, 4096)),
            ("showo-1b", dict(H=2048, F=2048, E=8, k=2, G=2, S=1), (64, 4096))]


def _moe_cost(T, s, hit, elt, backward):
    """(FLOPs, bytes) of one call: expert GEMMs + router; weights of the experts hit read once, x in and y out."""
    H, F, k, E, G, S = s["H"], s["F"], s["k"], s["E"], s["G"], s["S"]
    flops = 2 * T * k * 3 * H * F + 2 * T * H * E + 2 * T * S * 3 * H * F
    n_bytes = (hit + G * S) * 3 * H * F * elt + 2 * T * H * elt
    return (3 * flops, 3 * n_bytes) if backward else (flops, n_bytes)  # backward: two GEMMs per forward GEMM


def _error_row(op, label, shape, dtype_name, impl, e):
    return dict(op=op, case=label, shape=shape, dtype=dtype_name, impl=impl, error=f"{type(e).__name__}: {e}"[:200])


def _rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def bench_moe(device, dtype_name, clock, opts, backward=False):
    import torch

    rows = []
    for label, s, Ts in moe_cases(opts.smoke):
        for T in Ts:
            if backward and T < (1 if opts.smoke else 512):
                continue
            rows += _bench_moe_case(device, dtype_name, label, s, T, clock, opts, backward)
            if clock.cuda:
                torch.cuda.empty_cache()
    return rows


def _bench_moe_case(device, dtype_name, label, s, T, clock, opts, backward):
    import torch

    from fastface.kernels.grouped_moe import grouped_moe
    from fastface.ops.moe import grouped_moe_reference
    from fastface.testing import make_moe_inputs

    dtype = _dt(dtype_name)
    op = "moe_bwd" if backward else "moe"
    shape = dict(T=T, **s)
    a = make_moe_inputs(T, s["H"], s["F"], G=s["G"], E=s["E"], S=s["S"], dtype=dtype, seed=T, device=device)
    x, gid = a.pop("x"), a.pop("group_ids")
    with torch.no_grad():  # experts whose weights a call reads
        logits = (x.float() @ a["router_weight"].flatten(0, 1).float().t()).view(T, s["G"], s["E"])
        chosen = logits[torch.arange(T, device=device), gid].topk(s["k"], dim=-1).indices + gid[:, None] * s["E"]
        hit = int(torch.unique(chosen).numel())
    flops, n_bytes = _moe_cost(T, s, hit, torch.finfo(dtype).bits // 8, backward)

    # name -> (forward callable, capturable, tensors to differentiate)
    impls = {
        "triton": ((lambda: grouped_moe(x, gid, top_k=s["k"], **a)), True, [x, *a.values()]),
        "reference": ((lambda: grouped_moe_reference(x, gid, top_k=s["k"], **a)), False, [x, *a.values()]),
    }
    rows = []
    if s["G"] == 1 and s["S"] == 0 and not opts.no_transformers:
        for impl in ("grouped_mm",) if backward else ("grouped_mm", "eager"):
            try:
                block = _mixtral_block(x, a, s["k"], impl)
            except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
                rows.append(_error_row(op, label, shape, dtype_name, f"transformers_{impl}", e))
                continue
            impls[f"transformers_{impl}"] = ((lambda b=block: b(x[None])[0]), impl == "grouped_mm",
                                             [x, *block.parameters()])
    dy = torch.randn(T, s["H"], device=device, dtype=dtype)

    def timed(fwd, params):
        return (lambda: torch.autograd.grad(fwd(), params, dy)) if backward else fwd

    def run_with_grad(fn, params):
        for p in params:
            p.requires_grad_(backward)
        try:
            with torch.set_grad_enabled(backward):
                return fn()
        finally:
            for p in params:
                p.requires_grad_(False)

    (tri, _, tri_params), (ref, _, ref_params) = impls["triton"], impls["reference"]
    got, want = run_with_grad(timed(tri, tri_params), tri_params), run_with_grad(timed(ref, ref_params), ref_params)
    if backward:
        check = {"grad_max_rel_diff_vs_reference": max(_rel(g, w) for g, w in zip(got, want))}
    else:
        check = {"max_rel_diff_vs_reference": _rel(got, want)}
    for impl, (fwd, capturable, params) in impls.items():
        fn = timed(fwd, params)
        try:
            stats = run_with_grad(lambda fn=fn, capturable=capturable: measure(
                fn, clock, reps=opts.reps, min_sample_ms=opts.min_sample_ms,
                capture=capturable and not opts.no_graph), params)
        except Exception as e:  # noqa: BLE001
            rows.append(_error_row(op, label, shape, dtype_name, impl, e))
            continue
        rows.append(dict(op=op, case=label, shape=shape, dtype=dtype_name, impl=impl, flops=flops, bytes=n_bytes,
                         **stats, **({"check": check} if impl == "triton" else {})))
    return rows


def decode_cases(smoke):
    if smoke:
        return [("small", dict(B=2, N=16, V=64))]
    return [("showo-1b", dict(B=8, N=256, V=8192)), ("N=1024", dict(B=8, N=1024, V=8192))]


def bench_decode(device, dtype_name, clock, opts):
    import torch

    rows = []
    for label, s in decode_cases(opts.smoke):
        for phase in ("all masked", "half masked"):
            rows += _bench_decode_case(device, dtype_name, label, s, phase, clock, opts)
            if clock.cuda:
                torch.cuda.empty_cache()
    return rows


def _bench_decode_case(device, dtype_name, label, s, phase, clock, opts):
    import torch

    from fastface.kernels.masked_decode import masked_decode_step
    from fastface.ops.masked_decode import masked_decode_step_reference

    dtype = _dt(dtype_name)
    B, N, V = s["B"], s["N"], s["V"]
    steps, guidance, tau_conf = 16, 2.0, 4.5
    step, fraction = (0, 1.0) if phase == "all masked" else (steps // 2, 0.5)
    gen = torch.Generator(device="cpu").manual_seed(N)
    logits = (torch.randn(2 * B, N, V, generator=gen) * 3).to(device=device, dtype=dtype)
    tokens = torch.randint(0, V, (B, N), generator=gen).to(device)
    u = torch.rand(2, B, N, generator=gen).clamp(1e-6, 1 - 1e-6).to(device)
    masked = (torch.rand(B, N, generator=gen) < fraction).to(device)
    kw = dict(step=step, steps=steps, guidance=guidance, confidence_temperature=tau_conf)
    compiled = torch.compile(masked_decode_step_reference, dynamic=False, fullgraph=True)
    impls = {
        "triton": lambda: masked_decode_step(logits, tokens, masked, u, **kw),
        "reference": lambda: masked_decode_step_reference(logits, tokens, masked, u, **kw),
        "torch_compile_reference": lambda: compiled(logits, tokens, masked, u, **kw),
    }
    got, want = impls["triton"](), impls["reference"]()
    check = {"tokens_differ": int((got[0] != want[0]).sum()), "mask_differs": int((got[1] != want[1]).sum()),
             "masked_rows": int(masked.sum())}
    n_bytes = int(masked.sum()) * 2 * V * (torch.finfo(dtype).bits // 8)  # each masked row's two logits rows, once
    shape = dict(B=B, N=N, V=V, R=2 * B, phase=phase)
    rows = []
    for impl, fn in impls.items():
        try:
            stats = measure(fn, clock, reps=opts.reps, min_sample_ms=opts.min_sample_ms, capture=not opts.no_graph)
        except Exception as e:  # noqa: BLE001
            rows.append(_error_row("decode", label, shape, dtype_name, impl, e))
            continue
        rows.append(dict(op="decode", case=label, shape=shape, dtype=dtype_name, impl=impl, bytes=n_bytes, flops=0,
                         **stats, **({"check": check} if impl == "triton" else {})))
    return rows


def d3diff_cases(smoke):
    if smoke:
        return [("small", dict(M=32, V=64))]
    return [("8192x8192", dict(M=8192, V=8192)), ("showo-1b", dict(M=2048, V=8192))]


def bench_d3diff(device, dtype_name, clock, opts):
    import torch

    rows = []
    for label, s in d3diff_cases(opts.smoke):
        rows += _bench_d3diff_case(device, dtype_name, label, s, clock, opts)
        if clock.cuda:
            torch.cuda.empty_cache()
    return rows


def _bench_d3diff_case(device, dtype_name, label, s, clock, opts):
    import torch

    from fastface.kernels.d3diff import d3diff_loss
    from fastface.ops.d3diff import d3diff_loss_reference

    dtype = _dt(dtype_name)
    M, V, alpha = s["M"], s["V"], 0.1
    gen = torch.Generator(device="cpu").manual_seed(M)
    logits = (torch.randn(M, V, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (M,), generator=gen).to(device)
    ratio = torch.rand(M, generator=gen).clamp(1.0 / 256, 1.0).to(device)
    compiled = torch.compile(d3diff_loss_reference, dynamic=False, fullgraph=True)

    def fwd_bwd(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(logits, targets, ratio, alpha=alpha), logits)

    impls = {"triton": fwd_bwd(d3diff_loss), "reference": fwd_bwd(d3diff_loss_reference),
             "torch_compile_reference": fwd_bwd(compiled)}
    got_loss = d3diff_loss(logits, targets, ratio, alpha=alpha).item()
    want_loss = d3diff_loss_reference(logits, targets, ratio, alpha=alpha).item()
    check = {"loss_rel_diff": abs(got_loss - want_loss) / abs(want_loss),
             "grad_max_rel_diff": _rel(impls["triton"]()[0], impls["reference"]()[0])}
    n_bytes = 3 * M * V * (torch.finfo(dtype).bits // 8)  # forward reads the logits; backward reads them, writes grad
    shape = dict(M=M, V=V)
    rows = []
    for impl, fn in impls.items():
        try:
            fn()  # compiled before its memory is measured
            extra = peak_extra_bytes(fn, clock)
            stats = measure(fn, clock, reps=opts.reps, min_sample_ms=opts.min_sample_ms, capture=not opts.no_graph)
        except Exception as e:  # noqa: BLE001
            rows.append(_error_row("d3diff", label, shape, dtype_name, impl, e))
            continue
        rows.append(dict(op="d3diff", case=label, shape=shape, dtype=dtype_name, impl=impl, bytes=n_bytes, flops=0,
                         peak_extra_bytes=extra, **stats, **({"check": check} if impl == "triton" else {})))
    return rows


PEERS = {"moe": ("transformers_grouped_mm",), "moe_bwd": ("transformers_grouped_mm",),
         "decode": ("torch_compile_reference",), "d3diff": ("torch_compile_reference",)}


def add_speedups(rows):
    """speedup_vs_reference and speedup_vs_peer (the best peer's median over the triton median) per triton row."""
    by_case = {}
    for r in rows:
        if "median_ms" in r:
            by_case.setdefault((r["op"], r["case"], json.dumps(r["shape"], sort_keys=True), r["dtype"]), {})[
                r["impl"]] = r["median_ms"]
    for r in rows:
        if r.get("impl") != "triton" or "median_ms" not in r:
            continue
        times = by_case[(r["op"], r["case"], json.dumps(r["shape"], sort_keys=True), r["dtype"])]
        if "reference" in times:
            r["speedup_vs_reference"] = times["reference"] / r["median_ms"]
        peers = [times[p] for p in PEERS[r["op"]] if p in times]
        if peers:
            r["speedup_vs_peer"] = min(peers) / r["median_ms"]


def print_table(rows):
    head = f"{'op':8} {'case':14} {'shape':34} {'dtype':9} {'impl':24} {'median ms':>10} {'p10-p90 ms':>19} " \
           f"{'graph':>5} {'vs ref':>7} {'vs peer':>7} {'roofline':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items() if k not in ("k",))[:34]
        if "error" in r:
            print(f"{r['op']:8} {r['case']:14} {shape:34} {r['dtype']:9} {r['impl']:24} error: {r['error'][:60]}")
            continue
        fmt = lambda x, f: format(x, f) if x is not None else "-"
        print(f"{r['op']:8} {r['case']:14} {shape:34} {r['dtype']:9} {r['impl']:24} {r['median_ms']:10.4f} "
              f"{r['p10_ms']:9.4f}-{r['p90_ms']:<9.4f} {'y' if r['cuda_graph'] else 'n':>5} "
              f"{fmt(r.get('speedup_vs_reference'), '7.2f'):>7} {fmt(r.get('speedup_vs_peer'), '7.2f'):>7} "
              f"{fmt(r.get('roofline_fraction'), '8.2f'):>8}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--reps", type=int, default=30, help="timed samples per implementation")
    parser.add_argument("--min-sample-ms", type=float, default=1.0, help="each sample replays until this long")
    parser.add_argument("--no-graph", action="store_true", help="time eagerly, no CUDA-graph replay")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers experts")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default bench/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, on the CPU under TRITON_INTERPRET=1 when there is no GPU: checks the script")
    opts = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not opts.smoke:
        print("bench_gpu: no CUDA device here -- nothing to time. The Triton kernels are tested on the CPU under "
              "TRITON_INTERPRET=1 (pytest tests/test_op_*.py -k triton); run this script on a machine with a GPU.")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (triton.jit reads it then)
    if opts.smoke:
        opts.reps = min(opts.reps, 3)
        opts.min_sample_ms = 0.0
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 everywhere means IEEE float32, as the kernels compute
    clock = Clock(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    ceil = ceilings(device, clock, opts.smoke)
    print(f"bench_gpu on {machine_info(device).get('gpu', 'cpu')}: copy {ceil['copy_bandwidth_gbs']:.0f} GB/s, "
          f"bf16 {ceil['matmul_bfloat16_tflops']:.1f} TFLOP/s, fp32 {ceil['matmul_float32_tflops']:.1f} TFLOP/s")
    rows = []
    for dtype_name in opts.dtypes:
        if "moe" in opts.ops:
            rows += bench_moe(device, dtype_name, clock, opts)
        if "moe_bwd" in opts.ops:
            rows += bench_moe(device, dtype_name, clock, opts, backward=True)
        if "decode" in opts.ops:
            rows += bench_decode(device, dtype_name, clock, opts)
        if "d3diff" in opts.ops:
            rows += bench_d3diff(device, dtype_name, clock, opts)
    for r in rows:
        if "median_ms" in r:
            roofline(r, ceil, r["dtype"])
    add_speedups(rows)
    print_table(rows)

    info = machine_info(device)
    result = {"benchmark": "bench_gpu", "time": started.isoformat(timespec="seconds"), "machine": info,
              "versions": versions(), **commit_info(), "ceilings": ceil, "smoke": opts.smoke,
              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}, "results": rows}
    out_dir = opts.out or (Path(tempfile.gettempdir()) / "fastface-bench" if opts.smoke else ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info.get("gpu", "cpu")).strip("-").lower()
    path = out_dir / f"gpu_{slug}_{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
