"""Training and evaluating Faceptor (``fastface.perception.faceptor``) on face-world renders.

    python -m fastface.perception.faceptor_train --train --out runs/faceptor --steps 6000       # resumable
    python -m fastface.perception.faceptor_train --export runs/faceptor --to faceptor.safetensors
    python -m fastface.perception.faceptor_train --eval faceptor.safetensors --faces 1000       # held-out table

Data: ``identity_pairs`` renders (two faces of one person per pair: identity kept, hair, accessories, makeup,
pose and lighting redrawn), identities below ``HELD_OUT_IDENTITIES``; each face carries its parsing mask, its
landmarks and its attribute labels. Augmentation: mirroring (the mask mirrored, landmarks mirrored and their
left/right names swapped) and brightness, contrast and noise jitter.

Losses, summed: parsing cross-entropy plus a soft Dice term (the Dice term keeps thin classes — brows, glasses
frames, earrings — from drowning in skin and background); landmarks: L1 in pixels of the soft-argmax position
plus 0.1 x the heatmap's cross-entropy against the true point splatted bilinearly on its 4 pixels (the splat's
mean is the point); attributes: the mean cross-entropy of the heads weighted by their running loss
(``balanced_weights``, as the attribute classifier); identity: InfoNCE over the batch's pairs.

Label sparsity for the auxiliary-supervision experiment: ``label_fraction={"age": 0.05}`` keeps the age label of
5% of the training faces (a fixed subset) and ignores the rest; ``tasks`` trains a subset of the tasks.

A run directory holds ``state.safetensors`` (weights and AdamW moments) and ``state.json`` (step, settings,
running head losses); every ``save_every`` steps both are rewritten atomically, and ``--train`` on a directory
that has them continues exactly where it stopped (batches are a function of (seed, step)).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastface.data.attributes import ATTRIBUTES, N_IDENTITIES
from fastface.lr_schedule import lr_at
from fastface.perception.faceptor import PRESETS, TASKS, Faceptor, FaceptorConfig
from fastface.perception.model import DEFAULT_PATH as CLASSIFIER_PATH
from fastface.perception.model import IGNORE, AttributeClassifier
from fastface.perception.perceptor import Perceptor
from fastface.perception.train import (
    HELD_OUT_IDENTITIES,
    accuracy_table,
    attribute_losses,
    augment,
    balanced_weights,
    identity_loss,
    identity_pairs,
    mean_accuracy,
)
from fastface.train import read_run_state, write_run_state
from fastface.weights import atomic_write

EVAL_SEED = 30_000  # held-out pairs: identities >= HELD_OUT_IDENTITIES, seed apart from the classifier's


# ------------------------------------------------------------------------------------------ data

def mirror_permutation(names) -> list[int]:
    """Index of each landmark's mirror image (``left_*`` <-> ``right_*``, others themselves)."""
    names = list(names)
    swap = {"left": "right", "right": "left"}
    out = []
    for name in names:
        parts = name.split("_")
        mirrored = "_".join(swap.get(p, p) for p in parts)
        out.append(names.index(mirrored) if mirrored in names else names.index(name))
    return out


def held_out_pairs(n_faces: int, seed: int = EVAL_SEED) -> dict:
    """``n_faces`` renders (``n_faces // 2`` pairs of one person) of identities never trained on."""
    return identity_pairs(n_faces // 2, seed, n_identities=N_IDENTITIES - HELD_OUT_IDENTITIES,
                          identity_offset=HELD_OUT_IDENTITIES)


def load_or_render(cache: Path | None, n_pairs: int, seed: int, log=print) -> dict:
    """``identity_pairs(n_pairs, seed)`` arrays, read from / written to ``cache`` (.npz, no pickle) when given."""
    keys = ("images", "parsing", "landmarks", "labels", "identity")
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            data = {k: f[k] for k in keys}
        if len(data["images"]) == 2 * n_pairs:
            return data
        log(f"{cache}: holds {len(data['images']) // 2} pairs, not {n_pairs}; rendering again")
    t0 = time.perf_counter()
    data = identity_pairs(n_pairs, seed)
    data = {k: data[k] for k in keys}
    log(f"rendered {2 * n_pairs} faces in {time.perf_counter() - t0:.0f} s")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda p: np.savez(open(p, "wb"), **data))
    return data


# ------------------------------------------------------------------------------------------ losses

def parsing_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice (mean over the classes present in the batch) of logits [B, C, S, S] against
    int64 labels [B, S, S]."""
    ce = F.cross_entropy(logits, target)
    p = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * onehot).sum(dim=(0, 2, 3))
    total = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = 1 - (2 * inter[present] + 1) / (total[present] + 1)
    return ce + dice.mean()


def splat(points: torch.Tensor, size: int) -> torch.Tensor:
    """Points (x, y) [B, K, 2] in pixel coordinates -> bilinear weights on the pixel grid [B, K, S*S] (each row
    sums to 1 and has mean position ``points``; points are clamped into the image)."""
    p = points.clamp(0, size - 1)
    x0, y0 = p[..., 0].floor().clamp(max=size - 2), p[..., 1].floor().clamp(max=size - 2)
    fx, fy = p[..., 0] - x0, p[..., 1] - y0
    out = points.new_zeros(*points.shape[:2], size * size)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        idx = ((y0 + dy) * size + (x0 + dx)).long()
        out.scatter_add_(2, idx.unsqueeze(2), w.unsqueeze(2))
    return out


def landmark_loss(pred: torch.Tensor, heatmaps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 (pixels) of predicted points [B, K, 2] + 0.1 x heatmap cross-entropy against the bilinear splat."""
    S = heatmaps.shape[-1]
    ce = -(splat(target, S) * torch.log_softmax(heatmaps.float().flatten(2), dim=2)).sum(2).mean()
    return (pred - target).abs().sum(-1).mean() + 0.1 * ce


# -------------------------------------------------------------------------------------- evaluation

def landmark_nme(pred: np.ndarray, target: np.ndarray, names) -> float:
    """Mean point error over faces and points, each face's errors divided by its inter-ocular distance."""
    names = list(names)
    le, re = names.index("left_eye"), names.index("right_eye")
    iod = np.linalg.norm(target[:, le] - target[:, re], axis=1)  # [n]
    err = np.linalg.norm(pred - target, axis=2).mean(1)  # [n]
    return float((err / iod).mean())


def parsing_iou(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class IoU [C] accumulated over every pixel of every face (NaN for a class absent from both)."""
    p, t = pred.reshape(-1).astype(np.int64), target.reshape(-1).astype(np.int64)
    inter = np.bincount(p[p == t], minlength=n_classes)[:n_classes]
    union = np.bincount(p, minlength=n_classes)[:n_classes] + np.bincount(t, minlength=n_classes)[:n_classes] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def verification(e_id: np.ndarray, identity: np.ndarray, far: float = 0.01) -> dict:
    """TAR at ``far`` over every pair of faces: genuine pairs share an identity, impostors do not; the threshold
    is the impostor similarity exceeded by a ``far`` share of impostor pairs."""
    sim = e_id @ e_id.T
    iu = np.triu_indices(len(identity), k=1)
    s, same = sim[iu], identity[iu[0]] == identity[iu[1]]
    if not same.any() or same.all():
        raise ValueError("verification needs both genuine and impostor pairs")
    threshold = float(np.quantile(s[~same], 1 - far))
    return {"tar": float((s[same] > threshold).mean()), "far": far, "threshold": threshold,
            "genuine_pairs": int(same.sum()), "impostor_pairs": int((~same).sum()),
            "genuine_mean": float(s[same].mean()), "impostor_mean": float(s[~same].mean())}


def evaluate(model: Faceptor, data: dict, tasks=TASKS) -> dict:
    """Held-out metrics of every task in ``tasks`` on ``data`` (``identity_pairs`` layout)."""
    cfg = model.config
    was_training = model.training
    pred = {k: v.numpy() for k, v in Perceptor(model).run(data["images"], batch_size=128, tasks=tasks).items()}
    model.train(was_training)
    out: dict = {"faces": int(len(data["images"]))}
    if "landmarks" in pred:
        out["landmark_nme"] = landmark_nme(pred["landmarks"], data["landmarks"], cfg.landmarks)
        out["landmark_error_px"] = float(np.linalg.norm(pred["landmarks"] - data["landmarks"], axis=2).mean())
    if "parsing" in pred:
        iou = parsing_iou(pred["parsing"], data["parsing"], len(cfg.parsing_classes))
        out["parsing_miou"] = float(np.nanmean(iou))
        out["parsing_iou"] = {c: (None if np.isnan(v) else float(v)) for c, v in zip(cfg.parsing_classes, iou)}
    if "attributes" in pred:
        table = accuracy_table(pred["attributes"], data["labels"], cfg.attributes)
        out["attribute_accuracy"] = {k: v["accuracy"] for k, v in table.items()}
        out["attribute_mean"] = mean_accuracy(table)
    if "identity" in pred:
        out["verification"] = verification(pred["identity"], np.asarray(data["identity"]))
    return out


# -------------------------------------------------------------------------------------- training

@dataclass
class FaceptorTrainSettings:
    preset: str = "face-s"
    steps: int = 6000
    batch_size: int = 64  # faces per step (whole pairs)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    n_pairs: int = 60_000
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    label_fraction: dict = field(default_factory=dict)  # {attribute: share of training faces keeping its label}
    train_attributes: tuple[str, ...] | None = None  # attribute heads trained (None: all; others see no labels)
    identity_weight: float = 0.5
    init: str | None = None  # start from these exported weights (a fresh optimiser and schedule)
    save_every: int = 250
    log_every: int = 50

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        for name, frac in self.label_fraction.items():
            if name not in ATTRIBUTES or not 0 < float(frac) <= 1:
                raise ValueError(f"label_fraction[{name!r}]={frac!r}: need an attribute and a share in (0, 1]")
        if self.train_attributes is not None:
            self.train_attributes = tuple(self.train_attributes)
            bad = [a for a in self.train_attributes if a not in ATTRIBUTES]
            if bad or not self.train_attributes:
                raise ValueError(f"train_attributes must be a non-empty subset of the attributes, got {bad or '()'}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown Faceptor preset {self.preset!r}; choose one of {sorted(PRESETS)}")


def sparse_labels(labels: np.ndarray, fractions: dict, seed: int, keep_attributes=None) -> np.ndarray:
    """``labels`` with each named attribute kept on a fixed random ``fraction`` of the rows, ``IGNORE`` elsewhere;
    with ``keep_attributes`` every other attribute is ``IGNORE`` everywhere."""
    labels = labels.copy()
    names = list(ATTRIBUTES)
    if keep_attributes is not None:
        for k, name in enumerate(names):
            if name not in keep_attributes:
                labels[:, k] = IGNORE
    rng = np.random.default_rng([int(seed), 0x5A])
    for name, frac in fractions.items():
        keep = rng.random(len(labels)) < float(frac)
        labels[~keep, names.index(name)] = IGNORE
    return labels


def _save_state(out: Path, model, opt, step: int, running: torch.Tensor, settings: FaceptorTrainSettings):
    write_run_state(out, model, opt, step, asdict(settings), model.config.to_dict(), running=running.tolist())


def train_faceptor(settings: FaceptorTrainSettings, out: Path, *, data: dict | None = None, cache: Path | None = None,
                   max_minutes: float | None = None, stop_at: int | None = None, log=print) -> Faceptor:
    """Train (or continue training) a Faceptor in run directory ``out``; returns the model in eval mode.

    Stops after ``settings.steps``, after ``max_minutes`` or at step ``stop_at`` (an interruption: the state is
    saved and a later call continues exactly)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_or_render(cache, settings.n_pairs, settings.seed, log)
    images = torch.from_numpy(np.ascontiguousarray(data["images"]))
    parsing = torch.from_numpy(np.ascontiguousarray(data["parsing"])).long()
    landmarks = torch.from_numpy(np.ascontiguousarray(data["landmarks"], dtype=np.float32))
    labels = torch.from_numpy(sparse_labels(np.asarray(data["labels"]), settings.label_fraction, settings.seed,
                                          settings.train_attributes))
    identity = torch.from_numpy(np.asarray(data["identity"], dtype=np.int64))
    n_pairs = len(images) // 2
    torch.manual_seed(settings.seed)  # the initial weights follow the seed
    if settings.init is not None:
        model = Perceptor.load(settings.init).model.train()
        log(f"initialised from {settings.init}")
    else:
        model = Faceptor.from_name(settings.preset)
    cfg = model.config
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and n != "layer_attention"]
    other = [p for n, p in model.named_parameters() if not (p.dim() > 1 and n != "layer_attention")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.99))
    running = torch.tensor([math.log(k) for k in cfg.num_values])
    start = read_run_state(out, model, opt, asdict(settings), asdict(FaceptorTrainSettings()), log)
    if start:
        running = torch.tensor(json.loads((out / "state.json").read_text())["running"])
    model = model.to(memory_format=torch.channels_last).train()
    mirror = mirror_permutation(cfg.landmarks)
    S = cfg.image_size
    tasks = settings.tasks
    t0, logs = time.perf_counter(), []
    step = start
    for step in range(start, settings.steps):
        if (max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes) or \
                (stop_at is not None and step >= stop_at):
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=settings.lr, warmup=settings.warmup, total=settings.steps, min_ratio=0.01)
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        pick = torch.randint(0, n_pairs, (max(1, settings.batch_size // 2),), generator=gen)
        idx = torch.stack([2 * pick, 2 * pick + 1], dim=1).flatten()
        x = images[idx].permute(0, 3, 1, 2).float() / 255.0
        y_parse, y_lm = parsing[idx], landmarks[idx].clone()
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        y_parse = torch.where(flip[:, None, None], y_parse.flip(2), y_parse)
        y_lm = torch.where(flip[:, None, None], y_lm[:, mirror] * torch.tensor([-1.0, 1.0]) + torch.tensor(
            [S - 1.0, 0.0]), y_lm)
        x = augment(x, gen, shift=0, flip=False)
        x = ((x - model.pixel_mean) / model.pixel_std).contiguous(memory_format=torch.channels_last)
        outputs = model(x, tasks=tasks)
        terms = {}
        if "parsing" in outputs:
            terms["parsing"] = parsing_loss(outputs["parsing"], y_parse)
        if "landmarks" in outputs:
            terms["landmarks"] = landmark_loss(outputs["landmarks"], outputs["heatmaps"], y_lm)
        if "attributes" in outputs:
            per_head = attribute_losses(outputs["attributes"], labels[idx])
            seen = ~torch.isnan(per_head)
            running = torch.where(seen, 0.98 * running + 0.02 * per_head.detach().nan_to_num(), running)
            if bool(seen.any()):
                terms["attributes"] = (per_head[seen] * balanced_weights(running)[seen]).mean()
            else:  # sparse labels: no face of this batch has one (0.95 ** 64 = 4% of batches at 5%)
                terms["attributes"] = sum(a.sum() for a in outputs["attributes"]) * 0.0
        if "identity" in outputs:
            terms["identity"] = settings.identity_weight * identity_loss(outputs["identity"], identity[idx], 0.1)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        logs.append({k: float(v.detach()) for k, v in terms.items()})
        done = step + 1
        if settings.log_every and done % settings.log_every == 0:
            mean = {k: round(float(np.mean([r[k] for r in logs[-settings.log_every:]])), 4) for k in terms}
            rate = (done - start) * len(idx) / (time.perf_counter() - t0)
            line = {"step": done, **mean, "lr": round(opt.param_groups[0]["lr"], 6), "img_s": round(rate, 1),
                    "hardest": cfg.attributes[int(running.argmax())]}
            log(json.dumps(line))
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        if done % settings.save_every == 0 or done == settings.steps:
            _save_state(out, model.to(memory_format=torch.contiguous_format), opt, done, running, settings)
            model = model.to(memory_format=torch.channels_last)
        step = done
    if step != start and step % settings.save_every and step != settings.steps:
        _save_state(out, model.to(memory_format=torch.contiguous_format), opt, step, running, settings)
    return model.to(memory_format=torch.contiguous_format).eval()


def run_state(out: Path) -> tuple[Faceptor, dict]:
    """The model saved in run directory ``out`` and its state.json."""
    meta = json.loads((Path(out) / "state.json").read_text())
    model = Faceptor(FaceptorConfig.from_dict(meta["config"]))
    read_run_state(Path(out), model, None, None, None)
    return model.eval(), meta


def export_run(run: Path, to: Path, *, faces: int = 1000, dtype: torch.dtype | None = None, log=print) -> Perceptor:
    """Write run ``run``'s weights to ``to`` with the verification threshold at FAR 1% and the held-out metrics
    (``faces`` renders of unseen people) in its config; returns the exported Perceptor. ``dtype``: store the
    floating tensors in it (bfloat16 halves the file); the metrics are then measured on the rounded weights."""
    model, meta = run_state(run)
    if dtype is not None:
        model = model.to(dtype).float()  # the weights as they will be read back
    data = held_out_pairs(faces)
    metrics = evaluate(model, data)
    if CLASSIFIER_PATH.is_file():  # the judge: the Faceptor where it reads an attribute at least as well
        table = accuracy_table(AttributeClassifier.load().predict_labels(data["images"]), data["labels"])
        theirs = {k: v["accuracy"] for k, v in table.items()}
        metrics["classifier_attribute_accuracy"] = theirs
        metrics["judge_attributes"] = [a for a, acc in metrics["attribute_accuracy"].items()
                                       if acc is not None and theirs.get(a) is not None and acc >= theirs[a]]
    model.config.verify_threshold = round(metrics["verification"]["threshold"], 6)
    model.config.metrics = {**metrics, "steps": meta["step"], "settings": meta["settings"]}
    perceptor = Perceptor(model)
    perceptor.save(to, dtype=dtype)
    log(f"wrote {to}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return perceptor


def metrics_markdown(metrics: dict) -> str:
    """Markdown tables of ``evaluate`` metrics (per task, parsing per class, attributes per attribute)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| task | metric | value |", "|---|---|---:|"]
    if "landmark_nme" in metrics:
        lines.append(f"| landmarks | NME (inter-ocular) | {pct(metrics['landmark_nme'])} "
                     f"({metrics['landmark_error_px']:.2f} px mean error) |")
    if "parsing_miou" in metrics:
        lines.append(f"| parsing | mIoU ({len(metrics['parsing_iou'])} classes) | {pct(metrics['parsing_miou'])} |")
    acc = metrics.get("attribute_accuracy", {})
    for name in ("age", "expression"):
        if name in acc:
            lines.append(f"| {name} | accuracy | {pct(acc[name])} |")
    if acc:
        worst = min((v, k) for k, v in acc.items() if v is not None)
        lines.append(f"| attributes | mean of {len(acc)} (lowest: {worst[1]} {pct(worst[0])}) | "
                     f"{pct(metrics['attribute_mean'])} |")
    if "verification" in metrics:
        v = metrics["verification"]
        lines.append(f"| identity | TAR at FAR {pct(v['far'])} ({v['genuine_pairs']} genuine, {v['impostor_pairs']} "
                     f"impostor pairs; threshold {v['threshold']:.3f}) | {pct(v['tar'])} |")
    if "parsing_iou" in metrics:
        lines += ["", "| parsing class | IoU |", "|---|---:|"]
        lines += [f"| {c} | {pct(v)} |" for c, v in metrics["parsing_iou"].items()]
    if acc:
        theirs = metrics.get("classifier_attribute_accuracy", {})
        lines += ["", "| attribute | Faceptor | attribute classifier | judge reads it from |", "|---|---:|---:|---|"]
        judged = set(metrics.get("judge_attributes", ()))
        lines += [f"| {a} | {pct(v)} | {pct(theirs.get(a))} | {'Faceptor' if a in judged else 'classifier'} |"
                  for a, v in acc.items()]
    return "\n".join(lines) + "\n"


def _main(argv=None) -> int:
    import argparse

    from fastface.checks import arg_positive_float, arg_positive_int

    p = argparse.ArgumentParser(description="train, export or evaluate the Faceptor perception model")
    p.add_argument("--train", action="store_true", help="train (or continue) the run in --out")
    p.add_argument("--out", default=None, help="run directory (weights, optimiser state, log)")
    p.add_argument("--preset", default="face-s", choices=sorted(PRESETS))
    p.add_argument("--steps", type=arg_positive_int, default=6000)
    p.add_argument("--batch-size", type=arg_positive_int, default=64)
    p.add_argument("--lr", type=arg_positive_float, default=2e-3)
    p.add_argument("--pairs", type=arg_positive_int, default=60_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--label-fraction", action="append", default=[], metavar="ATTR=FRACTION",
                   help="keep ATTR's label on this share of training faces (the auxiliary-supervision experiment)")
    p.add_argument("--train-attributes", default=None, metavar="A,B",
                   help="train only these attribute heads (the others see no labels)")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="start from an exported Faceptor (a fresh optimiser and schedule; --preset is ignored)")
    p.add_argument("--cache", default=None, help="rendered training pairs (.npz), reused between runs")
    p.add_argument("--minutes", type=arg_positive_float, default=None, help="stop (resumably) after this long")
    p.add_argument("--threads", type=arg_positive_int, default=1)
    p.add_argument("--export", default=None, metavar="RUN", help="write RUN's weights to --to with measured metrics")
    p.add_argument("--to", default=None, help="safetensors file for --export")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="--export: the stored dtype of the weights (loaded as float32 either way)")
    p.add_argument("--eval", default=None, metavar="FILE_OR_RUN", help="held-out metrics of a model file or run")
    p.add_argument("--faces", type=arg_positive_int, default=1000, help="held-out faces for --eval / --export")
    p.add_argument("--markdown", action="store_true", help="--eval prints markdown tables instead of JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        if args.out is None:
            p.error("--train needs --out RUN_DIR")
        fractions = {}
        for item in args.label_fraction:
            name, _, value = item.partition("=")
            try:
                fractions[name] = float(value)
            except ValueError:
                p.error(f"--label-fraction {item!r}: expected ATTR=FRACTION")
        settings = FaceptorTrainSettings(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                         n_pairs=args.pairs, seed=args.seed, tasks=tuple(args.tasks.split(",")),
                                         label_fraction=fractions, init=args.init,
                                         train_attributes=tuple(args.train_attributes.split(","))
                                         if args.train_attributes else None)
        train_faceptor(settings, Path(args.out), cache=Path(args.cache) if args.cache else None,
                       max_minutes=args.minutes)
    if args.export:
        if args.to is None:
            p.error("--export needs --to FILE.safetensors")
        export_run(Path(args.export), Path(args.to), faces=args.faces,
                   dtype=torch.bfloat16 if args.store_dtype == "bfloat16" else None)
    if args.eval:
        path = Path(args.eval)
        model = run_state(path)[0] if path.is_dir() else Perceptor.load(path).model
        metrics = evaluate(model, held_out_pairs(args.faces))
        print(metrics_markdown(metrics) if args.markdown else json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
