"""``fastface eval --parts captions pairs edit``: the directions beyond text-to-image and VQA, on held-out faces.

(d) captions: each face captioned by masked diffusion at 4, 8 and 16 steps and autoregressively; every caption is
    parsed back into attributes (``text.parse_caption``) and each attribute it names with one value is checked
    against the face's truth -> accuracy per attribute, attributes named per caption, text tokens/s of each
    decoder (the caption's tokens and its <eos>, per second of decoding, the image encoding included). The
    face world's own captions of the same faces, scored the same way, are the parser's ceiling (``oracle``).
(e) pairs: caption and face drawn together (``Pipeline.generate_pair_tokens``); the judge reads every attribute the
    caption names in the drawn face -> agreement per attribute, beside the agreement of each caption with another
    pair's face (``shuffled``: what agreement by chance looks like).
(f) edit: the hair of each face re-drawn under a prompt naming another hair colour (``Pipeline.edit_tokens``,
    region "hair" from the perception model's parsing); the judge reads the hair colour of the edited face ->
    the share that shows the new colour, the share of the other attributes the judge reads the same before and
    after, and the share of tokens outside the region left unchanged (must be 1).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fastface.data.attributes import ATTRIBUTES
from fastface.perception import IGNORE
from fastface.perception.train import accuracy_table, mean_accuracy

CAPTION_STEPS = (4, 8, 16)


def caption_labels(text: str) -> np.ndarray:
    """int64 [n_attributes]: the value index of every attribute ``text`` names with a single value, else IGNORE;
    an attribute named with several values, or with a word that is not one of its values, is -2 (scored wrong)."""
    from fastface.data.text import parse_caption

    row = np.full(len(ATTRIBUTES), IGNORE, dtype=np.int64)
    for name, values in parse_caption(text).items():
        k = list(ATTRIBUTES).index(name)
        value = next(iter(values)) if len(values) == 1 else None
        row[k] = ATTRIBUTES[name].index(value) if value in ATTRIBUTES[name] else -2  # not a value of it: wrong
    return row


def truth_labels(attrs_list) -> np.ndarray:
    return np.array([[ATTRIBUTES[n].index(a.to_dict()[n]) for n in ATTRIBUTES] for a in attrs_list], dtype=np.int64)


def score_captions(captions: list[str], attrs_list) -> dict:
    """Accuracy of what the captions say, per attribute named, against the faces' truth."""
    named = np.stack([caption_labels(c) for c in captions]) if captions else np.zeros((0, len(ATTRIBUTES)), int)
    truth = truth_labels(attrs_list)
    scored = named != IGNORE
    # predictions: what the caption says; labels: the truth where the caption says something
    labels = np.where(scored, truth, IGNORE)
    table = accuracy_table(named, labels)
    return {"per_attribute": {n: table[n]["accuracy"] for n in ATTRIBUTES}, "mean": mean_accuracy(table),
            "overall": float((named == labels)[scored].mean()) if scored.any() else float("nan"),
            "named_per_caption": float(scored.sum(1).mean()) if len(named) else 0.0, "count": int(scored.sum())}


def _caption_tokens(pipe, captions: list[str]) -> int:
    return sum(len(pipe.encode_text(c)) + 1 for c in captions)  # each caption's tokens and its <eos>


def evaluate_captions(pipe, images, attrs_list, *, steps_list=CAPTION_STEPS, batch_size: int = 16, seed: int = 0,
                      examples: int = 3) -> dict:
    """(d) Parallel (masked diffusion) against autoregressive captioning of the same faces by the same model."""
    from fastface.data.text import caption

    runs = [("diffusion", s) for s in steps_list] + [("autoregressive", None)]
    out = {"faces": len(images), "batch_size": batch_size, "runs": {}}
    for mode, steps in runs:
        captions, seconds = [], 0.0
        for i in range(0, len(images), batch_size):
            chunk = list(images[i : i + batch_size])
            t = time.perf_counter()
            kw = {"steps": steps, "seed": seed + i} if mode == "diffusion" else {}
            captions += pipe.describe(chunk, mode=mode, **kw)
            seconds += time.perf_counter() - t
        key = f"diffusion-{steps}" if mode == "diffusion" else "autoregressive"
        tokens = _caption_tokens(pipe, captions)
        out["runs"][key] = {**score_captions(captions, attrs_list), "mode": mode, "steps": steps,
                            "seconds": round(seconds, 2), "text_tokens": tokens,
                            "text_tokens_per_s": tokens / seconds if seconds else float("nan"),
                            "captions_per_s": len(captions) / seconds if seconds else float("nan"),
                            "examples": captions[:examples]}
    truth = [caption(a, np.random.default_rng([seed, i, 0xCA]), max_tokens=pipe.config.max_text_len - 3)
             for i, a in enumerate(attrs_list)]
    out["oracle"] = score_captions(truth, attrs_list)
    return out


def evaluate_pairs(pipe, classifier, *, n: int = 200, steps: int = 16, guidance: float = 0.0, seed: int = 0,
                   batch_size: int = 16, examples: int = 3) -> dict:
    """(e) Joint samples agree with themselves: the judge reads the caption's attributes in the drawn face."""
    captions, tokens = [], []
    t = time.perf_counter()
    for i in range(0, n, batch_size):
        c, ids = pipe.generate_pair_tokens(min(batch_size, n - i), steps=steps, guidance=guidance, seed=seed + i)
        captions += c
        tokens.append(ids)
    seconds = time.perf_counter() - t
    arrays = np.stack([np.asarray(img.convert("RGB")) for img in pipe.decode_images(torch.cat(tokens))])
    preds = classifier.predict_labels(arrays)
    named = np.stack([caption_labels(c) for c in captions])

    def agreement(labels):
        table = accuracy_table(preds, labels)
        scored = labels != IGNORE
        return table, float((preds == labels)[scored].mean()) if scored.any() else float("nan")

    table, overall = agreement(named)
    shuffled_table, shuffled = agreement(np.roll(named, 1, axis=0))
    return {"pairs": n, "steps": steps, "guidance": guidance, "seconds": round(seconds, 2),
            "per_attribute": {k: {"agreement": table[k]["accuracy"], "shuffled": shuffled_table[k]["accuracy"],
                                  "count": table[k]["count"]} for k in ATTRIBUTES},
            "mean": mean_accuracy(table), "overall": overall, "mean_shuffled": mean_accuracy(shuffled_table),
            "overall_shuffled": shuffled, "named_per_caption": float((named != IGNORE).sum(1).mean()),
            "count": int((named != IGNORE).sum()), "examples": captions[:examples]}


def evaluate_edit(pipe, classifier, images, attrs_list, *, steps: int = 16, guidance: float = 2.0, seed: int = 0,
                  batch_size: int = 16) -> dict:
    """(f) Hair colour edits: does the judge see the new colour, and does the rest stay?"""
    from fastface.data.text import _hair_phrase  # the caption's own wording of a hair colour

    colours = list(ATTRIBUTES["hair_colour"])
    order = list(ATTRIBUTES)
    k_hair = order.index("hair_colour")
    rng = np.random.default_rng([seed, 0xED])
    eligible = [i for i, a in enumerate(attrs_list) if a.hair_style != "bald" and a.hat == "none"]
    targets, prompts = [], []
    for i in eligible:
        a = attrs_list[i]
        new = colours[int(rng.choice([j for j, c in enumerate(colours) if c != a.hair_colour]))]
        targets.append(new)
        prompts.append(f"a {a.gender} with {_hair_phrase(a.hair_style, new, rng)}")
    if not eligible:
        return {"skipped": "no face with visible hair"}
    originals = torch.cat([pipe.encode_images(list(images[i : i + 1])) for i in eligible])
    edited = []
    t = time.perf_counter()
    for s in range(0, len(eligible), batch_size):
        src = originals[s : s + batch_size]
        out = pipe.edit_tokens(src, prompts[s : s + batch_size], "hair", steps=steps, guidance=guidance,
                               seed=seed + s)
        edited.append(out)
    seconds = time.perf_counter() - t
    edited_ids = torch.cat(edited)
    original_pixels = np.stack([np.asarray(i) for i in pipe.decode_images(originals)])
    before = classifier.predict_labels(original_pixels)
    after = classifier.predict_labels(np.stack([np.asarray(i) for i in pipe.decode_images(edited_ids)]))
    want = np.array([colours.index(c) for c in targets])
    others = [k for k in range(len(order)) if k not in (k_hair, order.index("hair_style"))]
    # the region each edit re-drew, recomputed from the same parsing, to check nothing outside it moved
    from fastface.regions import resolve_region

    parsing = [f.parsing for f in pipe.perception.perceive(original_pixels)]
    regions = torch.stack([resolve_region("hair", pipe.config.image_grid, parsing=p,
                                          classes=pipe.perception.parsing_classes) for p in parsing])
    outside_same = float((edited_ids == originals)[~regions].float().mean()) if bool((~regions).any()) else 1.0
    return {"faces": len(eligible), "steps": steps, "guidance": guidance, "seconds": round(seconds, 2),
            "new_colour_shown": float((after[:, k_hair] == want).mean()),
            "old_colour_read_before": float((before[:, k_hair] == np.array(
                [colours.index(attrs_list[i].hair_colour) for i in eligible])).mean()),
            "other_attributes_kept": float((after[:, others] == before[:, others]).mean()),
            "outside_region_unchanged": outside_same,
            "region_tokens_mean": float(regions.float().sum(1).mean()),
            "example_prompts": prompts[:3]}


def markdown_lines(result: dict) -> list[str]:
    lines = []
    cap = result.get("captions")
    if cap and "runs" in cap:
        lines += ["", "| captioning | attribute accuracy (mean over attributes) | all named | named per caption | "
                  "text tokens/s |", "|---|---:|---:|---:|---:|"]
        for key, r in cap["runs"].items():
            lines.append(f"| {key} | {100 * r['mean']:.1f}% | {100 * r['overall']:.1f}% | "
                         f"{r['named_per_caption']:.1f} | {r['text_tokens_per_s']:.0f} |")
        o = cap["oracle"]
        lines.append(f"| face world's own captions (parser ceiling) | {100 * o['mean']:.1f}% | "
                     f"{100 * o['overall']:.1f}% | {o['named_per_caption']:.1f} | – |")
    pairs = result.get("pairs")
    if pairs and "overall" in pairs:
        lines += ["", f"Joint samples ({pairs['pairs']} pairs, {pairs['steps']} steps): the judge reads the caption's "
                  f"attributes in the drawn face {100 * pairs['overall']:.1f}% of {pairs['count']} checks (mean over "
                  f"attributes {100 * pairs['mean']:.1f}%); another pair's caption "
                  f"{100 * pairs['overall_shuffled']:.1f}% ({100 * pairs['mean_shuffled']:.1f}%)."]
    edit = result.get("edit")
    if edit and "new_colour_shown" in edit:
        lines += ["", f"Hair-colour edits ({edit['faces']} faces, {edit['steps']} steps, guidance {edit['guidance']}): "
                  f"new colour read {100 * edit['new_colour_shown']:.1f}%; other attributes read the same "
                  f"{100 * edit['other_attributes_kept']:.1f}%; tokens outside the region unchanged "
                  f"{100 * edit['outside_region_unchanged']:.1f}% (region {edit['region_tokens_mean']:.0f} tokens)."]
    return lines
