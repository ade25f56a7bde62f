"""``fastface eval``: how well a model understands and draws faces, per attribute.

    fastface eval --num-faces 200 --markdown eval.md        # the embedded model, default steps and guidance
    python -m fastface.evaluate --model ckpt/ --output eval.json

Three measurements on held-out face-world renders (identities never trained on, dataset seed ``--seed``):

(a) understanding: ``pipe.answer`` on ``vqa_pairs(..., details=True)`` questions (open and yes/no), exact
    match after normalising case and spacing -> accuracy per attribute asked about;
(b) generation: one prompt per face naming a random subset of its attributes (``text.prompt``), drawn with
    ``pipe.generate`` at the given steps and guidance; the attribute classifier (``fastface.perception``)
    reads every prompted attribute back -> accuracy per attribute, beside the classifier's accuracy on the
    real renders of the same faces and attributes (the judge's own error on this exact question set) and on
    those renders after an image-tokenizer round trip (its error on decoded pixels);
(c) the image tokenizer's reconstruction PSNR (encode -> decode) on the same faces;
(d, e, f) captions (parallel against autoregressive), joint pairs and hair edits: ``fastface.eval_directions``
    (parts ``captions``, ``pairs``, ``edit``; not run by default).

Every function takes a ``Pipeline``; results are plain dicts (JSON), and ``markdown_report`` turns them into
one per-attribute table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastface.backends import CHOICES
from fastface.checks import (
    DTYPE_NAMES,
    WEIGHT_FORMATS,
    arg_finite_float,
    arg_nonnegative_int,
    arg_positive_int,
    arg_probability,
)
from fastface.data.attributes import ATTRIBUTES
from fastface.perception import IGNORE
from fastface.perception.train import accuracy_table, held_out_faces, mean_accuracy

# names ``text.prompt`` understands ("hair" = hair style and colour together); gender is always named
PROMPT_NAMES = ("age", "expression", "face_shape", "skin_tone", "eye_colour", "eyebrows", "nose", "hair", "glasses",
                "facial_hair", "earrings", "hat", "lipstick", "eye_shadow", "blush", "background", "shirt_colour")
PARTS = ("vqa", "generation", "psnr", "captions", "pairs", "edit")
DEFAULT_SEED = 10_000  # face-world dataset seed of the held-out faces (training data uses small seeds)


def _default(name: str):
    from fastface.pipeline import Pipeline

    return inspect.signature(Pipeline.generate_tokens).parameters[name].default


DEFAULT_STEPS = _default("steps")
DEFAULT_GUIDANCE = _default("guidance")


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no space around hyphens, no trailing punctuation."""
    text = re.sub(r"\s*-\s*", "-", text.strip().lower())
    text = re.sub(r"\s+", " ", text)
    return text.rstrip(" .?!")


# ------------------------------------------------------------------------------------ (a) understanding

def vqa_questions(attrs_list, *, per_face: int = 4, seed: int = 0) -> list[dict]:
    """``per_face`` questions per face (``vqa_pairs(..., details=True)`` records plus ``face``: its index)."""
    from fastface.data.text import vqa_pairs

    records = []
    for i, attrs in enumerate(attrs_list):
        rng = np.random.default_rng([int(seed), i, 0xA5])
        for rec in vqa_pairs(attrs, rng, per_face, details=True):
            records.append({**rec, "face": i})
    return records


def score_vqa(records: list[dict], predictions: list[str]) -> dict:
    """Exact-match accuracy of ``predictions`` (one per record) -> {"per_attribute", "by_kind", "mean", …}.

    ``mean`` averages the per-attribute accuracies (each attribute counts once); ``overall`` is the plain
    fraction of questions answered right.
    """
    if len(records) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(records)} questions")
    right: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    kinds: dict[str, list[bool]] = {}
    for rec, pred in zip(records, predictions):
        if rec["attribute"] not in right:
            raise ValueError(f"unknown attribute {rec['attribute']!r} in a question record")
        ok = normalize_answer(pred) == normalize_answer(rec["answer"])
        right[rec["attribute"]].append(ok)
        kinds.setdefault(rec["kind"], []).append(ok)
    table = {name: {"accuracy": float(np.mean(v)) if v else None, "count": len(v)} for name, v in right.items()}
    flat = [ok for v in right.values() for ok in v]
    return {"per_attribute": table, "mean": mean_accuracy(table),
            "overall": float(np.mean(flat)) if flat else float("nan"), "count": len(flat),
            "by_kind": {k: {"accuracy": float(np.mean(v)), "count": len(v)} for k, v in sorted(kinds.items())}}


def evaluate_vqa(pipe, images, attrs_list, *, per_face: int = 4, seed: int = 0, batch_size: int = 64,
                 examples: int = 0) -> dict:
    """(a) VQA exact-match accuracy per attribute of ``pipe.answer`` on faces ``images`` (uint8 [n, S, S, 3],
    or codebook ids [n, N]) described by ``attrs_list``. ``examples`` wrong answers are kept for the report."""
    records = vqa_questions(attrs_list, per_face=per_face, seed=seed)
    answers: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        idx = [r["face"] for r in chunk]
        answers += pipe.answer(images[idx], [r["question"] for r in chunk])
    out = score_vqa(records, answers)
    out["questions_per_face"] = per_face
    wrong = [{"question": r["question"], "expected": r["answer"], "answer": a}
             for r, a in zip(records, answers) if normalize_answer(a) != normalize_answer(r["answer"])]
    out["wrong_examples"] = wrong[:examples]
    return out


# ------------------------------------------------------------------------------------ (b) generation

def _fits(text: str, max_words: int) -> bool:
    from fastface.data.text import split_words

    return len(split_words(text)) <= max_words


def attribute_prompts(attrs_list, *, per_prompt: int = 6, names=PROMPT_NAMES, seed: int = 0,
                      max_words: int | None = None) -> tuple[list[str], np.ndarray]:
    """One prompt per face naming ``per_prompt`` of ``names`` (drawn at random), and the labels it asks for.

    Returns ``(prompts, labels)``: labels int64 [n, n_attributes] hold the true value index of every attribute
    the prompt names (read back with ``parse_caption``, so only what the text really says is scored; gender is
    always named) and ``IGNORE`` elsewhere. Eye colour is not scored behind sunglasses. Names are dropped at
    random until a prompt fits ``max_words`` words.
    """
    from fastface.data.text import parse_caption, prompt

    names = list(names)
    unknown = sorted(set(names) - set(PROMPT_NAMES))
    if unknown:
        raise ValueError(f"unknown prompt attribute(s) {unknown}; choose from {list(PROMPT_NAMES)}")
    if per_prompt < 0:
        raise ValueError(f"per_prompt must be >= 0, got {per_prompt}")
    order = list(ATTRIBUTES)
    prompts, labels = [], np.full((len(attrs_list), len(order)), IGNORE, dtype=np.int64)
    for i, attrs in enumerate(attrs_list):
        rng = np.random.default_rng([int(seed), i, 0x7A])
        pool = [n for n in names if not (n == "facial_hair" and attrs.gender == "woman")]
        chosen = [pool[j] for j in sorted(rng.choice(len(pool), size=min(per_prompt, len(pool)), replace=False))]
        text = prompt(attrs, chosen, rng)
        while max_words is not None and not _fits(text, max_words) and chosen:
            chosen.pop(int(rng.integers(len(chosen))))
            text = prompt(attrs, chosen, rng)
        prompts.append(text)
        truth = attrs.to_dict()
        for name, values in parse_caption(text).items():
            if values != {truth[name]}:
                continue  # the text names something else too (e.g. "brown" of skin and hair): not scored
            if name == "eye_colour" and attrs.glasses == "sunglasses":
                continue
            labels[i, order.index(name)] = ATTRIBUTES[name].index(truth[name])
    return prompts, labels


def score_generation(pred_generated: np.ndarray, pred_real: np.ndarray, labels: np.ndarray,
                     pred_reconstructed: np.ndarray | None = None) -> dict:
    """Per prompted attribute: accuracy of the classifier on generated faces and on the real renders (and, when
    given, on the real renders after an image-tokenizer round trip: the judge's error on decoded pixels).

    ``pred_*`` and ``labels`` are int64 [n, n_attributes]; ``IGNORE`` labels are not scored.
    """
    scored = labels != IGNORE
    preds = {"generated": pred_generated, "real": pred_real}
    if pred_reconstructed is not None:
        preds["reconstructed"] = pred_reconstructed
    tables = {key: accuracy_table(p, labels) for key, p in preds.items()}
    table = {name: {**{key: t[name]["accuracy"] for key, t in tables.items()}, "count": int(scored[:, k].sum())}
             for k, name in enumerate(ATTRIBUTES)}
    out = {"per_attribute": table, "count": int(scored.sum())}
    for key, p in preds.items():
        out[f"mean_{key}"] = mean_accuracy(tables[key])
        out[f"overall_{key}"] = float((p == labels)[scored].mean()) if scored.any() else float("nan")
    return out


def evaluate_generation(pipe, classifier, images, attrs_list, *, steps: int = DEFAULT_STEPS,
                        guidance: float = DEFAULT_GUIDANCE, seed: int = 0, per_prompt: int = 6,
                        names=PROMPT_NAMES, batch_size: int = 16, save_dir=None,
                        threshold: float | None = None, guidance_steps: int | None = None,
                        uncond_refresh: int | None = None, kv_refresh: int | None = None) -> dict:
    """(b) Draw one face per prompt (``attribute_prompts``) and score the prompted attributes.

    ``images`` are the real renders of ``attrs_list`` (uint8 [n, S, S, 3]); prompt i uses seed ``seed + i``.
    With ``save_dir`` the generated faces are written there as PNGs beside ``prompts.txt``. ``threshold``
    turns on confidence-threshold decoding (``Pipeline.generate_tokens``); the steps each batch actually ran
    are reported as ``mean_steps_run``. ``guidance_steps``, ``uncond_refresh``, ``kv_refresh``: the other
    faster-than-exact options of ``Pipeline.generate_tokens``; ``work`` is the share of exact decoding's
    transformer positions the run computed (engine only) and ``image_tokens_per_s`` its decoding speed.
    """
    max_words = pipe.config.max_text_len - 3
    prompts, labels = attribute_prompts(attrs_list, per_prompt=per_prompt, names=names, seed=seed,
                                        max_words=max_words)
    generated, steps_run, work, decode_seconds = [], [], [], 0.0
    for i in range(0, len(prompts), batch_size):
        ran = []  # one entry per forward pass actually run (fewer than steps with threshold decoding)
        t = time.perf_counter()
        tokens = pipe.generate_tokens(prompts[i : i + batch_size], steps=steps, guidance=guidance, seed=seed + i,
                                      threshold=threshold, guidance_steps=guidance_steps,
                                      uncond_refresh=uncond_refresh, kv_refresh=kv_refresh,
                                      callback=lambda *_, ran=ran: ran.append(1))
        decode_seconds += time.perf_counter() - t
        generated += pipe.decode_images(tokens)
        steps_run.append(len(ran))
        stats = pipe.decoder.last_stats
        if stats is not None:  # the engine: positions run against exact decoding's (every row, every step)
            exact = len(tokens) * (2 if guidance != 0 else 1) * steps * (pipe.config.image_tokens + 2)
            work.append(stats.positions_run / exact)
    arrays = np.stack([np.asarray(img.convert("RGB")) for img in generated])
    with torch.no_grad():
        tok = pipe.image_tokenizer
        recon = tok.decode(tok.encode(torch.from_numpy(np.ascontiguousarray(images))))
    out = score_generation(classifier.predict_labels(arrays), classifier.predict_labels(images), labels,
                           classifier.predict_labels(recon))
    out.update({"steps": steps, "guidance": guidance, "threshold": threshold, "guidance_steps": guidance_steps,
                "uncond_refresh": uncond_refresh, "kv_refresh": kv_refresh, "mean_steps_run": float(np.mean(steps_run)),
                "work": float(np.mean(work)) if work else None,
                "image_tokens_per_s": round(len(prompts) * pipe.config.image_tokens / decode_seconds, 1),
                "attributes_per_prompt": per_prompt,
                "prompts": len(prompts), "example_prompts": prompts[:3]})
    out["facetext"] = facetext_scores(pipe, arrays, images, prompts)
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(generated):
            img.save(save_dir / f"{i:04d}.png")
        (save_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return out


def facetext_scores(pipe, generated: np.ndarray, real: np.ndarray, prompts: list[str]) -> dict:
    """The face-text model's agreement of generated faces with their prompts (this project's CLIP-score):
    ``score`` the mean cosine of each face with its prompt, ``real`` the same for the real renders the prompts
    describe (the level a perfect generator reaches), ``shuffled`` faces with other faces' prompts (chance), and
    ``r_at_1`` the share of generated faces whose own prompt scores highest among all the prompts."""
    try:
        ft = pipe.facetext
    except (FileNotFoundError, ValueError) as exc:  # no face-text model in this install
        return {"skipped": str(exc)}
    text = ft.embed_texts(prompts)
    gen, ref = ft.embed_images(generated), ft.embed_images(real)
    sim = gen @ text.T
    n = len(prompts)
    return {"score": float(sim.diagonal().mean()), "real": float((ref * text).sum(1).mean()),
            "shuffled": float(sim.roll(1, dims=1).diagonal().mean()) if n > 1 else None,
            "r_at_1": float((sim.argmax(1) == torch.arange(n)).float().mean()), "count": n}


# --------------------------------------------------------------------------------------- (c) tokenizer

def image_psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """PSNR (dB) of each pair of uint8 images [n, S, S, 3] -> float64 [n] (identical images: 100 dB)."""
    a = torch.as_tensor(np.asarray(a)).double()
    b = torch.as_tensor(np.asarray(b)).double()
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"images must be two [n, S, S, 3] batches of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(255.0**2 * 1e-10)
    return (10 * torch.log10(255.0**2 / mse)).numpy()


def evaluate_tokenizer(pipe, images, *, batch_size: int = 256) -> dict:
    """(c) Reconstruction PSNR of ``pipe.image_tokenizer`` (encode -> decode) on uint8 images [n, S, S, 3]."""
    tok = pipe.image_tokenizer
    if tok is None:
        raise RuntimeError("this checkpoint has no image tokenizer")
    values = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            values.append(image_psnr(x, tok.decode(tok.encode(x))))
    v = np.concatenate(values)
    return {"psnr_db": float(v.mean()), "psnr_db_min": float(v.min()), "count": int(len(v))}


# ------------------------------------------------------------------------------------------- report

def evaluate(pipe, classifier=None, *, num_faces: int = 200, seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, questions_per_face: int = 4, per_prompt: int = 6,
             parts=("vqa", "generation", "psnr"), batch_size: int = 16, faces: dict | None = None,
             save_dir=None, log=None, threshold: float | None = None, guidance_steps: int | None = None,
             uncond_refresh: int | None = None, kv_refresh: int | None = None) -> dict:
    """Run the chosen ``parts`` on ``num_faces`` held-out renders (dataset ``seed``) -> a JSON-ready dict.

    ``faces`` (a ``make_dataset``-style dict with ``images`` and ``attrs``) replaces the rendered faces.
    Without an image tokenizer, VQA reads nothing it cannot encode: it is skipped, as are generation and PSNR.
    """
    parts = tuple(parts)
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    if not isinstance(num_faces, int) or num_faces <= 0:
        raise ValueError(f"num_faces must be a positive int, got {num_faces!r}")
    log = log or (lambda *_: None)
    t0 = time.perf_counter()
    if faces is None:
        faces = held_out_faces(num_faces, seed)
    images, attrs_list = faces["images"], faces["attrs"]
    result = {"faces": int(len(images)), "seed": seed, "parts": list(parts)}
    missing_vq = pipe.image_tokenizer is None
    if "vqa" in parts:
        if missing_vq:
            result["vqa"] = {"skipped": "no image tokenizer"}
        else:
            t = time.perf_counter()
            result["vqa"] = evaluate_vqa(pipe, images, attrs_list, per_face=questions_per_face, seed=seed,
                                         batch_size=max(batch_size, 64), examples=5)
            result["vqa"]["seconds"] = round(time.perf_counter() - t, 1)
            log(f"vqa: mean {result['vqa']['mean']:.4f} over {result['vqa']['count']} questions")
    if "generation" in parts:
        if missing_vq:
            result["generation"] = {"skipped": "no image tokenizer"}
        else:
            if classifier is None:
                from fastface.perception.judge import Judge

                classifier = Judge.default()
            t = time.perf_counter()
            result["generation"] = evaluate_generation(pipe, classifier, images, attrs_list, steps=steps,
                                                       guidance=guidance, seed=seed, per_prompt=per_prompt,
                                                       batch_size=batch_size, save_dir=save_dir,
                                                       threshold=threshold, guidance_steps=guidance_steps,
                                                       uncond_refresh=uncond_refresh, kv_refresh=kv_refresh)
            result["generation"]["seconds"] = round(time.perf_counter() - t, 1)
            if hasattr(classifier, "sources"):
                result["generation"]["judge"] = dict(classifier.sources)
            g = result["generation"]
            log(f"generation: mean {g['mean_generated']:.4f} (classifier on real renders {g['mean_real']:.4f})")
    if "psnr" in parts:
        if missing_vq:
            result["psnr"] = {"skipped": "no image tokenizer"}
        else:
            result["psnr"] = evaluate_tokenizer(pipe, images)
            log(f"tokenizer: {result['psnr']['psnr_db']:.2f} dB")
    _evaluate_directions(pipe, classifier, images, attrs_list, parts, result, seed=seed, steps=steps,
                         guidance=guidance, batch_size=batch_size, log=log)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _evaluate_directions(pipe, classifier, images, attrs_list, parts, result, *, seed, steps, guidance, batch_size,
                         log):
    """Parts captions, pairs and edit (``fastface.eval_directions``) into ``result``."""
    from fastface import eval_directions as ed

    wanted = [p for p in ("captions", "pairs", "edit") if p in parts]
    if not wanted:
        return
    if pipe.image_tokenizer is None:
        for part in wanted:
            result[part] = {"skipped": "no image tokenizer"}
        return
    if classifier is None and ("pairs" in wanted or "edit" in wanted):
        from fastface.perception.judge import Judge

        classifier = Judge.default()
    if "captions" in wanted:
        result["captions"] = ed.evaluate_captions(pipe, images, attrs_list, batch_size=batch_size, seed=seed)
        log("captions: " + ", ".join(f"{k} {r['mean']:.4f}" for k, r in result["captions"]["runs"].items()))
    if "pairs" in wanted:
        result["pairs"] = ed.evaluate_pairs(pipe, classifier, n=len(images), steps=steps, seed=seed,
                                            batch_size=batch_size)
        log(f"pairs: agreement {result['pairs']['overall']:.4f} (shuffled {result['pairs']['overall_shuffled']:.4f})")
    if "edit" in wanted:
        result["edit"] = ed.evaluate_edit(pipe, classifier, images, attrs_list, steps=steps, guidance=guidance,
                                          seed=seed, batch_size=batch_size)
        if "new_colour_shown" in result["edit"]:
            log(f"edit: new hair colour shown {result['edit']['new_colour_shown']:.4f}")


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.1f}%"


def markdown_report(result: dict) -> str:
    """One markdown table, a row per attribute: VQA accuracy (questions), generated-face accuracy, the
    classifier on the real renders (prompted attributes), then the means and the tokenizer PSNR."""
    vqa = result.get("vqa") if "per_attribute" in result.get("vqa", {}) else None
    gen = result.get("generation") if "per_attribute" in result.get("generation", {}) else None
    lines = [f"Held-out faces: {result.get('faces')} (dataset seed {result.get('seed')})"]
    if gen:
        lines[0] += f"; generation at {gen['steps']} steps, guidance {gen['guidance']}"
        if gen.get("threshold") is not None:
            lines[0] += f", confidence threshold {gen['threshold']} ({gen['mean_steps_run']:.1f} steps run on average)"
        for key, what in (("guidance_steps", "guidance on the first {} steps"), ("kv_refresh", "kv refresh every {}"),
                          ("uncond_refresh", "unconditional pass every {} steps")):
            if gen.get(key) is not None:
                lines[0] += ", " + what.format(gen[key])
        if gen.get("work") is not None and gen["work"] < 1:
            lines[0] += f" ({gen['work']:.0%} of exact decoding's work)"
    if result.get("weights", "float") != "float":
        lines[0] += f"; {result['weights']} weights"
    lines += ["", "| attribute | VQA accuracy | questions | generated: attribute shown | classifier on real renders "
              "| classifier on tokenizer round trip | prompts naming it |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ATTRIBUTES:
        v = vqa["per_attribute"][name] if vqa else None
        g = gen["per_attribute"][name] if gen else {}
        lines.append(f"| {name} | {_pct(v['accuracy']) if v else '–'} | {v['count'] if v else '–'} | "
                     f"{_pct(g.get('generated'))} | {_pct(g.get('real'))} | {_pct(g.get('reconstructed'))} | "
                     f"{g.get('count', '–')} |")
    gen_ = gen or {}
    lines.append(f"| **mean over attributes** | **{_pct(vqa['mean']) if vqa else '–'}** | "
                 f"{vqa['count'] if vqa else '–'} | **{_pct(gen_.get('mean_generated'))}** | "
                 f"**{_pct(gen_.get('mean_real'))}** | {_pct(gen_.get('mean_reconstructed'))} | "
                 f"{gen_.get('count', '–')} |")
    lines.append("")
    if vqa:
        kinds = ", ".join(f"{k} {_pct(v['accuracy'])} ({v['count']})" for k, v in vqa["by_kind"].items())
        lines.append(f"VQA: all questions {_pct(vqa['overall'])} ({vqa['count']}); by kind: {kinds}.")
    if gen:
        lines.append(f"Generation: all prompted attributes {_pct(gen['overall_generated'])} "
                     f"(classifier on real renders {_pct(gen['overall_real'])}; {gen['count']} attribute checks).")
        ft = gen.get("facetext", {})
        if "score" in ft:
            lines.append(f"Face-text score (cosine of a face with its prompt): generated {ft['score']:.3f}, real "
                         f"renders {ft['real']:.3f}, other faces' prompts {ft['shuffled']:.3f}; own prompt ranked "
                         f"first among {ft['count']}: {_pct(ft['r_at_1'])}.")
    psnr = result.get("psnr", {})
    if "psnr_db" in psnr:
        lines.append(f"Image tokenizer: reconstruction PSNR {psnr['psnr_db']:.2f} dB (min {psnr['psnr_db_min']:.2f};"
                     f" {psnr['count']} faces).")
    from fastface.eval_directions import markdown_lines

    lines += markdown_lines(result)
    for part in PARTS:
        if "skipped" in result.get(part, {}):
            lines.append(f"{part}: skipped ({result[part]['skipped']}).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``fastface eval``."""
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded face model)")
    parser.add_argument("--backend", default="auto", choices=list(CHOICES),
                        help="kernel backend (auto: the fastest available on this device)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES), help="transformer precision")
    parser.add_argument("--weights", default="float", choices=list(WEIGHT_FORMATS),
                        help="attention and expert weights: float, or int8 quantised at load (default: float)")
    parser.add_argument("--num-faces", type=arg_positive_int, default=200, help="held-out faces (default: 200)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"face-world seed of the held-out faces; also seeds prompts and sampling "
                             f"(default: {DEFAULT_SEED})")
    parser.add_argument("--steps", type=arg_positive_int, default=DEFAULT_STEPS,
                        help=f"parallel decoding steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=arg_finite_float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance weight (default: {DEFAULT_GUIDANCE})")
    parser.add_argument("--threshold", type=arg_probability, default=None,
                        help="confidence-threshold decoding for generation, in (0, 1] (default: off)")
    parser.add_argument("--guidance-steps", type=arg_nonnegative_int, default=None,
                        help="faster than exact: guidance on the first N decoding steps only (default: every step)")
    parser.add_argument("--uncond-refresh", type=arg_positive_int, default=None,
                        help="faster than exact: run the unconditional pass every R guided steps, the steps between "
                             "guided by its last logits (default: every step)")
    parser.add_argument("--kv-refresh", type=arg_positive_int, default=None,
                        help="faster than exact: recompute every image position every R steps, only the masked "
                             "ones in between (default: every step)")
    parser.add_argument("--questions-per-face", type=arg_positive_int, default=4, help="VQA questions per face")
    parser.add_argument("--attributes-per-prompt", type=int, default=6,
                        help="attributes named per generation prompt besides gender (default: 6)")
    parser.add_argument("--parts", nargs="+", default=["vqa", "generation", "psnr"], choices=list(PARTS),
                        help="what to measure (default: vqa generation psnr; captions: parallel against "
                             "autoregressive captioning at 4/8/16 steps; pairs: joint caption-face samples; edit: "
                             "hair-colour edits)")
    parser.add_argument("--classifier", default=None,
                        help="judge with this attribute classifier alone (default: the shipped judge: the "
                             "classifier, and the Faceptor on the attributes it reads at least as well)")
    parser.add_argument("--batch-size", type=arg_positive_int, default=16, help="prompts per generate call")
    parser.add_argument("--output", "-o", default="eval.json", help="JSON results file (default: eval.json)")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")
    parser.add_argument("--save-images", default=None, metavar="DIR", help="write the generated faces here")
    return parser


def run(args) -> int:
    """Run ``fastface eval`` from parsed ``add_arguments`` options: print the table, write the files; exit status 0
    (``evaluate`` returns the results themselves)."""
    import fastface
    from fastface.perception import AttributeClassifier
    from fastface.perception.judge import Judge

    if args.attributes_per_prompt < 0:
        raise ValueError(f"--attributes-per-prompt must be >= 0, got {args.attributes_per_prompt}")
    pipe = fastface.load(args.model, backend=args.backend, dtype=args.dtype, weights=args.weights)
    classifier = None
    if {"generation", "pairs", "edit"} & set(args.parts):
        # --classifier: that attribute classifier alone; by default the judge (fastface.perception.judge)
        classifier = AttributeClassifier.load(args.classifier) if args.classifier else Judge.default()
    torch.manual_seed(0)
    result = evaluate(pipe, classifier, num_faces=args.num_faces, seed=args.seed, steps=args.steps,
                      guidance=args.guidance, questions_per_face=args.questions_per_face,
                      per_prompt=args.attributes_per_prompt, parts=args.parts, batch_size=args.batch_size,
                      save_dir=args.save_images, log=lambda msg: print(msg, file=sys.stderr),
                      threshold=args.threshold, guidance_steps=args.guidance_steps,
                      uncond_refresh=args.uncond_refresh, kv_refresh=args.kv_refresh)
    result["model"] = str(args.model) if args.model else "embedded face-s"
    result["backend"], result["dtype"], result["weights"] = args.backend, args.dtype, args.weights
    text = markdown_report(result)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="fastface eval", description="Per-attribute "
                                                   "evaluation: VQA accuracy, generated-face attribute accuracy "
                                                   "and image tokenizer PSNR on held-out faces."))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (already printed) or --help: the status, as every path returns
        return int(exc.code or 0)
    try:
        run(args)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
        print(f"fastface eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
