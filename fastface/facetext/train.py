"""Training and evaluating the face-text model (``fastface.facetext.model``) on face-world faces and captions.

    python -m fastface.facetext.train --train --out runs/facetext --steps 3000      # resumable
    python -m fastface.facetext.train --export runs/facetext --to fastface/assets/face-s/facetext.safetensors
    python -m fastface.facetext.train --eval fastface/assets/face-s/facetext.safetensors --faces 1000

Data: ``faces`` renders of training identities (dataset ``seed``); the locked image tower's attribute-query
states of each face are computed once (and kept in the run directory as ``features.npy``), mirrored faces
included (``flip_features``: each step reads the mirrored face's features for half the batch). Every step draws
a fresh caption for each face of the batch (``fastface.data.text.caption``: varied templates, orders and subsets
of about 12 attributes), so the text tower sees each face described many ways. A batch holds distinct faces.

Loss: symmetric InfoNCE with a learned temperature over the batch (CLIP). AdamW, warm-up then cosine
(``fastface.lr_schedule``).

Evaluation (``retrieval``): 1,000 held-out faces of unseen identities with their own captions; text->image and
image->text recall at 1, 5 and 10 (a caption's own face among 1,000 faces, and back).

A run directory holds ``state.safetensors`` (weights and AdamW moments) and ``state.json`` (step, settings);
both are rewritten atomically every ``save_every`` steps, and ``--train`` on such a directory continues exactly
(batches and captions are functions of (seed, step)).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastface.data.attributes import N_IDENTITIES
from fastface.facetext.model import (
    DEFAULT_PATH,
    PRESETS,
    FaceText,
    FaceTextConfig,
    FaceTextModel,
    contrastive_loss,
    pad_ids,
    tower_features,
)
from fastface.lr_schedule import lr_at
from fastface.perception.faceptor import fused_for_inference
from fastface.perception.perceptor import DEFAULT_PATH as FACEPTOR_PATH
from fastface.perception.perceptor import Perceptor
from fastface.perception.train import HELD_OUT_IDENTITIES
from fastface.train import read_run_state, write_run_state
from fastface.weights import atomic_write

EVAL_SEED = 10_000  # held-out faces (the judge's and VQA's held-out set: identities >= HELD_OUT_IDENTITIES)


@dataclass
class FaceTextTrainSettings:
    preset: str = "face-s"
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    faces: int = 40_000
    seed: int = 0
    tower: str = str(FACEPTOR_PATH)  # the locked image tower (an exported Faceptor)
    tokenizer: str = str(FACEPTOR_PATH.parent / "tokenizer.json")
    save_every: int = 250
    log_every: int = 50

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown face-text preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.batch_size < 2 or self.batch_size > self.faces:
            raise ValueError(f"batch_size must lie in [2, faces={self.faces}], got {self.batch_size}")


@torch.no_grad()
def image_features(tower, images: np.ndarray, *, flip: bool = False, batch: int = 256) -> torch.Tensor:
    """uint8 faces [n, S, S, 3] (mirrored with ``flip``) -> attribute query states [n, A, D] float32."""
    fast = fused_for_inference(tower)
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))
        if flip:
            x = x.flip(2)
        out.append(tower_features(fast, fast.to_input(x).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out) if out else torch.zeros(0)


def caption_batch(tokenizer, attrs, gen: torch.Generator, max_len: int):
    """A fresh caption of each face -> (ids [B, L], mask [B, L])."""
    from fastface.data.text import caption
    from fastface.tokenizer import encode_text

    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return pad_ids([encode_text(tokenizer, caption(a, rng, max_tokens=max_len)) for a in attrs], max_len)


def retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Row i of each is one pair -> recall at k both ways and the median rank of the right answer (1 = first)."""
    sim = image_emb.float() @ text_emb.float().T  # [n images, n texts]
    diag = sim.diagonal()
    t2i_rank = 1 + (sim > diag[None, :]).sum(0)  # per text j: images scoring above its own face
    i2t_rank = 1 + (sim > diag[:, None]).sum(1)  # per image i: texts scoring above its own caption
    out = {"n": int(sim.shape[0])}
    for name, rank in (("text_to_image", t2i_rank), ("image_to_text", i2t_rank)):
        out[name] = {f"R@{k}": float((rank <= k).float().mean()) for k in ks}
        out[name]["median_rank"] = float(rank.float().median())
    return out


def held_out(n: int) -> dict:
    from fastface.data.dataset import make_dataset

    return make_dataset(n, EVAL_SEED, n_identities=N_IDENTITIES - HELD_OUT_IDENTITIES,
                        identity_offset=HELD_OUT_IDENTITIES, captions=True)


def evaluate(model: FaceTextModel, faces: int = 1000, data: dict | None = None) -> dict:
    data = held_out(faces) if data is None else data
    return retrieval(model.embed_images(data["images"]), model.embed_texts(data["captions"]))


def train_facetext(settings: FaceTextTrainSettings, out: Path, *, data: dict | None = None,
                   max_minutes: float | None = None, stop_at: int | None = None, log=print) -> FaceTextModel:
    """Train (or continue) the face-text model in run directory ``out``; ``data`` (``make_dataset`` arrays with
    ``attrs``) replaces the renders (tests). Returns the model in eval mode."""
    from fastface.data.dataset import make_dataset
    from fastface.tokenizer import load_text_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tower = Perceptor.load(settings.tower).model
    tokenizer = load_text_tokenizer(settings.tokenizer)
    torch.manual_seed(settings.seed)
    model = FaceText.from_name(settings.preset, vocab_size=tokenizer.get_vocab_size(),
                               image_queries=len(tower.config.attributes), image_dim=tower.config.dim)
    cfg = model.config
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embed" not in n and n != "text.pos"]
    other = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embed" not in n and n != "text.pos")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    start = read_run_state(out, model, opt, asdict(settings), asdict(FaceTextTrainSettings()), log)
    if data is None:
        data = make_dataset(settings.faces, settings.seed, n_identities=HELD_OUT_IDENTITIES, captions=False)
    attrs = data["attrs"]
    feature_file = out / "features.npy"
    if feature_file.is_file():
        feats = torch.from_numpy(np.load(feature_file, allow_pickle=False))
    else:
        t0 = time.perf_counter()
        feats = torch.stack([image_features(tower, data["images"]), image_features(tower, data["images"], flip=True)])
        atomic_write(feature_file, lambda p: np.save(open(p, "wb"), feats.numpy()))
        log(f"image tower features of {len(attrs)} faces (and their mirror images) in "
            f"{time.perf_counter() - t0:.0f} s")
    if feats.shape[:2] != (2, len(attrs)):
        raise ValueError(f"{feature_file}: features of {feats.shape[1]} faces, the data has {len(attrs)}")
    model.train()
    t0, logs = time.perf_counter(), []
    step = start
    for step in range(start, settings.steps):
        if (max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes) or \
                (stop_at is not None and step >= stop_at):
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=settings.lr, warmup=settings.warmup, total=settings.steps, min_ratio=0.02)
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        idx = torch.randperm(len(attrs), generator=gen)[: settings.batch_size]
        flip = (torch.rand(len(idx), generator=gen) < 0.5).long()
        ids, mask = caption_batch(tokenizer, [attrs[i] for i in idx.tolist()], gen, cfg.max_text_len)
        image, text = model(feats[flip, idx], ids, mask)
        loss = contrastive_loss(image, text, model.scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        logs.append(float(loss.detach()))
        done = step + 1
        if settings.log_every and done % settings.log_every == 0:
            rate = (done - start) * len(idx) / (time.perf_counter() - t0)
            line = {"step": done, "loss": round(float(np.mean(logs[-settings.log_every:])), 4),
                    "scale": round(float(model.scale().detach()), 2), "lr": round(opt.param_groups[0]["lr"], 6),
                    "pairs_s": round(rate, 1)}
            log(json.dumps(line))
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        if done % settings.save_every == 0 or done == settings.steps:
            write_run_state(out, model, opt, done, asdict(settings), cfg.to_dict())
        step = done
    if step != start and step % settings.save_every and step != settings.steps:
        write_run_state(out, model, opt, step, asdict(settings), cfg.to_dict())
    model.eval()
    return FaceTextModel(model, tower, tokenizer)


def run_model(out: Path) -> FaceTextModel:
    """The model saved in run directory ``out`` with the tower and tokenizer its settings name."""
    from fastface.tokenizer import load_text_tokenizer

    meta = json.loads((Path(out) / "state.json").read_text())
    model = FaceText(FaceTextConfig.from_dict(meta["config"]))
    read_run_state(Path(out), model, None, None, None)
    settings = meta["settings"]
    return FaceTextModel(model.eval(), Perceptor.load(settings["tower"]).model,
                         load_text_tokenizer(settings["tokenizer"]))


def export_run(run: Path, to: Path, *, faces: int = 1000, log=print) -> FaceTextModel:
    """Write run ``run``'s trained parts to ``to`` (the tower and tokenizer must sit beside ``to`` under their
    names: the shipped ones do) with its held-out retrieval in the config."""
    meta = json.loads((Path(run) / "state.json").read_text())
    settings = meta["settings"]
    tower = Path(settings["tower"])
    if tower.resolve().parent != Path(to).resolve().parent:  # checked before the model is loaded and evaluated
        raise ValueError(f"--to {to}: must sit beside its image tower {tower}")
    ft = run_model(run)
    metrics = evaluate(ft, faces)
    ft.config.metrics = {"retrieval": metrics, "steps": meta["step"], "settings": settings}
    ft.config.tokenizer = Path(settings["tokenizer"]).name
    ft.save(to, tower_path=tower)
    log(f"wrote {to}: " + json.dumps(metrics))
    return ft


def _main(argv=None) -> int:
    import argparse

    from fastface.checks import arg_positive_float, arg_positive_int

    p = argparse.ArgumentParser(description="train, export or evaluate the face-text contrastive model")
    p.add_argument("--train", action="store_true", help="train (or continue) the run in --out")
    p.add_argument("--out", default=None, help="run directory (weights, optimiser state, features, log)")
    p.add_argument("--preset", default="face-s", choices=sorted(PRESETS))
    p.add_argument("--steps", type=arg_positive_int, default=3000)
    p.add_argument("--batch-size", type=arg_positive_int, default=256)
    p.add_argument("--lr", type=arg_positive_float, default=1e-3)
    p.add_argument("--faces", type=arg_positive_int, default=40_000, help="training faces")
    p.add_argument("--eval-faces", type=arg_positive_int, default=1000, help="held-out faces for --eval / --export")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tower", default=str(FACEPTOR_PATH), help="the exported Faceptor used as the locked image tower")
    p.add_argument("--minutes", type=arg_positive_float, default=None, help="stop (resumably) after this long")
    p.add_argument("--threads", type=arg_positive_int, default=1)
    p.add_argument("--export", default=None, metavar="RUN", help="write RUN's weights to --to with measured retrieval")
    p.add_argument("--to", default=str(DEFAULT_PATH), help="safetensors file for --export")
    p.add_argument("--eval", default=None, metavar="FILE_OR_RUN", help="held-out retrieval of a model file or run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        if args.out is None:
            p.error("--train needs --out RUN_DIR")
        settings = FaceTextTrainSettings(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                                         lr=args.lr, faces=args.faces, seed=args.seed, tower=args.tower)
        train_facetext(settings, Path(args.out), max_minutes=args.minutes)
    held = args.eval_faces
    if args.export:
        export_run(Path(args.export), Path(args.to), faces=held)
    if args.eval:
        path = Path(args.eval)
        model = run_model(path) if path.is_dir() else FaceTextModel.load(path)
        print(json.dumps(evaluate(model, held), indent=2))
    if not (args.train or args.export or args.eval):
        p.error("nothing to do: give --train, --export or --eval")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
