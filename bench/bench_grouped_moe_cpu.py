"""CPU benchmark: the C++ grouped-expert kernel against the reference and transformers' experts, in one run.

    python bench/bench_grouped_moe_cpu.py            # full table; JSON to bench/results/bench_grouped_moe_cpu.json
    python bench/bench_grouped_moe_cpu.py --quick    # fewer T, fewer repeats

Legend: T tokens, H hidden, E experts, F ffn width, K top-k.

Shapes: Mixtral-like H=1024, F=2816, E=8, K=2 at T = 1, 8, 64, 512, 4096, and showo-1b-like
H=2048, F=2048, E=8, K=2 (fastface.config.PRESETS["showo-1b"], routed experts only) at T = 8, 512; float32
and bfloat16 (weights and activations in that dtype).

Contenders, all on the same weights, each timing a whole MoE layer (router + experts) on x [T, H]:
- ``fastface``: ``fastface._cpp.grouped_moe`` (one group, no shared expert; routes itself)
- ``fastface_hf``: transformers' ``MixtralSparseMoeBlock`` with ``experts_implementation="fastface"``
- ``eager``, ``grouped_mm``, ``batched_mm``: the same block with transformers' own experts implementations
  (``batched_mm`` gathers a [T*K, 2F, H] weight copy: only run at T <= 8)
- ``reference``: ``fastface.ops.moe.grouped_moe_reference`` (float32 loop over experts)
Every contender's output is checked before timing (fastface against the reference, the transformers
blocks, whose bf16 router rounds its logits, against transformers' eager block). Repetitions are interleaved
(one run of each contender per round) so that load from other processes hits all of them alike; the
table reports the median and the min-max spread.

Roofline: time >= max(bytes / bandwidth, flops / peak), with bytes = the weights of the experts actually
hit + x + y, flops = 2 T K 3 H F + 2 T E H, and the ceilings measured in the same run: memcpy bandwidth
(bytes read + written per second) and torch.matmul GFLOP/s of a large square GEMM in each dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_common import gemm_gflops, machine_info, memcpy_bandwidth, write  # noqa: E402

from fastface import _C, _cpp  # noqa: E402
from fastface.ops.moe import grouped_moe_reference  # noqa: E402

MIXTRAL = dict(H=1024, F=2816, E=8, K=2)
SHOWO = dict(H=2048, F=2048, E=8, K=2)
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def make_layer(H, F, E, K, dtype, seed=0):
    """Weights (fastface layout, one group) and the transformers Mixtral blocks sharing them."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import fastface.hf

    fastface.hf.register()
    gen = torch.Generator().manual_seed(seed)
    w = dict(
        router_weight=(torch.randn(1, E, H, generator=gen) * H**-0.5).to(dtype),
        gate_up_proj=(torch.randn(1, E, 2 * F, H, generator=gen) * H**-0.5).to(dtype),
        down_proj=(torch.randn(1, E, H, F, generator=gen) * F**-0.5).to(dtype),
    )
    blocks = {}
    for impl in (*HF_IMPLS, "fastface"):
        cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = impl
        with torch.device("meta"):
            block = MixtralSparseMoeBlock(cfg)
        block = block.to_empty(device="cpu").to(dtype).eval()
        block.gate.weight = torch.nn.Parameter(w["router_weight"][0], requires_grad=False)  # shared storage
        block.experts.gate_up_proj = torch.nn.Parameter(w["gate_up_proj"][0], requires_grad=False)
        block.experts.down_proj = torch.nn.Parameter(w["down_proj"][0], requires_grad=False)
        blocks[impl] = block
    return w, blocks


def contenders(w, blocks, T, K):
    """name -> zero-argument callable computing the layer on x [T, H] (x is bound later)."""
    fns = {
        "fastface": lambda x, gid: _cpp.grouped_moe(x, gid, **w, top_k=K),
        "fastface_hf": lambda x, gid: blocks["fastface"](x[None])[0],
        "eager": lambda x, gid: blocks["eager"](x[None])[0],
        "grouped_mm": lambda x, gid: blocks["grouped_mm"](x[None])[0],
        "reference": lambda x, gid: grouped_moe_reference(x, gid, **w, top_k=K),
    }
    if T <= 8:
        fns["batched_mm"] = lambda x, gid: blocks["batched_mm"](x[None])[0]
    return fns


def bench_case(shape_name, shape, T, dtype, ceil, *, rounds, min_time, skip_reference):
    H, F, E, K = shape["H"], shape["F"], shape["E"], shape["K"]
    w, blocks = make_layer(H, F, E, K, dtype)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(dtype)
    gid = torch.zeros(T, dtype=torch.int64)
    fns = contenders(w, blocks, T, K)
    if skip_reference:
        fns.pop("reference")
    ref, logits = grouped_moe_reference(x, gid, **w, top_k=K, return_router_logits=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    check = {}
    with torch.no_grad():
        # correctness first (also the warm-up): fastface and the reference route on float32 logits; the
        # transformers blocks route on logits rounded to the dtype (bf16 ties and swaps differ), so they are
        # checked against transformers' eager block
        hf_ref = fns["eager"](x, gid).float()
        for name, fn in fns.items():
            y = fn(x, gid).float()
            want = ref.float() if name in ("fastface", "reference") else hf_ref
            err = ((y - want).abs().max() / want.abs().max()).item()
            check[name] = err
            if err > tol:
                raise AssertionError(f"{name} differs at T={T} {dtype}: max rel err {err:.3g}")
        times = {name: [] for name in fns}
        t_start = time.perf_counter()
        r = 0
        while r < rounds or (time.perf_counter() - t_start < min_time and r < 50):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x, gid)
                times[name].append(time.perf_counter() - t0)
            r += 1
    itemsize = torch.finfo(dtype).bits // 8
    hit = torch.topk(logits, K, dim=-1).indices.unique().numel()
    nbytes = hit * 3 * H * F * itemsize + E * H * itemsize + 2 * T * H * itemsize
    flops = 2 * T * K * 3 * H * F + 2 * T * E * H
    roof_s = max(nbytes / (ceil["memcpy_GBps"] * 1e9 / 2), flops / (ceil["gemm_GFLOPs"][str(dtype)] * 1e9))
    stats = {n: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": len(ts)}
             for n, ts in times.items()}
    hf_best = min((n for n in stats if n in HF_IMPLS), key=lambda n: stats[n]["median_s"])
    ff = stats["fastface"]["median_s"]
    return {
        "shape": shape_name, **shape, "T": T, "dtype": str(dtype).replace("torch.", ""),
        "experts_hit": hit, "bytes": nbytes, "flops": flops, "roofline_s": roof_s,
        "bound": "memory" if nbytes / (ceil["memcpy_GBps"] * 1e9 / 2) > flops / (ceil["gemm_GFLOPs"][str(dtype)] * 1e9)
        else "compute",
        "times": stats, "max_rel_err_vs_reference": check,
        "best_transformers": hf_best,
        "speedup_vs_best_transformers": stats[hf_best]["median_s"] / ff,
        "speedup_vs_reference": stats["reference"]["median_s"] / ff if "reference" in stats else None,
        "fastface_roofline_fraction": roof_s / ff,
        "fastface_GFLOPs": flops / ff / 1e9,
        "matmul_path": _C.matmul_path(dtype == torch.bfloat16),
    }


def fmt_row(r):
    t = r["times"]

    def ms(n):
        if n not in t:
            return "-"
        s = t[n]
        return f"{s['median_s'] * 1e3:.2f} ({s['min_s'] * 1e3:.2f}-{s['max_s'] * 1e3:.2f})"

    return (f"| {r['shape']} | {r['dtype']} | {r['T']} | {ms('fastface')} | {ms('fastface_hf')} | {ms('eager')} | "
            f"{ms('grouped_mm')} | {ms('batched_mm')} | {ms('reference')} | {r['speedup_vs_best_transformers']:.2f}x "
            f"({r['best_transformers']}) | {r['fastface_roofline_fraction']:.2f} ({r['bound']}) |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 1, 64, 512 only, fewer repeats")
    ap.add_argument("--out", default="bench_grouped_moe_cpu", help="results/<name>.json")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="precisions to run (default: both; bfloat16 is slow to measure on CPUs without bf16 "
                         "matrix instructions, where the transformers contenders fall back to scalar code)")
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes]

    if args.quick:
        cases = [("mixtral", MIXTRAL, T) for T in (1, 64, 512)] + [("showo-1b", SHOWO, 8)]
        rounds, min_time = 3, 0.0
    else:
        cases = [("mixtral", MIXTRAL, T) for T in (1, 8, 64, 512, 4096)] + [("showo-1b", SHOWO, T) for T in (8, 512)]
        rounds, min_time = 5, 1.0
    import transformers

    info = machine_info()
    info["transformers"] = transformers.__version__
    ceil = {"memcpy_GBps": memcpy_bandwidth(),
            "gemm_GFLOPs": {str(dt): gemm_gflops(dt) for dt in dtypes}}
    print(f"# {info['cpu']}, {info['logical_cpus']} cpus, torch {info['torch']}, transformers {info['transformers']}")
    print(f"# ceilings: memcpy {ceil['memcpy_GBps']:.1f} GB/s (read+write), GEMM "
          + ", ".join(f"{k.replace('torch.', '')} {v:.0f} GFLOP/s" for k, v in ceil["gemm_GFLOPs"].items()))
    print("| shape | dtype | T | fastface ms | fastface_hf | eager | grouped_mm | batched_mm | reference "
          "| speedup vs best transformers | roofline fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    info["threads"] = torch.get_num_threads()
    for dtype in dtypes:
        for shape_name, shape, T in cases:
            row = bench_case(shape_name, shape, T, dtype, ceil, rounds=rounds, min_time=min_time,
                             skip_reference=args.quick and T >= 4096)
            rows.append(row)
            print(fmt_row(row), flush=True)
    info["load_average_end"] = __import__("os").getloadavg()
    path = write(args.out, {"machine": info, "ceilings": ceil, "rows": rows})
    print(f"# written to {path}")


if __name__ == "__main__":
    main()
