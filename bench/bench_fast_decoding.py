"""Faster-than-exact image decoding: speed and quality of each opt-in option against exact decoding, in one run.

    python bench/bench_fast_decoding.py                     # embedded model, speed at batch 16; bench/results/
    python bench/bench_fast_decoding.py --quality-faces 200 # also the judge's accuracy on 200 generated faces each
    python bench/bench_fast_decoding.py --quick --random    # seconds: a tiny random model (the smoke test)
    python bench/bench_fast_decoding.py --contenders "int8 weights" --quality-faces 200   # exact and int8 only

Contenders: exact decoding (the engine, ``auto``), the reference loop (for scale), and the opt-in options of
``Pipeline.generate_tokens``: ``guidance_steps`` (guidance on the first k steps only), ``uncond_refresh`` (the
unconditional pass every r guided steps, its last logits guiding the steps between), ``kv_refresh`` (the whole image
every r steps, only the still-masked positions in between, other keys/values reused), combinations, and confidence-
threshold decoding; and int8 weights (``fastface.quantization``), alone and with those options. Speed: image
tokens/s of the transformer's decoding (no image decode), contenders in turn repeat by repeat (A B C ...), each
one's ratio to exact per repeat (median, min-max). Work: the share of exact decoding's transformer positions a
contender ran. Quality (``--quality-faces N``): ``fastface eval``'s generation score (the judge reads the prompted
attributes in the drawn faces) on the same N prompts and seeds for every contender, with the paired difference to
exact and its standard error over prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cpu_common import RESULTS, gemm_gflops, machine_info  # noqa: E402

# name -> generate_tokens options (None: the reference loop)
CONTENDERS = {
    "exact": {},
    "reference loop": None,
    "kv refresh every 4": dict(kv_refresh=4),
    "uncond every 2 steps": dict(uncond_refresh=2),
    "guidance 8 of 16 steps": dict(guidance_steps=8),
    "uncond 2 + kv refresh 4": dict(uncond_refresh=2, kv_refresh=4),
    "uncond 3 + kv refresh 3": dict(uncond_refresh=3, kv_refresh=3),
    "threshold 0.9": dict(threshold=0.9),
    # int8 weights (fastface.quantization) alone and with the decoding options: "weights" picks the model
    "int8 weights": dict(weights="int8"),
    "int8 + uncond every 2 steps": dict(weights="int8", uncond_refresh=2),
    "int8 + guidance 8 of 16 steps": dict(weights="int8", guidance_steps=8),
    "int8 + uncond 3 + kv refresh 3": dict(weights="int8", uncond_refresh=3, kv_refresh=3),
}


def split(options):
    """Contender options -> (weight format, generate_tokens options)."""
    options = dict(options)
    return options.pop("weights", "float"), options


def subject(random: bool, dtype: str = "float32", weights: str = "float"):
    import fastface

    if not random:
        return fastface.load(dtype=dtype, weights=weights)
    from fastface.config import FaceConfig
    from fastface.model import FaceTransformer
    from fastface.pipeline import Pipeline
    from fastface.quantization import quantize_int8
    from fastface.tokenizer import build_text_tokenizer

    cfg = FaceConfig.from_name("tiny")
    model = FaceTransformer(cfg).eval()
    model.reset_parameters(0)
    model = model.to(getattr(torch, dtype))
    if weights == "int8":
        quantize_int8(model)
    return Pipeline(model, build_text_tokenizer([f"w{i}" for i in range(cfg.text_vocab_size - 8)]))


def speed(pipes, contenders, *, batch, steps, guidance, repeats):
    """name -> {tokens_per_s, vs_exact, ratio_spread, work}; ``pipes``: weight format -> Pipeline."""
    from fastface.decoding import Decoder
    from fastface.prompts import t2i_prompt_ids

    pipe = pipes["float"]
    cfg = pipe.config
    prompts = [f"a face number {i}" for i in range(batch)]
    ids = t2i_prompt_ids([pipe.encode_text(p) for p in prompts], cfg)
    engines = {w: Decoder(p.model, "auto") for w, p in pipes.items()}
    reference = Decoder(pipe.model, "reference")
    exact_positions = batch * (2 if guidance else 1) * steps * (cfg.image_tokens + 2)

    def run(options):
        weights, rest = split(options or {})
        decoder = reference if options is None else engines[weights]
        decoder.image_tokens(ids, steps=steps, guidance=guidance, seeds=list(range(batch)), **rest)
        stats = decoder.last_stats
        return None if stats is None or options is None else stats.positions_run / exact_positions

    work = {k: run(o) for k, o in contenders.items()}  # warm-up, and the work each does
    seconds = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, o in contenders.items():
            t0 = time.perf_counter()
            run(o)
            seconds[k].append(time.perf_counter() - t0)
    out = {}
    for k in contenders:
        ratios = [e / s for s, e in zip(seconds[k], seconds["exact"])]
        out[k] = {"tokens_per_s": round(batch * cfg.image_tokens / statistics.median(seconds[k]), 1),
                  "vs_exact": round(statistics.median(ratios), 2),
                  "ratio_spread": [round(min(ratios), 2), round(max(ratios), 2)],
                  "work": None if work[k] is None else round(work[k], 3)}
    return out


def attribute_checks(pipe, options, *, faces, steps, guidance, batch):
    """``fastface eval``'s generation score for one way of drawing: the judge reads the prompted attributes in faces
    drawn from ``faces`` held-out prompts (fixed prompts and seeds). Returns (correct [checks] float64 -- one entry
    per prompted attribute, in a fixed order, so two ways of drawing pair up --, mean accuracy, tokens)."""
    from fastface.evaluate import DEFAULT_SEED, attribute_prompts
    from fastface.perception import IGNORE
    from fastface.perception.judge import Judge
    from fastface.perception.train import accuracy_table, held_out_faces, mean_accuracy

    held = held_out_faces(faces, DEFAULT_SEED)
    prompts, labels = attribute_prompts(held["attrs"], seed=DEFAULT_SEED, max_words=pipe.config.max_text_len - 3)
    chunks = [pipe.generate_tokens(prompts[i : i + batch], steps=steps, guidance=guidance, seed=DEFAULT_SEED + i,
                                   **options) for i in range(0, len(prompts), batch)]
    tokens = torch.cat(chunks)
    images = pipe.decode_images(tokens)
    pred = Judge.default().predict_labels(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    correct = (pred == labels)[labels != IGNORE].astype(np.float64)
    return correct, float(mean_accuracy(accuracy_table(pred, labels))), tokens


def paired_points(correct: np.ndarray, base: np.ndarray) -> dict:
    """The paired difference of two ``attribute_checks`` in accuracy points, with its standard error."""
    diff = correct - base
    se = 100 * float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
    return {"vs_exact_points": round(100 * float(diff.mean()), 2), "se_points": None if se is None else round(se, 2)}


def quality(pipes, contenders, *, faces, steps, guidance, batch):
    """name -> the judge's mean accuracy over prompted attributes (``fastface eval``'s generation score), and the
    paired difference to exact over the same attribute checks, with its standard error."""
    correct, out = {}, {}
    for k, options in contenders.items():
        if options is None:
            continue  # the reference loop draws exact decoding's tokens
        weights, rest = split(options)
        correct[k], accuracy, _ = attribute_checks(pipes[weights], rest, faces=faces, steps=steps,
                                                   guidance=guidance, batch=batch)
        out[k] = {"accuracy": round(accuracy, 4)}
    for k, c in correct.items():
        out[k].update(paired_points(c, correct["exact"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quality-faces", type=int, default=0, help="judge this many generated faces per contender")
    p.add_argument("--quick", action="store_true", help="batch 2, 4 steps, one repeat")
    p.add_argument("--random", action="store_true", help="a tiny random model instead of the embedded one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every contender's dtype")
    p.add_argument("--contenders", nargs="+", default=None, choices=list(CONTENDERS), metavar="NAME",
                   help="only these (exact is always run: the others are measured against it)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON path (default: bench/results/fast-decoding-<time>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contenders = dict(CONTENDERS)
    if args.contenders:
        contenders = {k: o for k, o in CONTENDERS.items() if k == "exact" or k in args.contenders}
    if args.quick:
        args.batch, args.steps, args.repeats = 2, 4, 1
        contenders = {"exact": {}, "reference loop": None, "guidance 2 of 4 steps": dict(guidance_steps=2),
                      "kv refresh every 2": dict(kv_refresh=2), "int8 weights": dict(weights="int8")}
    torch.manual_seed(0)
    formats = {split(o)[0] for o in contenders.values() if o is not None}
    pipes = {w: subject(args.random, args.dtype, w) for w in ["float", *sorted(formats - {"float"})]}
    info = machine_info()
    info["gemm_gflops"] = {"float32": round(gemm_gflops(torch.float32, n=1024, repeat=3), 1),
                           "bfloat16": round(gemm_gflops(torch.bfloat16, n=1024, repeat=3), 1)}
    with torch.no_grad():
        rows = speed(pipes, contenders, batch=args.batch, steps=args.steps, guidance=args.guidance,
                     repeats=args.repeats)
        if args.quality_faces:
            for k, q in quality(pipes, contenders, faces=args.quality_faces, steps=args.steps,
                                guidance=args.guidance, batch=args.batch).items():
                rows[k].update(q)
    print(f"{'contender':<28} {'tokens/s':>9} {'x exact':>8} {'spread':>11} {'work':>6} {'accuracy':>9} {'pts':>7}")
    for k, r in rows.items():
        work = "" if r["work"] is None else f"{r['work']:.0%}"
        acc = f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else ""
        pts = f"{r['vs_exact_points']:+.1f}±{r['se_points']}" if r.get("se_points") is not None else ""
        print(f"{k:<28} {r['tokens_per_s']:>9.1f} {r['vs_exact']:>7.2f}x {r['ratio_spread'][0]:>5}-"
              f"{r['ratio_spread'][1]:<5} {work:>6} {acc:>9} {pts:>7}")
    if args.quick and not args.output:
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.output) if args.output else RESULTS / f"fast-decoding-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "model": "tiny random" if args.random else "embedded face-s",
                                "dtype": args.dtype, "batch": args.batch, "steps": args.steps,
                                "guidance": args.guidance,
                                "quality_faces": args.quality_faces, "results": rows}, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
