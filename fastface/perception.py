"""Perception: a small CNN that reads face-world attributes (and identity) from 64x64 faces.

    clf = AttributeClassifier.load("fastface/assets/face-s/perception.safetensors")
    values = clf.predict(images)            # uint8 [B, 64, 64, 3] -> {"gender": ["woman", …], "age": […], …}
    labels = clf.predict_labels(images)     # int64 [B, len(ATTRIBUTES)] value indices in ATTRIBUTES order
    e_sem, e_id = clf.embed(images)         # [B, sem_dim], [B, id_dim], both unit length

It is the judge of ``fastface eval`` (do generated faces show the prompted attributes?) and a source of the
semantic and identity embeddings the understanding experts take (``e_sem``, ``e_id``).

Design (B batch, C channels): a plain conv net, no pooling before the classifier, so the heads know *where*
a feature is (hat vs hair, lips vs cheeks):

- stem: fold each 2x2 pixel block into 12 channels (nothing is lost: the iris is ~4 px wide), conv3x3 to
  ``channels[0]`` at 32x32
- per further level: conv3x3 stride 2, conv3x3 (BatchNorm + ReLU after each): 16, 8, 4 px
- flatten the 4x4 map -> linear -> ``feature`` [B, sem_dim] (no activation: a ReLU there let 28 of 64 units die
  early in training, and the heads of slow attributes such as eyebrows never recovered); ``e_sem`` is that
  feature, l2-normalised
- one linear softmax head per attribute on the feature (``ATTRIBUTES`` order)
- identity head: MLP on the feature -> ``e_id`` [B, id_dim], l2-normalised; trained contrastively (InfoNCE)
  on pairs of renders of one person with different hair, accessories, makeup, pose and lighting

Training (``train_classifier``; ``python -m fastface.perception --train``): a fixed set of rendered pairs,
shifted by up to 2 px, mirrored, with small brightness, contrast and noise jitter; cross-entropy per head
(eye colour is not scored behind sunglasses: it cannot be seen), plus the identity loss. The heads are
balanced by their running loss (``balanced_weights``): an attribute still near chance gets a larger share of
the gradient than one already learned, so a thin-line attribute (eyebrow shape: chance for its first ~2000
steps) leaves its plateau instead of waiting behind 19 easy heads. Files are
safetensors with the config in their metadata (and beside them as JSON); never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastface.data.faceworld import ATTRIBUTES, N_IDENTITIES

DEFAULT_PATH = Path(__file__).parent / "assets" / "face-s" / "perception.safetensors"
HELD_OUT_IDENTITIES = int(N_IDENTITIES * 0.9)  # identities >= this are never trained on (shared with the VQ split)
IGNORE = -100  # label value that is not scored


@dataclass
class PerceptionConfig:
    """Shape and training hyper-parameters of the attribute classifier."""

    image_size: int = 64
    unshuffle: int = 2  # the stem folds each 2x2 pixel block into channels (64 px -> 32 px, 12 channels)
    channels: tuple[int, ...] = (32, 48, 96, 128)  # per level: 32, 16, 8, 4 px
    sem_dim: int = 64  # width of the shared feature (= e_sem); face-s sem_dim
    id_dim: int = 64  # e_id width; face-s id_dim
    id_hidden: int = 128
    id_temperature: float = 0.1  # InfoNCE temperature of the identity loss
    id_weight: float = 0.2  # weight of the identity loss beside the mean attribute cross-entropy
    feature_activation: str = "none"  # on the shared feature: "none", or "relu" (files written before this field)
    attributes: tuple[str, ...] = tuple(ATTRIBUTES)
    num_values: tuple[int, ...] = tuple(len(v) for v in ATTRIBUTES.values())

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.attributes = tuple(self.attributes)
        self.num_values = tuple(int(n) for n in self.num_values)
        for name in ("image_size", "unshuffle", "sem_dim", "id_dim", "id_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PerceptionConfig.{name} must be a positive int, got {value!r}")
        if len(self.channels) < 2 or min(self.channels) <= 0:
            raise ValueError(f"PerceptionConfig.channels needs >= 2 positive widths, got {self.channels}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size={self.image_size} is not divisible by the downsampling {self.downsample}")
        if len(self.attributes) != len(self.num_values) or min(self.num_values, default=0) < 2:
            raise ValueError("PerceptionConfig.attributes and num_values must pair up, >= 2 values each")
        if self.feature_activation not in ("none", "relu"):
            raise ValueError(f"PerceptionConfig.feature_activation must be 'none' or 'relu', "
                             f"got {self.feature_activation!r}")
        if self.id_temperature <= 0:
            raise ValueError(f"PerceptionConfig.id_temperature must be > 0, got {self.id_temperature}")

    @property
    def downsample(self) -> int:
        return self.unshuffle * 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> int:
        """Side of the last feature map."""
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for k in ("channels", "attributes", "num_values"):
            out[k] = list(out[k])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PerceptionConfig:
        if not isinstance(data, dict):
            raise TypeError(f"perception config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PerceptionConfig field(s): {', '.join(map(repr, unknown))}")
        return cls(**{"feature_activation": "relu", **data})  # files from before the field had a ReLU there


PRESETS = {
    "tiny": dict(channels=(4, 8, 8), sem_dim=16, id_dim=8, id_hidden=16),  # 8x8 final map  # unit tests
    "face-s": dict(),
}


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """Conv trunk -> shared feature -> one softmax head per attribute, plus an identity embedding."""

    def __init__(self, config: PerceptionConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else PerceptionConfig()
        ch = cfg.channels
        layers = [nn.PixelUnshuffle(cfg.unshuffle), _conv(3 * cfg.unshuffle**2, ch[0])]
        for i in range(1, len(ch)):
            layers += [_conv(ch[i - 1], ch[i], stride=2), _conv(ch[i], ch[i])]
        self.trunk = nn.Sequential(*layers)
        self.fc = nn.Linear(ch[-1] * cfg.grid * cfg.grid, cfg.sem_dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.sem_dim, n) for n in cfg.num_values)
        self.id_head = nn.Sequential(nn.Linear(cfg.sem_dim, cfg.id_hidden), nn.ReLU(inplace=True),
                                     nn.Linear(cfg.id_hidden, cfg.id_dim))
        # pixel normalisation (fixed, part of the file so a loaded model needs nothing else)
        self.register_buffer("pixel_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    # ------------------------------------------------------------------------------- construction, io
    @classmethod
    def from_name(cls, name: str, **overrides) -> AttributeClassifier:
        if name not in PRESETS:
            raise ValueError(f"unknown perception preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(PerceptionConfig(**{**PRESETS[name], **overrides}))

    def save(self, path) -> Path:
        """Write the weights to ``path`` (.safetensors, config JSON in its metadata) and the config beside it
        (``<stem>.json``); each file goes to a temporary name first and is renamed into place."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = json.dumps(self.config.to_dict(), sort_keys=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "fastface_perception_config": config})
        tmp.replace(path)
        cfg_path = path.with_suffix(".json")
        tmp = cfg_path.with_name(f".{cfg_path.name}.tmp")
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(cfg_path)
        return path

    @classmethod
    def load(cls, path=None) -> AttributeClassifier:
        """Read a file written by ``save`` (default: the shipped face-s classifier); returns it in eval mode."""
        from safetensors import SafetensorError, safe_open

        path = Path(DEFAULT_PATH if path is None else path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no attribute classifier weights (train one with "
                                    f"`python -m fastface.perception --train --out {path}`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        if "fastface_perception_config" in meta:
            config = json.loads(meta["fastface_perception_config"])
        elif path.with_suffix(".json").is_file():
            config = json.loads(path.with_suffix(".json").read_text())
        else:
            raise ValueError(f"{path}: no perception config in the file's metadata nor in {path.with_suffix('.json')}")
        model = cls(PerceptionConfig.from_dict(config))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        for k, v in state.items():
            if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
                raise ValueError(f"{path}: tensor {k!r} is {v.dtype} {tuple(v.shape)}, "
                                 f"expected {expected[k].dtype} {tuple(expected[k].shape)}")
        model.load_state_dict(state)
        return model.eval()

    # ------------------------------------------------------------------------------------ tensors
    def check_images(self, images) -> torch.Tensor:
        """uint8 images [B, S, S, 3] (torch, numpy or a list of PIL images / arrays) -> uint8 tensor."""
        S = self.config.image_size
        if isinstance(images, (list, tuple)):
            arrays = []
            for i, img in enumerate(images):
                if hasattr(img, "convert"):  # PIL
                    img = img.convert("RGB")
                    if img.size != (S, S):
                        img = img.resize((S, S))
                img = np.asarray(img)
                if img.dtype != np.uint8 or img.shape != (S, S, 3):
                    raise ValueError(f"images[{i}] must be uint8 [{S}, {S}, 3], got {img.dtype} {img.shape}")
                arrays.append(img)
            if not arrays:
                raise ValueError("images is empty")
            images = np.stack(arrays)
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be uint8 [B, {S}, {S}, 3] (tensor, array or list of PIL images), "
                            f"got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [B, {S}, {S}, 3], got dtype {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != (S, S, 3):
            raise ValueError(f"images must have shape [B, {S}, {S}, 3], got {tuple(images.shape)}")
        return images

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> normalised float [B, 3, S, S]."""
        x = images.to(self.pixel_mean.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float [B, 3, S, S] -> shared feature [B, sem_dim]."""
        h = self.fc(self.trunk(x).flatten(1))
        return F.relu(h) if self.config.feature_activation == "relu" else h

    def forward(self, x: torch.Tensor):
        """Normalised float [B, 3, S, S] -> (list of logits [B, n_values] per attribute, e_id [B, id_dim])."""
        h = self.features(x)
        return [head(h) for head in self.heads], F.normalize(self.id_head(h), dim=1)

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def _run(self, images, batch_size: int):
        images = self.check_images(images)
        was_training = self.training
        self.eval()
        try:
            for i in range(0, images.shape[0], batch_size):
                h = self.features(self.to_input(images[i : i + batch_size]))
                yield h
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_proba(self, images, batch_size: int = 256) -> list[torch.Tensor]:
        """Per attribute, value probabilities [B, n_values] (float32, ``ATTRIBUTES`` order)."""
        out = [[] for _ in self.heads]
        for h in self._run(images, batch_size):
            for k, head in enumerate(self.heads):
                out[k].append(torch.softmax(head(h).float(), dim=1))
        return [torch.cat(p) for p in out]

    @torch.no_grad()
    def predict_labels(self, images, batch_size: int = 256) -> np.ndarray:
        """Most likely value index per attribute -> int64 [B, n_attributes] (``FaceAttributes.labels()`` layout)."""
        probs = self.predict_proba(images, batch_size)
        return torch.stack([p.argmax(1) for p in probs], dim=1).numpy().astype(np.int64)

    def predict(self, images, batch_size: int = 256) -> dict[str, list[str]]:
        """uint8 images [B, S, S, 3] -> {attribute: [predicted value per image]} in ``ATTRIBUTES`` order."""
        labels = self.predict_labels(images, batch_size)
        return {name: [ATTRIBUTES[name][int(j)] for j in labels[:, k]] for k, name in enumerate(self.config.attributes)}

    @torch.no_grad()
    def embed(self, images, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, S, S, 3] -> (e_sem [B, sem_dim], e_id [B, id_dim]), float32, unit rows.

        ``e_sem`` is the shared feature the attribute heads read; ``e_id`` is close (cosine) for two pictures of
        one person and far for different people, whatever the hair, accessories and makeup.
        """
        sem, ids = [], []
        for h in self._run(images, batch_size):
            sem.append(F.normalize(h, dim=1))
            ids.append(F.normalize(self.id_head(h), dim=1))
        return torch.cat(sem), torch.cat(ids)


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
                   identity_offset: int = 0) -> dict:
    """``2 * n_pairs`` faces: rows 2k and 2k+1 are one person (identity attributes shared; hair, accessories,
    makeup, clothes, background, pose and lighting drawn separately). Deterministic per seed.

    Returns ``images`` uint8 [2n, 64, 64, 3], ``labels`` int64 [2n, n_attributes] (unseen values ``IGNORE``),
    ``identity`` int64 [2n] and ``attrs``.
    """
    from fastface.data.faceworld import render, sample_attributes

    images, attrs_list = [], []
    for k in range(n_pairs):
        rng = np.random.default_rng([int(seed), k, 0x1D2])
        identity = identity_offset + int(rng.integers(n_identities))
        for _ in range(2):
            attrs = sample_attributes(rng, identity=identity)
            images.append(render(attrs, seed=int(rng.integers(2**31))).image)
            attrs_list.append(attrs)
    images = np.stack(images) if images else np.zeros((0, 64, 64, 3), np.uint8)
    return {"images": images, "labels": visible_labels(attrs_list),
            "identity": np.array([a.identity for a in attrs_list], dtype=np.int64), "attrs": attrs_list}


def held_out_faces(n: int, seed: int = 10_000) -> dict:
    """``n`` face-world renders of identities never trained on (``make_dataset`` layout, no captions)."""
    from fastface.data.faceworld import make_dataset

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
    warm-up and cosine decay; stops after ``steps`` or ``time_limit`` seconds (the schedule then follows the
    clock). With ``balance`` the heads' cross-entropies are weighted by ``balanced_weights`` of their running
    (EMA) values. ``train_data`` / ``eval_data`` (dicts with ``images``, ``labels`` and for training ``identity``)
    replace the rendered sets. With ``out`` the model is saved there. Metrics: per-attribute held-out accuracy,
    its mean, steps, wall time.
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
        frac = step / steps if time_limit is None else max(step / steps, elapsed / time_limit)
        scale = min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.01)
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
