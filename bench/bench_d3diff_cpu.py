"""CPU benchmark: the fused C++ D3Diff loss (fastface._C) against the reference loss under autograd, in one run.

    python bench/bench_d3diff_cpu.py            # M = 8192 rows x V = 8192; JSON to bench/results/bench_d3diff_cpu.json
    python bench/bench_d3diff_cpu.py --quick    # M = 2048, fewer repeats (..._quick.json)

Time: forward + backward (loss.backward()) of each implementation, float32 and bfloat16 logits.
Memory: peak extra memory of one forward + backward, measured in a fresh subprocess per implementation as
the peak resident set (VmHWM, reset before the call) minus the resident set just before the call, with the inputs
already allocated and touched; the gradient (logits-sized, in both) is included. Also: the bytes the
autograd graph keeps between forward and backward (saved tensors beyond the logits themselves).
Ceiling: memcpy bandwidth measured in the same run (at the start and again before each case); the fused kernel
reads the logits twice (forward, backward) and writes the gradient once, so its floor is 3 * logits bytes / copy
rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_common import machine_info, memcpy_bandwidth, timeit, write  # noqa: E402

from fastface import _cpp  # noqa: E402
from fastface.ops.d3diff import d3diff_loss_reference  # noqa: E402

IMPLS = {"cpp": _cpp.d3diff_loss, "reference": d3diff_loss_reference}


def inputs(M, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(M, V, dtype=dtype)
    for i in range(0, M, 256):  # chunked: no logits-sized float32 temporary
        rows = logits[i:i + 256]
        rows.copy_(torch.randn(rows.shape, generator=gen) * 3)
    targets = torch.randint(0, V, (M,), generator=gen)
    mask_ratio = torch.rand(M, generator=gen).clamp(min=1 / 256)
    return logits, targets, mask_ratio


def step(fn, logits, targets, mask_ratio):
    x = logits.detach().requires_grad_(True)
    loss = fn(x, targets, mask_ratio, alpha=0.5, r_max=64.0)
    loss.backward()
    return loss.detach(), x.grad


def _status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory_child(impl, M, V, dtype):
    """Runs in a subprocess: prints JSON {extra_peak_bytes, saved_bytes, ...}.

    Peak resident set from /proc/self/status VmHWM (per address space; getrusage's ru_maxrss is inherited
    from the parent across exec), reset just before the call through /proc/self/clear_refs where allowed.
    """
    logits, targets, mask_ratio = inputs(M, V, getattr(torch, dtype))
    fn = IMPLS[impl]
    step(fn, logits[:8].clone(), targets[:8], mask_ratio[:8])  # load code paths, thread pools
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        pass
    before = _status_bytes("VmRSS")
    baseline_excess = _status_bytes("VmHWM") - before  # a call peaking below this is not seen
    x = logits.requires_grad_(True)
    saved = []

    def pack(t):
        if t.data_ptr() != x.data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x, targets, mask_ratio, alpha=0.5, r_max=64.0)
    loss.backward()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"extra_peak_bytes": peak - before, "rss_before": before, "peak": peak,
                      "baseline_excess_bytes": baseline_excess, "saved_bytes": sum(saved)}))


def peak_memory(impl, M, V, dtype):
    out = subprocess.run([sys.executable, __file__, "--child", impl, str(M), str(V), dtype],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def case(M, V, dtype, bw, rep_cpp, rep_ref):
    logits, targets, mask_ratio = inputs(M, V, dtype)
    loss, grad = step(_cpp.d3diff_loss, logits, targets, mask_ratio)
    ref_loss, ref_grad = step(d3diff_loss_reference, logits, targets, mask_ratio)
    err = {"loss_rel": float((loss - ref_loss).abs() / ref_loss.abs()),
           "grad_max_abs": float((grad.float() - ref_grad.float()).abs().max()),
           "grad_scale": float(ref_grad.float().abs().max())}
    del grad, ref_grad
    args = [logits, targets, mask_ratio]
    t_cpp = timeit(lambda: step(_cpp.d3diff_loss, *args), repeat=rep_cpp)
    t_ref = timeit(lambda: step(d3diff_loss_reference, *args), repeat=rep_ref)
    nbytes = logits.numel() * logits.element_size()
    bw_now = memcpy_bandwidth(128 << 20, repeat=3)  # again next to the timing: the machine's load varies
    floor_s = 3 * nbytes / (bw_now / 2 * 1e9)
    args.clear()  # free the logits before the memory subprocesses run
    del logits
    name = str(dtype).replace("torch.", "")
    mem = {impl: peak_memory(impl, M, V, name) for impl in IMPLS}
    row = {"M": M, "V": V, "dtype": name, "logits_bytes": nbytes, "memcpy_GBps_here": bw_now,
           "cpp": t_cpp, "reference": t_ref, "speedup_vs_reference": t_ref["median_s"] / t_cpp["median_s"],
           "bandwidth_floor_s": floor_s, "cpp_over_floor": t_cpp["median_s"] / floor_s, "memory": mem,
           "extra_memory_ratio": mem["cpp"]["extra_peak_bytes"] / max(1, mem["reference"]["extra_peak_bytes"]),
           "errors_vs_reference": err}
    mb = 1 << 20
    ms = {k: t_cpp[k] * 1e3 for k in ("median_s", "min_s", "max_s")}
    print(f"{name:9s} cpp {ms['median_s']:8.1f} ms [{ms['min_s']:.1f}, {ms['max_s']:.1f}]"
          f"  ref {t_ref['median_s'] * 1e3:8.1f} ms  x{row['speedup_vs_reference']:5.1f}"
          f"  floor {floor_s * 1e3:6.1f} ms  peak extra cpp {mem['cpp']['extra_peak_bytes'] / mb:7.1f} MiB"
          f" ref {mem['reference']['extra_peak_bytes'] / mb:7.1f} MiB (ratio {row['extra_memory_ratio']:.2f})"
          f"  saved cpp {mem['cpp']['saved_bytes'] / mb:.2f} MiB ref {mem['reference']['saved_bytes'] / mb:.1f} MiB",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M = 2048 rows, fewer repeats")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, M, V, dtype = args.child
        return peak_memory_child(impl, int(M), int(V), dtype)
    M, V = (2048, 8192) if args.quick else (8192, 8192)
    rep_cpp = args.repeat or (5 if args.quick else 7)
    rep_ref = args.repeat or (2 if args.quick else 3)
    bw = memcpy_bandwidth()
    print(f"memcpy bandwidth {bw:.1f} GB/s (read + write)")
    rows = [case(M, V, dtype, bw, rep_cpp, rep_ref) for dtype in (torch.float32, torch.bfloat16)]
    payload = {"machine": machine_info(), "memcpy_GBps": bw, "quick": args.quick, "rows": rows}
    path = write("bench_d3diff_cpu" + ("_quick" if args.quick else ""), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
