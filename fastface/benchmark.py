"""End-to-end throughput: image tokens per second (generation) and text tokens per second (answering).

    fastface bench                                   # face-s shape, batch 1/4/16, 16 steps, guidance 2
    fastface bench --batch 4 --json out.json --plot out.png

Every case runs in one process, the reference included, so ratios are comparable even on a busy machine: each
contender is warmed up, then the contenders of one task and batch are timed in turn, repeat by repeat (A B A B
...), ``--repeats`` times; speed-ups are the median of the per-repeat ratios with their spread. The JSON holds
every run's seconds, their median and spread (min, max), tokens per second, latency per request, a time
breakdown of the engine (attention, MoE, LM head, sampler, …) and the machine (CPU, threads, load average,
versions, git commit, time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastface.checks import FLOAT_DTYPES
from fastface.config import PRESETS, FaceConfig


@dataclass
class Subject:
    """What is benchmarked: a model (one per dtype), its prompts and, when there is one, its image tokenizer."""

    models: dict  # dtype name -> FaceTransformer
    config: FaceConfig
    image_tokenizer: object | None
    tokenizer: object | None
    source: str


def load_subject(model_path: str | None, preset: str | None, dtypes) -> Subject:
    """Random weights of ``preset`` when one is named; else the checkpoint at ``model_path``, else the embedded
    model, else random weights of face-s. Naming both a checkpoint and a preset is an error."""
    from fastface.checkpoint import load_checkpoint
    from fastface.model import FaceTransformer
    from fastface.pipeline import DEFAULT_MODEL

    if model_path is not None and preset is not None:
        raise ValueError(f"give a checkpoint (--model {model_path}) or a preset (--preset {preset}), not both")
    path = None
    if preset is None:
        path = Path(model_path) if model_path else (DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").is_file()
                                                    else None)
        preset = "face-s"
    models = {}
    if path is not None:
        model, tokenizer, image_tokenizer, _ = load_checkpoint(path)
        source = str(path)
        config = model.config
    else:
        config = FaceConfig.from_name(preset)
        model = FaceTransformer(config)
        model.reset_parameters(0)
        with torch.no_grad():  # random weights: sharpen the head so decoding is not uniform noise
            model.lm_head.weight.mul_(10)
        tokenizer = image_tokenizer = None
        source = f"random weights, preset {preset}"
    model.eval()
    for d in dtypes:
        models[d] = model if d == "float32" else _copy_as(model, d)
    return Subject(models, config, image_tokenizer, tokenizer, source)


def _model_for(subject: Subject, backend: str, dtype: str, weights: str = "float"):
    """The model a (backend, dtype, weights) contender runs, as the pipeline would load it
    (``backends.math_dtype``): for bfloat16 weights that run float32 math, the bf16 weights upcast; for int8
    weights, that model quantised (``fastface.quantization``). Each made once."""
    from fastface import backends

    if weights == "int8":
        key = f"{dtype}-{backend}-int8"
        if key not in subject.models:
            import copy

            from fastface.quantization import quantize_int8

            model = copy.deepcopy(_model_for(subject, backend, dtype))
            quantize_int8(model)
            subject.models[key] = model
        return subject.models[key]
    if backends.math_dtype(dtype, backend) == dtype:
        return subject.models[dtype]
    key = f"{dtype}-as-float32"
    if key not in subject.models:
        subject.models[key] = _copy_as(subject.models[dtype], "float32")
    return subject.models[key]


def _copy_as(model, dtype_name):
    import copy

    return copy.deepcopy(model).to(getattr(torch, dtype_name)).eval()


def prompt_ids(config: FaceConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, P] t2i prompts of 6..14 random words (the face-world captions' length range, capped to fit P)."""
    from fastface.prompts import t2i_prompt_ids

    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(batch):
        n = min(int(torch.randint(6, 15, (1,), generator=gen)), config.max_text_len - 3)
        texts.append(torch.randint(8, config.text_vocab_size, (n,), generator=gen).tolist())
    return t2i_prompt_ids(texts, config)


def question_ids(config: FaceConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, L] left-padded mmu prompts: random images and questions of 3..7 words."""
    from fastface.prompts import mmu_prompt_ids

    gen = torch.Generator().manual_seed(seed + 1)
    img = torch.randint(0, config.codebook_size, (batch, config.image_tokens), generator=gen)
    qs = [torch.randint(8, config.text_vocab_size, (int(torch.randint(3, 8, (1,), generator=gen)),),
                        generator=gen).tolist() for _ in range(batch)]
    return mmu_prompt_ids(img, qs, config)


# ------------------------------------------------------------------------------------------------ work

def generate_flops(config: FaceConfig, batch: int, steps: int, guidance: float) -> dict[str, int]:
    """Matrix-multiply FLOPs (2 per multiply-add) of one exact text-to-image generation by the engine.

    The engine's work, not a full forward per step: the conditional prompts are prefilled once (the
    unconditional prefix is cached per model), every step runs the image segment (``<soi>``, N image tokens,
    ``<eoi>``) of every row (cond and uncond when guided) through every layer, attending to the whole sequence,
    and the LM head over the codebook columns at the still-masked positions only. MoE layers count their routed
    experts (top-k per token), shared experts and router; dense layers their MLP. Norms, rotary, softmax and the
    sampler are left out: they are not matmuls. Parts: ``prefill``, ``projections`` (q, k, v, out), ``mlp``,
    ``attention`` (scores and values), ``head``, and ``total``.
    """
    from fastface.ops.masked_decode import scheduled_mask_len

    cfg, H = config, config.hidden_size
    rows = batch * (2 if guidance else 1)
    N, P = cfg.image_tokens, cfg.max_text_len
    segment = N + 2
    proj = 2 * 4 * H * H
    if cfg.mlp == "moe":
        mlp = 2 * 3 * H * (cfg.top_k * cfg.expert_ffn_size + cfg.num_shared_experts * cfg.shared_ffn_size)
        mlp += 2 * H * cfg.num_experts  # router
    else:
        mlp = 2 * (3 if cfg.mlp_activation == "swiglu" else 2) * H * cfg.dense_ffn_size
    keys = P + segment
    masked, heads = N, 0
    for step in range(steps):  # the head reads the positions still masked at each step
        heads += masked
        masked = int(scheduled_mask_len(N, torch.tensor([masked]), step, steps)[0])
    L = cfg.num_layers
    parts = {
        "prefill": batch * P * L * (proj + mlp),
        "projections": steps * rows * segment * L * proj,
        "mlp": steps * rows * segment * L * mlp,
        "attention": steps * rows * segment * L * 2 * 2 * keys * H,
        "head": rows * heads * 2 * H * cfg.codebook_size,
    }
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------------ runners


def _generate(model, backend, ids, steps, guidance, seeds, timers=None, threshold=None):
    return _decoder(model, backend).image_tokens(ids, steps=steps, guidance=guidance, seeds=seeds, timers=timers,
                                                 threshold=threshold)


def _answer(model, backend, ids, max_new, timers=None):
    return _decoder(model, backend).answer_ids(ids, max_new_tokens=max_new,
                                               allowed_vocab=model.config.text_vocab_size, timers=timers)


_DECODERS: dict = {}


def _decoder(model, backend):
    """One ``Decoder`` per (model, backend): the same choice of loop as the pipeline's, engines kept warm."""
    from fastface.decoding import Decoder

    key = (id(model), backend)
    if key not in _DECODERS:
        _DECODERS[key] = Decoder(model, backend)
    return _DECODERS[key]


def _time_in_turn(fns: dict, repeats: int) -> dict[object, list[float]]:
    """Time every contender of one case in turn, repeat by repeat (A B C A B C ...): a slow moment of a noisy
    machine lands on all of them, and repeat i of every contender is comparable with repeat i of the others."""
    out = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[key].append(time.perf_counter() - t0)
    return out


def _summary(seconds: list[float], tokens: int) -> dict:
    med = statistics.median(seconds)
    return dict(seconds=[round(s, 5) for s in seconds], median_s=round(med, 5), min_s=round(min(seconds), 5),
                max_s=round(max(seconds), 5), tokens=tokens, tokens_per_s=round(tokens / med, 2),
                tokens_per_s_spread=[round(tokens / max(seconds), 2), round(tokens / min(seconds), 2)])


def usable_backends(requested) -> list[str]:
    """The requested backends that run here (triton only on CUDA or under TRITON_INTERPRET=1; the interpreter is
    a correctness tool, too slow to benchmark, so triton is dropped on the CPU)."""
    from fastface import backends

    out = []
    for b in requested:
        if b == "triton" and not (torch.cuda.is_available() and backends.triton_usable("cuda")):
            continue
        if b == "cpp" and not backends.available("grouped_moe", "cpp", "cpu"):
            continue
        out.append(b)
    return out


def contenders_of(backends_, dtypes, weights=("float",), reference_dtypes=("float32",)) -> list[tuple]:
    """The (backend, dtype, weights) contenders of a case: the reference in float32 with float weights only."""
    return [(backend, dtype, w) for backend in backends_ for dtype in dtypes for w in weights
            if not (backend == "reference" and (dtype not in reference_dtypes or w != "float"))]


def run_cases(subject: Subject, *, backends_, dtypes, batches, steps, guidance, repeats, warmup, answer=True,
              breakdown=True, reference_dtypes=("float32",), progress=None, weights=("float",)) -> list[dict]:
    """Every (task, backend, dtype, weights, batch) case: a list of result dicts.

    The contenders of one (task, batch) -- every backend, dtype and weight format -- are timed in turn, repeat by
    repeat, and each one's speed-up over the float32 reference is the median of the per-repeat ratios, with their
    spread.
    """
    cfg = subject.config
    contenders = contenders_of(backends_, dtypes, weights, reference_dtypes)
    results = []
    for batch in batches:
        ids, seeds = prompt_ids(cfg, batch), list(range(batch))
        holders, gens = {}, {}
        for c in contenders:
            model = _model_for(subject, *c)
            for _ in range(warmup):
                _generate(model, c[0], ids, min(steps, 2), guidance, seeds)
            holders[c] = holder = {}

            def gen(model=model, backend=c[0], holder=holder, ids=ids, seeds=seeds):
                holder["tokens"] = _generate(model, backend, ids, steps, guidance, seeds)

            gens[c] = gen
        times = _time_in_turn(gens, repeats)
        rows = []
        for (backend, dtype, w), secs in times.items():
            model = _model_for(subject, backend, dtype, w)
            row = dict(task="generate", backend=backend, dtype=dtype, weights=w, batch=batch, steps=steps,
                       guidance=guidance, math_dtype=str(model.dtype).removeprefix("torch."),
                       **_summary(secs, batch * cfg.image_tokens))
            row["latency_per_request_s"] = row["median_s"]  # a batch's requests finish together
            row["gflop"] = generate_flops(cfg, batch, steps, guidance)["total"] / 1e9
            if breakdown and backend != "reference":
                row["breakdown_s"] = _generate_breakdown(subject, model, backend, ids, steps, guidance, seeds,
                                                         holders[backend, dtype, w]["tokens"])
            rows.append(row)
        if answer:
            qids, max_new = question_ids(cfg, batch), cfg.max_answer_len
            outs, answers = {}, {}
            for c in contenders:
                model = _model_for(subject, *c)
                for _ in range(warmup):
                    _answer(model, c[0], qids, max_new)
                outs[c] = out = {}

                def ans(model=model, backend=c[0], out=out, qids=qids, max_new=max_new):
                    out["a"] = _answer(model, backend, qids, max_new)

                answers[c] = ans
            times = _time_in_turn(answers, repeats)
            for (backend, dtype, w), secs in times.items():
                produced = sum(len(a) for a in outs[backend, dtype, w]["a"])
                row = dict(task="answer", backend=backend, dtype=dtype, weights=w, batch=batch,
                           max_new_tokens=max_new, prompt_tokens=int(qids.numel()), **_summary(secs, max(produced, 1)))
                row["latency_per_request_s"] = row["median_s"]
                if breakdown and backend != "reference":
                    from fastface.profiling import Timers

                    timers = Timers()
                    _answer(_model_for(subject, backend, dtype, w), backend, qids, max_new, timers=timers)
                    row["breakdown_s"] = {k: round(v, 5) for k, v in timers.seconds.items()}
                rows.append(row)
        _add_speedups(rows)
        for row in rows:
            results.append(row)
            if progress:
                progress(row)
    return results


def _generate_breakdown(subject, model, backend, ids, steps, guidance, seeds, tokens) -> dict:
    """Seconds per engine section of one more generation (and the image tokenizer's decode)."""
    from fastface.profiling import Timers

    timers = Timers()
    t0 = time.perf_counter()
    _generate(model, backend, ids, steps, guidance, seeds, timers=timers)
    total = time.perf_counter() - t0
    parts = dict(timers.seconds)
    if subject.image_tokenizer is not None:
        t1 = time.perf_counter()
        with torch.no_grad():
            subject.image_tokenizer.decode(tokens)
        parts["tokenizer_decode"] = time.perf_counter() - t1
        total += parts["tokenizer_decode"]
    parts["other"] = max(0.0, total - sum(parts.values()))
    return {k: round(v, 5) for k, v in parts.items()}


def _add_speedups(rows):
    """Per row, the float32 reference's seconds over the row's, repeat by repeat (the repeats were run in turn):
    ``speedup_vs_reference`` is their median, ``speedup_spread`` their (min, max)."""
    ref = {r["task"]: r["seconds"] for r in rows if r["backend"] == "reference" and r["dtype"] == "float32"
           and r.get("weights", "float") == "float"}
    for r in rows:
        base = ref.get(r["task"])
        if base:
            ratios = [b / max(s, 1e-12) for b, s in zip(base, r["seconds"])]
            r["speedup_vs_reference"] = round(statistics.median(ratios), 2)
            r["speedup_spread"] = [round(min(ratios), 2), round(max(ratios), 2)]


def threshold_study(subject: Subject, *, backend, dtype, batch, steps, guidance, thresholds) -> list[dict]:
    """Confidence-threshold decoding: forward passes run and token agreement with the scheduled decoder."""
    model = _model_for(subject, backend, dtype)
    ids = prompt_ids(subject.config, batch)
    seeds = list(range(batch))
    base = _generate(model, backend, ids, steps, guidance, seeds)
    rows = []
    for thr in thresholds:
        ran = []  # one entry per forward pass actually run
        t0 = time.perf_counter()
        tokens = _decoder(model, backend).image_tokens(ids, steps=steps, guidance=guidance, seeds=seeds,
                                                       threshold=thr, callback=lambda *_, ran=ran: ran.append(1))
        secs = time.perf_counter() - t0
        run = len(ran)
        rows.append(dict(threshold=thr, steps=steps, steps_run=run, steps_saved=steps - run, seconds=round(secs, 4),
                         token_agreement_with_schedule=round(float((tokens == base).float().mean()), 4)))
    return rows


def bf16_agreement(subject: Subject, *, backend, batch, steps, guidance) -> dict:
    """Token agreement of the bfloat16 engine with the float32 engine (same prompts and seeds)."""
    ids = prompt_ids(subject.config, batch)
    seeds = list(range(batch))
    a = _generate(_model_for(subject, backend, "float32"), backend, ids, steps, guidance, seeds)
    b = _generate(_model_for(subject, backend, "bfloat16"), backend, ids, steps, guidance, seeds)
    return dict(batch=batch, steps=steps, token_agreement=round(float((a == b).float().mean()), 4))


# ------------------------------------------------------------------------------------------------ reports


def machine_info() -> dict:
    import numpy

    import fastface

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = dict(time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), platform=platform.platform(),
                python=platform.python_version(), cpu=cpu, cpu_count=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), numpy=numpy.__version__, fastface=fastface.__version__,
                git_commit=commit, cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    try:
        from fastface import _C

        info["cpu_features"] = _C.cpu_features()
    except ImportError:
        info["cpu_features"] = "fastface._C not built"
    info["gemm_gflops"] = {str(dtype).removeprefix("torch."): round(gemm_gflops(dtype), 1) for dtype in FLOAT_DTYPES}
    return info


def gemm_gflops(dtype: torch.dtype, n: int = 1024, repeat: int = 3) -> float:
    """torch.matmul throughput of an n x n x n GEMM in ``dtype`` (best of ``repeat``): this machine's ceiling."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def label(row: dict) -> str:
    """'backend dtype', with ' int8' for int8 weights."""
    w = row.get("weights", "float")
    return f"{row['backend']} {row['dtype']}" + ("" if w == "float" else f" {w}")


def format_table(results: list[dict]) -> str:
    lines = [f"{'task':9} {'backend':10} {'dtype':9} {'weights':7} {'batch':>5} {'tokens/s':>10} {'spread':>17} "
             f"{'latency s':>10} {'x ref':>6} {'x ref spread':>13}"]
    for r in results:
        lo, hi = r["tokens_per_s_spread"]
        s_lo, s_hi = r.get("speedup_spread", (float("nan"), float("nan")))
        lines.append(f"{r['task']:9} {r['backend']:10} {r['dtype']:9} {r.get('weights', 'float'):7} {r['batch']:>5} "
                     f"{r['tokens_per_s']:>10.1f} "
                     f"{f'{lo:.1f}-{hi:.1f}':>17} {r['latency_per_request_s']:>10.3f} "
                     f"{r.get('speedup_vs_reference', float('nan')):>6.2f} {f'{s_lo:.2f}-{s_hi:.2f}':>13}")
    return "\n".join(lines)


def plot(results: list[dict], path, task: str = "generate"):
    """tokens/s against batch, one line per (backend, dtype, weights); matplotlib if installed, else PIL."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r["task"] == task:
            series.setdefault(label(r), []).append((r["batch"], r["tokens_per_s"]))
    for pts in series.values():
        pts.sort()
    unit = "image tokens/s" if task == "generate" else "text tokens/s"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(series, path, unit)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, pts in series.items():
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _plot_pil(series, path, unit):
    import math

    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 720, 480, 80, 190, 30, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    batches = sorted({b for pts in series.values() for b, _ in pts}) or [1]
    vmax = max([v for pts in series.values() for _, v in pts] + [1.0])
    xs = [math.log2(b) for b in batches]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(b, v):
        x = left + (math.log2(b) - x0) / (x1 - x0) * (W - left - right)
        y = H - bottom - v / (vmax * 1.1) * (H - top - bottom)
        return x, y

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(6):  # y grid and labels
        v = vmax * 1.1 * i / 5
        _, y = px(batches[0], v)
        d.line([left, y, W - right, y], fill=(225, 225, 225))
        d.text((5, y - 6), f"{v:.0f}", fill="black")
    for b in batches:
        x, _ = px(b, 0)
        d.text((x - 4, H - bottom + 6), str(b), fill="black")
    d.text(((W - right + left) // 2 - 15, H - bottom + 26), "batch", fill="black")
    d.text((5, 8), unit, fill="black")
    for k, (name, pts) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        coords = [px(b, v) for b, v in pts]
        if len(coords) > 1:
            d.line(coords, fill=color, width=2)
        for x, y in coords:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.line([W - right + 12, top + 10 + 18 * k, W - right + 32, top + 10 + 18 * k], fill=color, width=3)
        d.text((W - right + 38, top + 4 + 18 * k), name, fill="black")
    img.save(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------------- cli


def add_arguments(p: argparse.ArgumentParser):
    from fastface.backends import CHOICES
    from fastface.checks import (
        DTYPE_NAMES,
        WEIGHT_FORMATS,
        arg_finite_float,
        arg_nonnegative_int,
        arg_positive_int,
        arg_probability,
    )

    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model if installed, "
                   "else random weights of face-s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="benchmark random weights of this model shape instead of a checkpoint")
    p.add_argument("--batch", type=arg_positive_int, nargs="+", default=[1, 4, 16],
                   help="batch sizes (default: 1 4 16)")
    p.add_argument("--steps", type=arg_positive_int, default=16, help="decoding steps per image (default: 16)")
    p.add_argument("--guidance", type=arg_finite_float, default=2.0,
                   help="classifier-free guidance weight (default: 2.0)")
    p.add_argument("--backends", nargs="+", default=["reference", "auto"],
                   choices=list(CHOICES),
                   help="backends to compare (default: reference auto); unusable ones are skipped")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPE_NAMES),
                   help="transformer precisions (default: float32 bfloat16; the reference runs in float32)")
    p.add_argument("--weights", nargs="+", default=["float"], choices=list(WEIGHT_FORMATS),
                   help="weight formats of the engine backends: float, int8 (fastface.quantization; opt-in, an "
                   "approximation) (default: float; the reference runs float weights)")
    p.add_argument("--repeats", type=arg_positive_int, default=3, help="timed runs per case (default: 3)")
    p.add_argument("--warmup", type=arg_nonnegative_int, default=1,
                   help="untimed short runs per case first (default: 1)")
    p.add_argument("--no-answer", action="store_true", help="skip the answering (text tokens/s) cases")
    p.add_argument("--thresholds", type=arg_probability, nargs="*", default=[0.5, 0.7, 0.9],
                   help="confidence thresholds to study at the largest batch (steps saved, agreement); "
                   "give none to skip")
    p.add_argument("--threads", type=arg_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results as JSON here (default: print only)")
    p.add_argument("--plot", default=None, help="write a PNG of image tokens/s against batch per backend here")


def run(args) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    backends_ = usable_backends(args.backends)
    if not backends_:
        raise ValueError(f"none of the backends {args.backends} can run on this machine")
    subject = load_subject(args.model, args.preset, args.dtypes)
    engine_backends = [b for b in backends_ if b != "reference"]
    n_cases = len(args.batch) * len(contenders_of(backends_, args.dtypes, args.weights))
    n_cases *= 1 if args.no_answer else 2
    info = machine_info()
    bar = tqdm(total=n_cases, desc="bench", unit="case", file=sys.stderr, delay=1.0)

    partial = []

    def progress(row):
        partial.append(row)
        if args.json:  # written after every case, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(dict(machine=info, partial=True, results=partial), indent=2))
        bar.update(1)
        bar.set_postfix_str(f"{row['task']} {label(row)} b{row['batch']}: "
                            f"{row['tokens_per_s']:.0f} tok/s")

    results = run_cases(subject, backends_=backends_, dtypes=args.dtypes, batches=args.batch, steps=args.steps,
                        guidance=args.guidance, repeats=args.repeats, warmup=args.warmup, answer=not args.no_answer,
                        progress=progress, weights=args.weights)
    bar.close()
    for r in results:  # the engine's matmul rate against torch's GEMM peak in the math dtype, measured here
        peak = info["gemm_gflops"].get(r.get("math_dtype", ""))
        if "gflop" in r and peak and r.get("weights", "float") == "float":
            r["gflops_per_s"] = round(r["gflop"] / r["median_s"], 2)
            r["gemm_peak_fraction"] = round(r["gflop"] / r["median_s"] / peak, 4)
    report = dict(machine=info, model=subject.source, config=subject.config.to_dict(), results=results)
    if engine_backends and args.thresholds:
        report["threshold_decoding"] = threshold_study(
            subject, backend=engine_backends[0], dtype=args.dtypes[0], batch=max(args.batch), steps=args.steps,
            guidance=args.guidance, thresholds=args.thresholds)
    if engine_backends and {"float32", "bfloat16"} <= set(args.dtypes):
        report["bf16_agreement"] = bf16_agreement(subject, backend=engine_backends[0], batch=max(args.batch),
                                                  steps=args.steps, guidance=args.guidance)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") \
        else None
    print(f"model: {subject.source}; steps {args.steps}, guidance {args.guidance}; {info['cpu']}, "
          f"{info['torch_threads']} threads")
    print(format_table(results))
    for r in results:
        if "breakdown_s" in r and r["task"] == "generate":
            total = sum(r["breakdown_s"].values())
            parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in r["breakdown_s"].items())
            print(f"breakdown {label(r)} b{r['batch']}: {parts}")
    for r in results:
        if "gemm_peak_fraction" in r:
            print(f"matmul rate {label(r)} b{r['batch']}: {r['gflops_per_s']:.0f} GFLOP/s, "
                  f"{100 * r['gemm_peak_fraction']:.0f}% of torch's {r['math_dtype']} GEMM peak here")
    for row in report.get("threshold_decoding", []):
        print(f"threshold {row['threshold']}: {row['steps_run']}/{row['steps']} steps, "
              f"agreement with the schedule {row['token_agreement_with_schedule']:.3f}")
    if "bf16_agreement" in report:
        print(f"bf16 vs fp32 token agreement: {report['bf16_agreement']['token_agreement']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastface bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["run_cases", "machine_info", "plot", "format_table", "threshold_study", "bf16_agreement", "main"]
