"""CPU benchmark: the C++ masked-decode step (fastface._C) against the reference step, in one run.

    python bench/bench_decode_cpu.py            # N = 256 and 1024; JSON to bench/results/bench_decode_cpu.json
    python bench/bench_decode_cpu.py --quick    # N = 256 only, fewer repeats (..._quick.json)
    python bench/bench_decode_cpu.py --peer     # also torch.compile(reference) (inductor C++; slow to compile)

Shapes: B = 8 with guidance (16 logits rows per position), N = 256 and 1024, V = 8192, float32 and
bfloat16 logits; all positions masked (step 0: every row is read) and about half masked (a middle step).

Ceiling: memcpy bandwidth (bytes read + written per second) measured in the same run, once at the start and
again right before each case (the machine may be shared). The "read once" time is the masked positions'
logits bytes (the only ones the kernel has to read) over the read rate of that memcpy; the target is
cpp <= 2x that. Each implementation's tokens and mask are checked equal to the reference's before timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_common import machine_info, memcpy_bandwidth, timeit, write  # noqa: E402

from fastface import _cpp  # noqa: E402
from fastface.ops.masked_decode import masked_decode_step_reference  # noqa: E402


def inputs(B, N, V, dtype, masked_fraction, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(2 * B, N, V, dtype=dtype)
    for r in range(2 * B):  # row by row: no logits-sized float32 temporary
        logits[r] = (torch.randn(N, V, generator=gen) * 3).to(dtype)
    masked = torch.rand(B, N, generator=gen) < masked_fraction
    tokens = torch.randint(0, V, (B, N), generator=gen)
    u = torch.rand(2, B, N, generator=gen).clamp(1e-7, 1 - 1e-7)
    return logits, tokens, masked, u


def case(B, N, V, dtype, label, frac, kw, bw, rep_cpp, rep_ref, peer):
    logits, tokens, masked, u = inputs(B, N, V, dtype, frac)
    ref = masked_decode_step_reference(logits, tokens, masked, u, **kw)
    got = _cpp.masked_decode_step(logits, tokens, masked, u, **kw)
    exact = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    read_bytes = int(masked.sum()) * 2 * V * logits.element_size()  # cond + uncond rows of masked positions
    bw_now = memcpy_bandwidth(128 << 20, repeat=3)  # again next to the timing: the machine's load varies
    read_s = read_bytes / (bw_now / 2 * 1e9)  # memcpy reads bw / 2 bytes per second
    t_cpp = timeit(lambda: _cpp.masked_decode_step(logits, tokens, masked, u, **kw), repeat=rep_cpp)
    t_ref = timeit(lambda: masked_decode_step_reference(logits, tokens, masked, u, **kw), repeat=rep_ref)
    row = {
        "B": B, "N": N, "V": V, "guidance": kw["guidance"], "dtype": str(dtype).replace("torch.", ""),
        "case": label, "step": kw["step"], "steps": kw["steps"], "masked_positions": int(masked.sum()),
        "logits_bytes_read": read_bytes, "memcpy_GBps_here": bw_now, "read_once_s": read_s,
        "cpp": t_cpp, "reference": t_ref,
        "cpp_equals_reference": exact, "speedup_vs_reference": t_ref["median_s"] / t_cpp["median_s"],
        "cpp_over_read_once": t_cpp["median_s"] / read_s,
    }
    if peer is not None:
        row["torch_compile"] = timeit(lambda: peer(logits, tokens, masked, u, **kw), repeat=rep_ref, warmup=2)
    ms = {k: t_cpp[k] * 1e3 for k in ("median_s", "min_s", "max_s")}
    print(f"N={N:5d} {row['dtype']:9s} {label:12s} cpp {ms['median_s']:8.2f} ms [{ms['min_s']:.2f}, {ms['max_s']:.2f}]"
          f"  ref {t_ref['median_s'] * 1e3:9.1f} ms  x{row['speedup_vs_reference']:6.1f}"
          f"  memcpy {bw_now:5.1f} GB/s read-once {read_s * 1e3:6.2f} ms"
          f"  cpp/read {row['cpp_over_read_once']:4.2f}  exact={exact}"
          + (f"  torch.compile {row['torch_compile']['median_s'] * 1e3:.1f} ms" if peer is not None else ""),
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 256 only, fewer repeats")
    ap.add_argument("--peer", action="store_true", help="also time torch.compile(reference)")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    B, V, steps, guidance = 8, 8192, 16, 2.0
    Ns = (256,) if args.quick else (256, 1024)
    rep_cpp = args.repeat or (5 if args.quick else 10)
    rep_ref = max(1, (args.repeat or 6) // 2) if not args.quick else 2

    bw = memcpy_bandwidth()
    print(f"memcpy bandwidth {bw:.1f} GB/s (read + write); decode math: {_cpp._C.reference_math()}")
    peer = torch.compile(masked_decode_step_reference, dynamic=False) if args.peer else None
    rows = []
    for N in Ns:
        for dtype in (torch.float32, torch.bfloat16):
            for label, frac, step in (("all masked", 1.0, 0), ("half masked", 0.5, steps // 2)):
                kw = dict(step=step, steps=steps, guidance=guidance, confidence_temperature=4.5)
                rows.append(case(B, N, V, dtype, label, frac, kw, bw, rep_cpp, rep_ref, peer))
    name = "bench_decode_cpu" + ("_quick" if args.quick else "") + ("_peer" if args.peer else "")
    path = write(name, {"machine": machine_info(), "memcpy_GBps": bw, "quick": args.quick,
                                      "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
