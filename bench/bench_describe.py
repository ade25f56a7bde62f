"""Captioning throughput: text tokens/s of image-to-text by masked diffusion (the caption block decoded in parallel)
against autoregressive captioning, engine against the reference loops, on one model, in one run.

    python bench/bench_describe.py                        # the embedded model; writes bench/results/describe-*.json
    python bench/bench_describe.py --quick --random       # seconds: a tiny random model (the smoke test)

Cases: batch 1 and 16 (--batches), diffusion at 4, 8 and 16 steps (--steps) and autoregressive (greedy, up to the
block's length). Tokens counted are the captions' tokens and their <eos> (what a reader gets), so a decoder that
stops early is not credited for padding. The image encoding and the understanding embeddings are done once before
timing (the same for every contender). Contenders of one case run in turn, repeat by repeat (A B C ...), and the
table gives each one's median tokens/s and its ratio to the reference autoregressive loop per repeat (median,
min-max). No outside peer runs offline here (masked-diffusion language models such as LLaDA need their weights
downloaded), so the peers are the reference loops of the same algorithms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cpu_common import RESULTS, gemm_gflops, machine_info  # noqa: E402


def subject(random: bool):
    """(pipeline, image ids [16, N], e_sem, e_id) of the embedded model on held-out faces, or of a tiny random one."""
    import fastface
    from fastface.pipeline import Pipeline

    if random:
        from fastface.config import FaceConfig
        from fastface.model import FaceTransformer
        from fastface.tokenizer import build_text_tokenizer

        cfg = FaceConfig.from_name("tiny")
        model = FaceTransformer(cfg)
        model.reset_parameters(0)
        tok = build_text_tokenizer([f"w{i}" for i in range(cfg.text_vocab_size - 8)])
        pipe = Pipeline(model, tok)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.codebook_size, (16, cfg.image_tokens), generator=gen)
        return pipe, ids, None, None
    from fastface.data.dataset import make_dataset

    pipe = fastface.load()
    faces = make_dataset(16, seed=10_000, captions=False)
    images = list(faces["images"])
    e_sem, e_id = pipe.understanding_embeddings(images)
    return pipe, pipe.encode_images(images), e_sem, e_id


def contenders(pipe, ids, e_sem, e_id, steps_list, max_new):
    """name -> fn(batch) returning the captions' token count."""
    from fastface.data.text import CAPTION_QUESTION
    from fastface.decoding import Decoder
    from fastface.prompts import block_text, mmu_prompt_ids

    cfg = pipe.config
    q = pipe.encode_text(CAPTION_QUESTION)
    decoders = {"reference": Decoder(pipe.model, "reference"), "engine": Decoder(pipe.model, "auto")}

    def rows(b):
        return (None if e_sem is None else e_sem[:b]), (None if e_id is None else e_id[:b])

    def diffusion(decoder, steps):
        def fn(b):
            es, ei = rows(b)
            blocks = decoder.describe_ids(ids[:b], steps=steps, seeds=list(range(b)), sample_temperature=0.3,
                                          confidence_temperature=0.0, e_sem=es, e_id=ei)
            return sum(len(block_text(x, cfg)) + 1 for x in blocks.tolist())
        return fn

    def autoregressive(decoder):
        def fn(b):
            es, ei = rows(b)
            prompt = mmu_prompt_ids(ids[:b], [q] * b, cfg)
            answers = decoder.answer_ids(prompt, max_new_tokens=max_new, allowed_vocab=cfg.text_vocab_size,
                                         e_sem=es, e_id=ei)
            return sum(len(a) + 1 for a in answers)
        return fn

    out = {}
    for name, decoder in decoders.items():
        for s in steps_list:
            out[f"{name} diffusion-{s}"] = diffusion(decoder, s)
        out[f"{name} autoregressive"] = autoregressive(decoder)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one repeat, batch 1 and 4, steps 2 and 4")
    p.add_argument("--random", action="store_true", help="a tiny random model instead of the embedded one")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON path (default: bench/results/describe-<time>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.steps, args.repeats = [1, 4], [2, 4], 1
    torch.manual_seed(0)
    pipe, ids, e_sem, e_id = subject(args.random)
    from fastface.prompts import text_block_length

    fns = contenders(pipe, ids, e_sem, e_id, args.steps, text_block_length(pipe.config) - 1)
    info = machine_info()
    info["gemm_gflops"] = {"float32": round(gemm_gflops(torch.float32, n=1024, repeat=3), 1),
                           "bfloat16": round(gemm_gflops(torch.bfloat16, n=1024, repeat=3), 1)}
    results = []
    with torch.no_grad():
        for b in args.batches:
            for fn in fns.values():  # warm-up: buffers, first-call costs
                fn(b)
            seconds = {k: [] for k in fns}
            tokens = {}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    tokens[k] = fn(b)
                    seconds[k].append(time.perf_counter() - t0)
            base = "reference autoregressive"
            for k in fns:
                ratios = [(tokens[k] / s) / (tokens[base] / sb) for s, sb in zip(seconds[k], seconds[base])]
                med = statistics.median(seconds[k])
                results.append({"batch": b, "contender": k, "tokens": tokens[k], "median_s": round(med, 4),
                                "tokens_per_s": round(tokens[k] / med, 1),
                                "vs_reference_autoregressive": round(statistics.median(ratios), 2),
                                "ratio_spread": [round(min(ratios), 2), round(max(ratios), 2)]})
    print(f"{'batch':>5}  {'contender':<32} {'tokens':>6} {'tokens/s':>9} {'x ref AR':>9}")
    for r in results:
        print(f"{r['batch']:>5}  {r['contender']:<32} {r['tokens']:>6} {r['tokens_per_s']:>9.1f} "
              f"{r['vs_reference_autoregressive']:>8.2f}x  [{r['ratio_spread'][0]}-{r['ratio_spread'][1]}]")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.output) if args.output else RESULTS / f"describe-{stamp}.json"
    if args.quick and not args.output:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    import json

    path.write_text(json.dumps({"machine": info, "model": "tiny random" if args.random else "embedded face-s",
                                "results": results}, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
