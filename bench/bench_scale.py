"""Text-to-image at real scale (random weights): Show-o's loop, fastface's reference and fastface auto side by side.

    python bench/bench_scale.py                                  # showo-256 and unif2ace-2b, batch 1 4, 16 steps
    python bench/bench_scale.py --presets showo-256 --batch 1 --steps 2     # a short run

Three implementations of the same decoding, each case in its own process (so its peak memory is its own):

- ``showo-loop`` -- Show-o's ``t2i_generate`` as its code runs it: every step a full forward over prompt and image
  for the cond and uncond rows, the LM head over the whole vocabulary at every position, then softmax,
  multinomial, confidence gather and Gumbel top-k masking with its compounding temperature (the peer);
- ``reference`` -- fastface's reference loop (``fastface.sampling.generate_image_tokens``);
- ``reference-fp32`` -- the same loop on float32 weights and activations whatever ``--dtype`` is (the baseline
  the speed targets name: "auto bf16 >= 3x the reference" is against this one);
- ``auto`` -- fastface's engine with the fastest backends here (``Decoder(model, "auto")``);
- ``auto-int8`` -- the same with int8 attention, expert and MLP weights (``fastface.quantization``; opt-in, an
  approximation: its quality is measured on the embedded model by bench/bench_int8.py).

bf16 where the CPU has bf16 dot-product or matrix instructions (AVX512-BF16, AMX), float32 otherwise. Per case:
image tokens/s over the whole decode (after a one-step warm-up), seconds, and the process's peak resident memory.
JSON (machine, CPU features, torch GEMM ceilings, versions, commit) and a plot in bench/results/scale-*.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpu_common import RESULTS, gemm_gflops, machine_info  # noqa: E402

IMPLS = ("showo-loop", "reference", "reference-fp32", "auto", "auto-int8")


def build(preset: str, dtype: torch.dtype):
    """Random weights of ``preset`` built directly in ``dtype`` (no float32 copy of the whole model)."""
    from fastface.config import FaceConfig
    from fastface.model import FaceTransformer

    cfg = FaceConfig.from_name(preset)
    with torch.device("meta"):
        model = FaceTransformer(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        model.reset_parameters(0)
        model.lm_head.weight.mul_(10)  # sharper than the init: decoding is not uniform noise
    return model.eval()


@torch.no_grad()
def showo_loop(model, prompt_ids, *, steps: int, guidance: float, seed: int, temperature: float = 1.0):
    """Show-o's t2i_generate loop over fastface's model: full forwards, full-vocabulary logits everywhere."""
    from fastface.config import GROUP_GENERATION
    from fastface.prompts import t2i_prompt_ids, t2i_sequence

    cfg = model.config
    B, N, K, off = prompt_ids.shape[0], cfg.image_tokens, cfg.codebook_size, cfg.image_token_offset
    gen = torch.Generator().manual_seed(seed)
    uncond = t2i_prompt_ids([[]], cfg).expand(B, -1)
    prompts = torch.cat([prompt_ids, uncond]) if guidance > 0 else prompt_ids
    task = torch.full((prompts.shape[0],), GROUP_GENERATION, dtype=torch.long)
    ids = torch.full((B, N), cfg.mask_token_id, dtype=torch.long)  # image ids in the unified vocabulary
    P = prompt_ids.shape[1]
    for step in range(steps):
        image = torch.cat([ids, ids]) if guidance > 0 else ids
        logits = model(t2i_sequence(prompts, image, cfg), task).logits.float()  # [R, L, V]: every position
        if guidance > 0:
            cond, unc = logits.chunk(2)
            logits = (1 + guidance) * cond - guidance * unc
        logits = logits[:, P + 1 : P + 1 + N, off : off + K]
        probs = logits.softmax(dim=-1)
        sampled = torch.multinomial(probs.reshape(-1, K), 1, generator=gen).view(B, N)
        unknown = ids == cfg.mask_token_id
        sampled = torch.where(unknown, sampled, ids - off)
        ratio = (step + 1) / steps
        mask_ratio = math.cos(math.pi / 2 * ratio)
        selected = torch.gather(probs, -1, sampled[..., None])[..., 0]
        selected = torch.where(unknown, selected, torch.finfo(selected.dtype).max)
        mask_len = torch.clamp(torch.minimum(unknown.sum(-1, keepdim=True) - 1,
                                             torch.tensor(math.floor(N * mask_ratio))), min=1)
        temperature = temperature * (1.0 - ratio)  # Show-o's compounding temperature
        u = torch.rand(B, N, generator=gen).clamp(1e-20, 1 - 1e-7)
        confidence = torch.log(selected) + temperature * -torch.log(-torch.log(u))
        cut = torch.sort(confidence, dim=-1).values.gather(1, mask_len.long())
        masking = confidence < cut
        ids = torch.where(masking, cfg.mask_token_id, sampled + off)
    return ids - off


def run_case(preset: str, impl: str, batch: int, steps: int, guidance: float, dtype_name: str) -> dict:
    """One case in this process: build, warm up one step, time the whole decode."""
    from fastface.decoding import Decoder
    from fastface.prompts import t2i_prompt_ids
    from fastface.sampling import generate_image_tokens

    if impl == "reference-fp32":
        dtype_name = "float32"
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    model = build(preset, dtype)
    build_s = time.perf_counter() - t0
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    texts = [torch.randint(8, min(1000, cfg.text_vocab_size), (12,), generator=gen).tolist() for _ in range(batch)]
    ids = t2i_prompt_ids(texts, cfg)
    seeds = list(range(batch))
    if impl == "showo-loop":
        def decode(n):
            return showo_loop(model, ids, steps=n, guidance=guidance, seed=0)
    elif impl in ("reference", "reference-fp32"):
        model.set_backend("reference")

        def decode(n):
            return generate_image_tokens(model, ids, steps=n, guidance=guidance, seeds=seeds, backend="reference")
    else:
        if impl == "auto-int8":
            from fastface.quantization import quantize_int8

            quantize_int8(model)
        decoder = Decoder(model, "auto")

        def decode(n):
            return decoder.image_tokens(ids, steps=n, guidance=guidance, seeds=seeds)
    decode(1)  # warm-up: one step
    t0 = time.perf_counter()
    tokens = decode(steps)
    seconds = time.perf_counter() - t0
    assert tokens.shape == (batch, cfg.image_tokens)
    return {"preset": preset, "impl": impl, "backend": impl, "task": "generate", "dtype": dtype_name, "batch": batch,
            "steps": steps, "guidance": guidance, "seconds": seconds, "build_s": build_s,
            "tokens_per_s": batch * cfg.image_tokens / seconds, "parameters": cfg.num_parameters(),
            "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["showo-256", "unif2ace-2b"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--guidance", type=float, default=1.75)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 where the CPU has bf16 instructions, else float32")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: preset,impl,batch
    args = p.parse_args(argv)
    if args.one:
        preset, impl, batch = args.one.split(",")
        print(json.dumps(run_case(preset, impl, int(batch), args.steps, args.guidance, args.dtype)))
        return 0

    from fastface import _C

    features = _C.cpu_features()
    dtype = args.dtype or ("bfloat16" if features.get("avx512_bf16") or features.get("amx_bf16") else "float32")
    info = machine_info()
    info["cpu_features"] = features
    info["gemm_GFLOPs"] = {"float32": gemm_gflops(torch.float32), "bfloat16": gemm_gflops(torch.bfloat16)}
    print(f"cpu features {features}; torch GEMM fp32 {info['gemm_GFLOPs']['float32']:.0f}, bf16 "
          f"{info['gemm_GFLOPs']['bfloat16']:.0f} GFLOP/s; dtype {dtype}", flush=True)
    rows = []
    for preset in args.presets:
        for batch in args.batch:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--one", f"{preset},{impl},{batch}", "--steps", str(args.steps),
                       "--guidance", str(args.guidance), "--dtype", dtype]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    rows.append({"preset": preset, "impl": impl, "batch": batch, "error": "timeout"})
                    continue
                if proc.returncode != 0:
                    rows.append({"preset": preset, "impl": impl, "batch": batch, "error": proc.stderr[-500:]})
                    print(f"{preset} {impl} b{batch}: failed: {proc.stderr[-300:]}", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{preset:12s} {impl:10s} b{batch}  {row['tokens_per_s']:8.1f} image tok/s  "
                      f"{row['seconds']:7.1f} s  peak {row['peak_rss_GiB']:5.1f} GiB", flush=True)
    for row in rows:  # each impl against the peer and both reference loops of its case
        for base_impl in ("showo-loop", "reference", "reference-fp32"):
            base = next((r for r in rows if r.get("preset") == row.get("preset") and r.get("batch") == row.get("batch")
                         and r.get("impl") == base_impl and "tokens_per_s" in r), None)
            if base is not None and "tokens_per_s" in row:
                row["x_" + base_impl.replace("-", "_")] = row["tokens_per_s"] / base["tokens_per_s"]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out) if args.out else RESULTS / f"scale-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "settings": vars(args), "dtype": dtype, "rows": rows}, indent=2) + "\n")
    from fastface.benchmark import plot

    ok = [dict(r, backend=f"{r['preset']} {r['impl']}") for r in rows if "tokens_per_s" in r]
    if ok:
        plot(ok, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
