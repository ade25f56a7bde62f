"""int8 weights: the matmul against torch's float and int8 matmuls, whole-model decoding speed, and what int8 does to
the faces, in one run.

    python bench/bench_int8.py                        # matmuls, face-s and moe-507m decoding; bench/results/
    python bench/bench_int8.py --quality-faces 200    # also the judge's accuracy on 200 faces per weight format
    python bench/bench_int8.py --quick --random       # seconds: tiny shapes and a tiny random model (smoke test)

Matmuls (``ops.int8_linear``, C++): y = x W^T + b at the shapes the models run (face-s: hidden 256; moe-507m:
hidden 1024), against torch's fp32 and bf16 ``F.linear`` and torch's own int8 path (``quantize_dynamic`` with
per-channel weights on the ``x86`` engine, fbgemm/oneDNN: the outside peer, the same quantisation granularity), and
the reference (exact integer sums in float64) at one shape for scale. Each contender runs in turn, repeat by repeat;
ratios are per repeat (median, min-max). GOP/s counts 2 M K N operations. Error: relative Frobenius error against
the float64 product of the float weights.

Decoding: image tokens/s of the transformer's decoding (``auto``; no image decode), float and int8 weights, fp32 and
bf16 activations, the reference loop beside them, contenders in turn repeat by repeat; agreement: the share of
image tokens int8 draws the same as float at the same dtype, prompts and seeds.

Quality (``--quality-faces N``, the embedded model): ``fastface eval``'s generation score (the judge reads the
prompted attributes in the drawn faces) for each weight format and dtype on the same N prompts and seeds, the paired
difference to float fp32 with its standard error, and the token agreement with float fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cpu_common import RESULTS, gemm_gflops, machine_info  # noqa: E402
from bench_fast_decoding import attribute_checks, paired_points  # noqa: E402

# name -> (M tokens, K in, N out): the engine's batch-4 guided step (2 x 4 rows x 258 positions) and a decode-sized M
SHAPES = {
    "face-s qkv 2064x256x768": (2064, 256, 768),
    "face-s expert 1032x256x384": (1032, 256, 384),
    "moe-507m qkv 1032x1024x3072": (1032, 1024, 3072),
    "moe-507m expert 516x1024x2048": (516, 1024, 2048),
    "moe-507m down 516x1024x1024": (516, 1024, 1024),
    "small M 8x1024x3072": (8, 1024, 3072),
}
QUICK_SHAPES = {"quick 37x70x45": (37, 70, 45), "quick 8x64x96": (8, 64, 96)}


def torch_dynamic_int8(linear: torch.nn.Linear):
    """torch's int8 linear layer: dynamic per-token activations, per-channel int8 weights (x86 engine)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm" if "fbgemm" in engines else engines[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})


def interleaved(fns: dict, *, repeats: int, min_s: float = 0.02) -> dict:
    """name -> seconds per call over ``repeats`` rounds, contenders in turn within each round; each timing loops
    enough calls to last about ``min_s``."""
    loops = {}
    for k, fn in fns.items():  # warm-up, and the calls per timing
        t0 = time.perf_counter()
        fn()
        loops[k] = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
    seconds = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(loops[k]):
                fn()
            seconds[k].append((time.perf_counter() - t0) / loops[k])
    return seconds


def ratio_stats(seconds: dict, base: str, k: str) -> dict:
    ratios = [b / s for s, b in zip(seconds[k], seconds[base])]
    return {"median": round(statistics.median(ratios), 2), "spread": [round(min(ratios), 2), round(max(ratios), 2)]}


def matmul_contenders(x, linear, *, reference: bool) -> dict:
    """name -> a call of y = x W^T + b by each contender (weights prepared beforehand, as a model holds them)."""
    from fastface import ops
    from fastface.ops.int8 import int8_linear_reference

    w, b = linear.weight.detach(), linear.bias.detach()
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    w8 = ops.quantize_int8(w)
    peer = torch_dynamic_int8(copy.deepcopy(linear))
    fns = {
        "torch fp32": lambda: F.linear(x, w, b),
        "torch bf16": lambda: F.linear(xb, wb, bb),
        "torch int8 (quantize_dynamic)": lambda: peer(x),
        "fastface int8, fp32 in": lambda: ops.int8_linear(x, w8, b, backend="cpp"),
        "fastface int8, bf16 in": lambda: ops.int8_linear(xb, w8, b, backend="cpp"),
    }
    if reference:
        fns["reference int8"] = lambda: int8_linear_reference(x, w8, b)
    return fns


def matmuls(shapes: dict, *, repeats: int, seed: int = 0) -> dict:
    out = {}
    for name, (M, K, N) in shapes.items():
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(M, K, generator=gen)
        linear = torch.nn.Linear(K, N)
        w, b = linear.weight.detach(), linear.bias.detach()
        fns = matmul_contenders(x, linear, reference=name == next(iter(shapes)))
        exact = x.double() @ w.double().t() + b.double()
        with torch.no_grad():
            seconds = interleaved(fns, repeats=repeats)
            rows = {}
            for k, fn in fns.items():
                y = fn().double()
                err = float((y - exact).norm() / exact.norm())
                t = statistics.median(seconds[k])
                rows[k] = {"ms": round(1e3 * t, 3), "gop_per_s": round(2 * M * K * N / t / 1e9, 1),
                           "vs_torch_bf16": ratio_stats(seconds, "torch bf16", k),
                           "vs_torch_int8": ratio_stats(seconds, "torch int8 (quantize_dynamic)", k),
                           "rel_error": float(f"{err:.3g}")}
        out[name] = {"M": M, "K": K, "N": N, "results": rows}
    return out


def decoding_subjects(random: bool, preset: str | None):
    """(name, float fp32 model, text encoder) of what decoding is timed on."""
    import fastface
    from fastface.config import FaceConfig
    from fastface.model import FaceTransformer

    if preset is None and not random:
        pipe = fastface.load()
        return "embedded face-s", pipe.model, pipe.encode_text
    cfg = FaceConfig.from_name(preset or "tiny")
    torch.manual_seed(0)
    model = FaceTransformer(cfg).eval()
    model.reset_parameters(0)
    return f"random {preset or 'tiny'}", model, lambda text: [9 + (ord(c) % 50) for c in text][:8]


def decoding(name, model, encode, *, dtypes, batch, steps, guidance, repeats) -> dict:
    from fastface.decoding import Decoder
    from fastface.prompts import t2i_prompt_ids
    from fastface.quantization import quantize_int8, weight_bytes

    cfg = model.config
    ids = t2i_prompt_ids([encode(f"a face number {i}") for i in range(batch)], cfg)
    seeds = list(range(batch))
    models = {}
    for dtype in dtypes:
        m = model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype))
        models[("float", dtype)] = m
        q = copy.deepcopy(m)
        quantize_int8(q)
        models[("int8", dtype)] = q
    decoders = {f"{w} {d}": Decoder(m, "auto") for (w, d), m in models.items()}
    decoders["reference loop fp32"] = Decoder(model, "reference")
    tokens = {}

    def run(k):
        tokens[k] = decoders[k].image_tokens(ids, steps=steps, guidance=guidance, seeds=seeds)

    with torch.no_grad():
        seconds = interleaved({k: (lambda k=k: run(k)) for k in decoders}, repeats=repeats, min_s=0)
    rows = {}
    for k in decoders:
        t = statistics.median(seconds[k])
        rows[k] = {"tokens_per_s": round(batch * cfg.image_tokens / t, 1),
                   "vs_reference": ratio_stats(seconds, "reference loop fp32", k),
                   "vs_float_same_dtype": (ratio_stats(seconds, k.replace("int8", "float"), k)
                                           if k.startswith("int8") else None)}
        if k.startswith("int8"):
            rows[k]["token_agreement_with_float"] = round(
                float((tokens[k] == tokens[k.replace("int8", "float")]).float().mean()), 3)
    sizes = {w: weight_bytes(models[(w, dtypes[0])])["total"] for w in ("float", "int8")}
    return {"model": name, "batch": batch, "steps": steps, "guidance": guidance, "weight_bytes": sizes,
            "results": rows}


def quality(*, faces, steps, guidance, batch, dtypes) -> dict:
    import fastface

    rows, checks, drawn = {}, {}, {}
    for dtype in dtypes:
        for weights in ("float", "int8"):
            k = f"{weights} {dtype}"
            pipe = fastface.load(dtype=dtype, weights=weights)
            checks[k], accuracy, drawn[k] = attribute_checks(pipe, {}, faces=faces, steps=steps, guidance=guidance,
                                                             batch=batch)
            rows[k] = {"accuracy": round(accuracy, 4)}
    base = f"float {dtypes[0]}"
    for k in rows:
        p = paired_points(checks[k], checks[base])
        rows[k].update(vs_base_points=p["vs_exact_points"], se_points=p["se_points"],
                       token_agreement_with_base=round(float((drawn[k] == drawn[base]).float().mean()), 3))
    return {"base": base, "faces": faces, "steps": steps, "guidance": guidance, "results": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="rounds of the matmul timings")
    p.add_argument("--decode-repeats", type=int, default=3, help="rounds of the decoding timings")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--big-preset", default="moe-507m", help="a preset timed with random weights ('' for none)")
    p.add_argument("--big-steps", type=int, default=8)
    p.add_argument("--big-batch", type=int, default=2)
    p.add_argument("--quality-faces", type=int, default=0, help="judge this many faces per weight format and dtype")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a tiny model, one round, 4 steps")
    p.add_argument("--random", action="store_true", help="a tiny random model instead of the embedded one")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON path (default: bench/results/int8-<time>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastface import backends

    dtypes = ["float32", "bfloat16"] if backends.cpu_has_bf16_matmul() else ["float32"]
    shapes = SHAPES
    if args.quick:
        shapes, args.repeats, args.decode_repeats, args.steps, args.batch, args.big_preset = (
            QUICK_SHAPES, 1, 1, 4, 2, "")
    info = machine_info()
    info["gemm_gflops"] = {"float32": round(gemm_gflops(torch.float32, n=1024, repeat=3), 1),
                           "bfloat16": round(gemm_gflops(torch.bfloat16, n=1024, repeat=3), 1)}
    report = {"machine": info, "dtypes": dtypes, "matmuls": matmuls(shapes, repeats=args.repeats), "decoding": []}
    subjects = [decoding_subjects(args.random, None)]
    if args.big_preset:
        subjects.append(decoding_subjects(True, args.big_preset))
    for i, (name, model, encode) in enumerate(subjects):
        big = i > 0
        report["decoding"].append(decoding(name, model, encode, dtypes=dtypes, batch=args.big_batch if big else
                                           args.batch, steps=args.big_steps if big else args.steps,
                                           guidance=args.guidance, repeats=args.decode_repeats))
    del subjects
    if args.quality_faces:
        report["quality"] = quality(faces=args.quality_faces, steps=args.steps, guidance=args.guidance, batch=16,
                                    dtypes=dtypes)
    print_report(report)
    if args.quick and not args.output:
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.output) if args.output else RESULTS / f"int8-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(path)
    return 0


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"{m['cpu']}; features {m.get('fastface_C_cpu_features')}; torch GEMM GFLOP/s {m['gemm_gflops']}")
    for name, case in report["matmuls"].items():
        print(f"\n{name}")
        print(f"  {'contender':<30} {'ms':>9} {'GOP/s':>8} {'x bf16':>7} {'x torch int8':>13} {'rel err':>8}")
        for k, r in case["results"].items():
            print(f"  {k:<30} {r['ms']:>9.3f} {r['gop_per_s']:>8.1f} {r['vs_torch_bf16']['median']:>6.2f}x "
                  f"{r['vs_torch_int8']['median']:>12.2f}x {r['rel_error']:>8.2g}")
    for case in report["decoding"]:
        print(f"\n{case['model']}: batch {case['batch']}, {case['steps']} steps; weights {case['weight_bytes']}")
        for k, r in case["results"].items():
            vs = r["vs_float_same_dtype"]
            extra = "" if vs is None else (f"  x float {vs['median']:.2f} ({vs['spread'][0]}-{vs['spread'][1]}), "
                                           f"agreement {r['token_agreement_with_float']:.1%}")
            print(f"  {k:<22} {r['tokens_per_s']:>8.1f} tok/s  x ref {r['vs_reference']['median']:.2f}{extra}")
    if "quality" in report:
        q = report["quality"]
        print(f"\nquality: {q['faces']} faces, vs {q['base']}")
        for k, r in q["results"].items():
            print(f"  {k:<16} accuracy {100 * r['accuracy']:.1f}%  {r['vs_base_points']:+.2f} ± {r['se_points']} pts"
                  f"  token agreement {r['token_agreement_with_base']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
