"""Training the attribute classifier (``AttributeClassifier``) on face-world renders, its data, losses,
accuracy tables and command line.

    python -m fastface.perception.train --train --preset face-s --steps 12000 --out perception.safetensors
    python -m fastface.perception.train --eval 1000        # per-attribute accuracy of --out on held-out renders

Training (``train_classifier``): a fixed set of rendered pairs, shifted by up to 2 px, mirrored, with small
brightness, contrast and noise jitter; cross-entropy per head (eye colour is not scored behind sunglasses: it
cannot be seen), plus the identity loss. The heads are balanced by their running loss (``balanced_weights``): an
attribute still near chance gets a larger share of the gradient than one already learned, so a thin-line attribute
(eyebrow shape: chance for its first ~2000 steps) leaves its plateau instead of waiting behind 19 easy heads. The
learning rate follows ``fastface.lr_schedule.lr_at`` (linear warm-up, cosine decay to 1% of the peak).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from fastface.data.attributes import ATTRIBUTES, N_IDENTITIES
from fastface.lr_schedule import lr_at
from fastface.perception.model import DEFAULT_PATH, IGNORE, PRESETS, AttributeClassifier, PerceptionConfig

HELD_OUT_IDENTITIES = int(N_IDENTITIES * 0.9)  # identities >= this are never trained on (shared with the VQ split)


# ------------------------------------------------------------------------------------------ data

def visible_labels(attrs_list) -> np.ndarray:
    """Labels int64 [n, n_attributes] with the values a picture cannot show set to ``IGNORE``.

    Eye colour is hidden behind sunglasses; everything else is at least partly visible (a bald head's hair
    colour shows in the eyebrows and any facial hair).
    """
    names = list(ATTRIBUTES)
    eye = names.index("eye_colour")
    labels = np.stack([a.labels() for a in attrs_list]) if attrs_list else np.zeros((0, len(names)), np.int64)
    for i, a in enumerate(attrs_list):
        if a.glasses == "sunglasses":
            labels[i, eye] = IGNORE
    return labels


def identity_pairs(n_pairs: int, seed: int = 0, *, n_identities: int = HELD_OUT_IDENTITIES,
                   identity_offset: int = 0, start: int = 0) -> dict:
    """``2 * n_pairs`` faces: rows 2k and 2k+1 are one person (identity attributes shared; hair, accessories,
    makeup, clothes, background, pose and lighting drawn separately). Deterministic per seed; pair k depends on
    (seed, k) alone, so pairs ``start`` ... ``start + n_pairs - 1`` of a longer list can be rendered on their own.

    Returns ``images`` uint8 [2n, 64, 64, 3], ``parsing`` uint8 [2n, 64, 64], ``landmarks`` float32 [2n, K, 2],
    ``labels`` int64 [2n, n_attributes] (unseen values ``IGNORE``), ``identity`` int64 [2n] and ``attrs``.
    """
    from fastface.data.attributes import sample_attributes
    from fastface.data.renderer import LANDMARKS, render

    faces, attrs_list = [], []
    for k in range(start, start + n_pairs):
        rng = np.random.default_rng([int(seed), k, 0x1D2])
        identity = identity_offset + int(rng.integers(n_identities))
        for _ in range(2):
            attrs = sample_attributes(rng, identity=identity)
            faces.append(render(attrs, seed=int(rng.integers(2**31))))
            attrs_list.append(attrs)
    images = np.stack([f.image for f in faces]) if faces else np.zeros((0, 64, 64, 3), np.uint8)
    parsing = np.stack([f.parsing for f in faces]) if faces else np.zeros((0, 64, 64), np.uint8)
    landmarks = np.stack([f.landmarks for f in faces]) if faces else np.zeros((0, len(LANDMARKS), 2), np.float32)
    return {"images": images, "parsing": parsing, "landmarks": landmarks, "labels": visible_labels(attrs_list),
            "identity": np.array([a.identity for a in attrs_list], dtype=np.int64), "attrs": attrs_list}


def held_out_faces(n: int, seed: int = 10_000) -> dict:
    """``n`` face-world renders of identities never trained on (``make_dataset`` layout, no captions)."""
    from fastface.data.dataset import make_dataset

    return make_dataset(n, seed, n_identities=N_IDENTITIES - HELD_OUT_IDENTITIES,
                        identity_offset=HELD_OUT_IDENTITIES, captions=False)


def augment(x: torch.Tensor, gen: torch.Generator, *, shift: int = 2, flip: bool = True, jitter: float = 0.06,
            noise: float = 0.03) -> torch.Tensor:
    """Light augmentation of float images [B, 3, S, S] in [0, 1]: shift by up to ``shift`` px (edge pixels
    repeat), mirror, brightness/contrast in 1 +- ``jitter``, Gaussian pixel noise of std up to ``noise``."""
    B, _, S, _ = x.shape
    if shift:
        pad = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        off = torch.randint(0, 2 * shift + 1, (B, 2), generator=gen)
        rows = (off[:, 0, None] + torch.arange(S))[:, :, None].expand(B, S, S)  # [B, S, S]
        cols = (off[:, 1, None] + torch.arange(S))[:, None, :].expand(B, S, S)
        flat = (rows * (S + 2 * shift) + cols).view(B, 1, S * S).expand(B, 3, S * S)
        x = pad.flatten(2).gather(2, flat).view(B, 3, S, S)
    if flip:
        mirror = torch.rand(B, generator=gen) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    if jitter:
        bright = 1 + jitter * (2 * torch.rand(B, 1, 1, 1, generator=gen) - 1)
        contrast = 1 + jitter * (2 * torch.rand(B, 1, 1, 1, generator=gen) - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean * bright
    if noise:
        x = x + noise * torch.rand(B, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def identity_loss(e_id: torch.Tensor, identity: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over a batch of unit embeddings [B, D]: each row's positives are the other rows of its identity."""
    sim = e_id @ e_id.t() / temperature  # [B, B]
    eye = torch.eye(len(identity), dtype=torch.bool, device=e_id.device)
    same = (identity[:, None] == identity[None, :]) & ~eye
    has_pos = same.any(1)
    if not bool(has_pos.any()):
        return e_id.sum() * 0.0
    logp = torch.log_softmax(sim.masked_fill(eye, float("-inf")), dim=1)
    pos = (logp.masked_fill(~same, 0.0).sum(1) / same.sum(1).clamp_min(1))[has_pos]
    return -pos.mean()


def attribute_losses(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each head [n_attributes] (``IGNORE`` labels not scored; NaN where a head has no label)."""
    out = []
    for k, lg in enumerate(logits):
        y = labels[:, k]
        has = bool((y != IGNORE).any())
        out.append(F.cross_entropy(lg, y, ignore_index=IGNORE) if has else lg.new_full((), float("nan")))
    return torch.stack(out)


def attribute_loss(logits: list[torch.Tensor], labels: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over attributes of the cross-entropy of each head (``IGNORE`` labels not scored), each head's term
    multiplied by ``weights[k]`` when given (heads without labels drop out of the mean)."""
    losses = attribute_losses(logits, labels)
    keep = ~torch.isnan(losses)
    if not bool(keep.any()):
        raise ValueError("attribute_loss: every label in the batch is IGNORE")
    if weights is not None:
        if weights.shape != losses.shape:
            raise ValueError(f"weights must have shape {tuple(losses.shape)}, got {tuple(weights.shape)}")
        losses = losses * weights.to(losses.dtype)
    return losses[keep].mean()


def balanced_weights(running: torch.Tensor, cap: float = 10.0) -> torch.Tensor:
    """Per-attribute loss weights from running cross-entropies [n_attributes]: proportional to each head's
    running loss, scaled to mean 1 over the heads, then capped at ``cap`` (a head near chance pulls harder than a
    learned one).
    """
    if running.dim() != 1 or not bool(torch.isfinite(running).all()) or bool((running < 0).any()):
        raise ValueError(f"running losses must be a finite non-negative vector, got {running}")
    w = running / running.mean().clamp_min(1e-8)
    return w.clamp(max=cap)


# -------------------------------------------------------------------------------------- evaluation

def accuracy_table(pred: np.ndarray, labels: np.ndarray, names=None) -> dict[str, dict]:
    """Per-attribute accuracy of predicted labels [n, A] against labels [n, A] (``IGNORE`` not scored).

    Returns ``{attribute: {"accuracy": float | None, "count": int}}``.
    """
    names = list(ATTRIBUTES) if names is None else list(names)
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape or pred.ndim != 2 or pred.shape[1] != len(names):
        raise ValueError(f"pred {pred.shape} and labels {labels.shape} must both be [n, {len(names)}]")
    out = {}
    for k, name in enumerate(names):
        keep = labels[:, k] != IGNORE
        n = int(keep.sum())
        out[name] = {"accuracy": float((pred[keep, k] == labels[keep, k]).mean()) if n else None, "count": n}
    return out


def mean_accuracy(table: dict[str, dict]) -> float:
    values = [row["accuracy"] for row in table.values() if row["accuracy"] is not None]
    return float(np.mean(values)) if values else float("nan")


# -------------------------------------------------------------------------------------- training

def train_classifier(config: PerceptionConfig | None = None, *, steps: int = 6000, batch_size: int = 64,
                     lr: float = 1e-3, weight_decay: float = 1e-4, n_pairs: int = 10000, n_eval: int = 2000,
                     seed: int = 0, threads: int | None = 1, time_limit: float | None = None, log_every: int = 100,
                     out=None, train_data: dict | None = None, eval_data: dict | None = None,
                     balance: bool = True, log=print) -> tuple[AttributeClassifier, dict]:
    """Train an ``AttributeClassifier`` on face-world renders; returns (model in eval mode, metrics).

    Data: ``identity_pairs(n_pairs, seed)`` (identities below ``HELD_OUT_IDENTITIES``), augmented by
    ``augment``; batches hold whole pairs. Held-out: ``held_out_faces(n_eval, 10_000 + seed)``. AdamW with
    warm-up and cosine decay to 1% of ``lr`` (``lr_at``); stops after ``steps`` or ``time_limit`` seconds (the
    decay then follows the clock). With ``balance`` the heads' cross-entropies are weighted by
    ``balanced_weights`` of their running (EMA) values. ``train_data`` / ``eval_data`` (dicts with ``images``,
    ``labels`` and for training ``identity``) replace the rendered sets. With ``out`` the model is saved there.
    Metrics: per-attribute held-out accuracy, its mean, steps, wall time.
    """
    config = config if config is not None else PerceptionConfig()
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    if train_data is None:
        train_data = identity_pairs(n_pairs, seed)
    if eval_data is None:
        eval_data = held_out_faces(n_eval, 10_000 + seed)
    images = torch.from_numpy(np.ascontiguousarray(train_data["images"]))
    labels = torch.from_numpy(np.asarray(train_data["labels"], dtype=np.int64))
    identity = torch.from_numpy(np.asarray(train_data.get("identity", np.arange(len(images))), dtype=np.int64))
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 training images, got {n}")
    log(f"data: {n} train / {len(eval_data['images'])} held-out faces in {time.perf_counter() - t_start:.1f} s")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AttributeClassifier(config).to(memory_format=torch.channels_last)
    decay = [p for name, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for name, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=lr, betas=(0.9, 0.99))
    n_pair_rows = n // 2
    pairs_per_batch = max(1, batch_size // 2)
    warmup = max(1, min(200, steps // 20))
    running = torch.tensor([math.log(k) for k in config.num_values])  # each head starts at chance
    t0 = time.perf_counter()
    losses, id_losses = [], []
    step = 0
    model.train()
    for step in range(1, steps + 1):
        elapsed = time.perf_counter() - t0
        if time_limit is not None and elapsed > time_limit:
            step -= 1
            break
        step_lr = lr_at(step - 1, lr=lr, warmup=warmup, total=steps, min_ratio=0.01,
                        time_fraction=None if time_limit is None else elapsed / time_limit)
        for group in opt.param_groups:
            group["lr"] = step_lr
        pick = torch.randint(0, n_pair_rows, (pairs_per_batch,), generator=gen)
        idx = torch.stack([2 * pick, 2 * pick + 1], dim=1).flatten()
        x = augment(images[idx].permute(0, 3, 1, 2).float() / 255.0, gen)
        x = ((x - model.pixel_mean) / model.pixel_std).contiguous(memory_format=torch.channels_last)
        logits, e_id = model(x)
        per_head = attribute_losses(logits, labels[idx])
        seen = ~torch.isnan(per_head)
        ce = per_head[seen].mean()  # logged unweighted
        if balance:
            running = torch.where(seen, 0.98 * running + 0.02 * per_head.detach().nan_to_num(), running)
            ce_train = (per_head[seen] * balanced_weights(running)[seen]).mean()
        else:
            ce_train = ce
        idl = identity_loss(e_id, identity[idx], config.id_temperature)
        loss = ce_train + config.id_weight * idl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(ce.detach()))
        id_losses.append(float(idl.detach()))
        if log_every and step % log_every == 0:
            rate = step * len(idx) / (time.perf_counter() - t0)
            log(f"step {step:6d}  ce {np.mean(losses[-log_every:]):.4f}  id {np.mean(id_losses[-log_every:]):.3f}"
                f"  lr {opt.param_groups[0]['lr']:.2e}  {rate:.0f} img/s  {time.perf_counter() - t0:.0f} s"
                + (f"  hardest {config.attributes[int(running.argmax())]} {float(running.max()):.3f}"
                   if balance else ""))
    train_time = time.perf_counter() - t0
    model = model.to(memory_format=torch.contiguous_format).eval()
    eval_labels = visible_labels(eval_data["attrs"]) if "attrs" in eval_data else eval_data["labels"]
    table = accuracy_table(model.predict_labels(eval_data["images"]), eval_labels, config.attributes)
    metrics = {
        "held_out_mean_accuracy": mean_accuracy(table),
        "held_out_accuracy": {k: v["accuracy"] for k, v in table.items()},
        "held_out_faces": int(len(eval_data["images"])),
        "train_faces": int(n),
        "steps": step,
        "batch_size": int(len(idx)) if step else batch_size,
        "train_seconds": round(train_time, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_train_ce": float(np.mean(losses[-100:])) if losses else None,
        "final_identity_loss": float(np.mean(id_losses[-100:])) if id_losses else None,
        "balanced": bool(balance),
        "final_head_weights": ({k: round(float(w), 3) for k, w in zip(config.attributes, balanced_weights(running))}
                               if balance else None),
    }
    log("metrics: " + json.dumps(metrics))
    if out is not None:
        model.save(out)
        log(f"saved {out}")
    return model, metrics


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="train or check the face-world attribute classifier")
    parser.add_argument("--train", action="store_true", help="train a classifier and save it to --out")
    parser.add_argument("--preset", default="face-s", choices=sorted(PRESETS))
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=10000, help="training pairs (2 faces of one person each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-balance", action="store_true",
                        help="plain mean of the heads' cross-entropies (default: weighted by their running loss)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core box: no spinning between threads)")
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="report per-attribute accuracy of --out on N held-out renders")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        config = PerceptionConfig(**PRESETS[args.preset])
        train_classifier(config, steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_pairs=args.pairs,
                         seed=args.seed, threads=args.threads, balance=not args.no_balance,
                         time_limit=None if args.minutes is None else 60 * args.minutes, out=args.out)
    if args.eval:
        model = AttributeClassifier.load(args.out)
        data = held_out_faces(args.eval, 20_000 + args.seed)
        pred = model.predict_labels(data["images"])
        table = accuracy_table(pred, visible_labels(data["attrs"]))
        every = accuracy_table(pred, data["labels"])
        print(f"held-out accuracy over {args.eval} faces (mean {100 * mean_accuracy(table):.2f}% over what the "
              f"pictures show; {100 * mean_accuracy(every):.2f}% counting eye colour behind sunglasses):")
        for name, row in table.items():
            print(f"  {name:14s} {100 * row['accuracy']:6.2f}%  (n={row['count']})")


if __name__ == "__main__":
    _main()
