"""Face perception throughput: images/s of the Faceptor (all six tasks, and its global tasks alone) against the
attribute classifier (the other perception model in the tree: 20 attribute heads and identity, no dense tasks), at
batch 1 and 64, float32 and bfloat16, on this CPU.

    python bench/bench_perception.py                      # the shipped models; writes bench/results/perception-*.json
    python bench/bench_perception.py --quick --random     # seconds: tiny random models (the smoke test)

Contenders of one case run in turn, repeat by repeat (A B C A B C ...), so a slow moment of the machine hits all
of them; the table reports each contender's median images/s and its ratio to the classifier per repeat (median,
min-max). There is no outside peer that runs offline here: the public face-landmark and face-recognition
packages download their weights at run time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cpu_common import RESULTS, gemm_gflops, machine_info  # noqa: E402


def contenders(random: bool, dtype: torch.dtype) -> dict:
    from fastface.perception.faceptor import Faceptor
    from fastface.perception.model import AttributeClassifier
    from fastface.perception.perceptor import Perceptor, load_perception

    if random:
        torch.manual_seed(0)
        perceptor = Perceptor(Faceptor.from_name("tiny"), dtype=dtype)
        clf = AttributeClassifier.from_name("tiny").eval()
    else:
        perceptor = load_perception(dtype=dtype)
        clf = AttributeClassifier.load()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def classifier(images):
        with torch.no_grad(), autocast:
            clf.predict_labels(images, batch_size=64)
            clf.embed(images, batch_size=64)

    return {"faceptor (6 tasks)": lambda images: perceptor.run(images),
            "faceptor (attributes + identity)": lambda images: perceptor.run(images, tasks=("attributes", "identity")),
            "attribute classifier": classifier}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--random", action="store_true", help="tiny random models instead of the shipped ones")
    p.add_argument("--quick", action="store_true", help="2 repeats of ~0.2 s")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/perception-<time>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastface.perception.train import identity_pairs

    info = machine_info()
    info["gemm_GFLOPs"] = {"float32": gemm_gflops(torch.float32), "bfloat16": gemm_gflops(torch.bfloat16)}
    print(f"cpu {info['cpu']}; features {info.get('fastface_C_cpu_features')}; torch GEMM fp32 "
          f"{info['gemm_GFLOPs']['float32']:.0f}, bf16 {info['gemm_GFLOPs']['bfloat16']:.0f} GFLOP/s; "
          f"{torch.get_num_threads()} threads", flush=True)
    faces = identity_pairs(max(args.batches) // 2 + 1, seed=7)["images"]
    repeat = 2 if args.quick else args.repeat
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = contenders(args.random, dtype)
        for batch in args.batches:
            images = np.ascontiguousarray(faces[:batch])
            # calls per timed repeat: enough for ~1 s (0.2 s quick) of the slowest contender
            t0 = time.perf_counter()
            for fn in models.values():
                fn(images)
            calls = max(1, int((0.2 if args.quick else 1.0) / max(time.perf_counter() - t0, 1e-4)))
            times = {name: [] for name in models}
            for _ in range(repeat):
                for name, fn in models.items():
                    t = time.perf_counter()
                    for _ in range(calls):
                        fn(images)
                    times[name].append((time.perf_counter() - t) / calls)
            base = times["attribute classifier"]
            for name, ts in times.items():
                ratios = [b / t for b, t in zip(base, ts)]
                row = {"model": name, "dtype": dtype_name, "batch": batch,
                       "images_per_s": batch / statistics.median(ts),
                       "seconds_per_call": statistics.median(ts), "calls_per_repeat": calls, "repeats": repeat,
                       "vs_classifier_median": statistics.median(ratios), "vs_classifier_min": min(ratios),
                       "vs_classifier_max": max(ratios)}
                rows.append(row)
                print(f"{dtype_name:9s} b{batch:<3d} {name:34s} {row['images_per_s']:9.1f} img/s  "
                      f"x{row['vs_classifier_median']:.2f} the classifier ({min(ratios):.2f}-{max(ratios):.2f})",
                      flush=True)
    result = {"benchmark": "perception", "models": "random tiny" if args.random else "shipped face-s",
              "machine": info, "rows": rows}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else RESULTS / f"perception-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
