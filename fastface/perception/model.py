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

Training lives in ``fastface.perception.train`` (``train_classifier``; ``python -m fastface.perception.train
--train``). Files are written and checked by ``fastface.weights``: safetensors with the config in their metadata
(and beside them as JSON); never pickle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastface.checks import check_config_float, check_config_int, check_config_ints, config_from_dict
from fastface.config import MAX_HIDDEN, MAX_IMAGE_SIZE
from fastface.data.attributes import ATTRIBUTES
from fastface.weights import CheckpointError, load_module, save_module, stored_config

DEFAULT_PATH = Path(__file__).parents[1] / "assets" / "face-s" / "perception.safetensors"
IGNORE = -100  # label value that is not scored

# Bounds of a PerceptionConfig beside fastface.config's (MAX_HIDDEN for the feature widths, MAX_IMAGE_SIZE),
# checked before any allocation; generous (face-s: 4 levels of 32..128 channels, 12 attributes of <= 10 values).
MAX_CHANNELS = 4096  # per level
MAX_LEVELS = 8
MAX_UNSHUFFLE = 16  # pixels per side folded into channels by the stem
MAX_ATTRIBUTES = 1024
MAX_VALUES = 65536  # values of one attribute


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
        # every field checked against its bound before anything is allocated; a ValueError naming the field
        self.channels = check_config_ints("channels", self.channels, 1, MAX_CHANNELS, min_len=2, max_len=MAX_LEVELS)
        for name, hi in (("image_size", MAX_IMAGE_SIZE), ("unshuffle", MAX_UNSHUFFLE), ("sem_dim", MAX_HIDDEN),
                         ("id_dim", MAX_HIDDEN), ("id_hidden", MAX_HIDDEN)):
            check_config_int(name, getattr(self, name), 1, hi)
        if not isinstance(self.attributes, (list, tuple)) or not all(isinstance(a, str) for a in self.attributes):
            raise ValueError(f"PerceptionConfig.attributes must be a list of names, got {self.attributes!r:.60}")
        self.attributes = tuple(self.attributes)
        self.num_values = check_config_ints("num_values", self.num_values, 2, MAX_VALUES,
                                            max_len=MAX_ATTRIBUTES)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size={self.image_size} is not divisible by the downsampling {self.downsample}")
        if len(self.attributes) != len(self.num_values):
            raise ValueError("PerceptionConfig.attributes and num_values must pair up, >= 2 values each")
        if self.feature_activation not in ("none", "relu"):
            raise ValueError(f"PerceptionConfig.feature_activation must be 'none' or 'relu', "
                             f"got {self.feature_activation!r:.60}")
        check_config_float("id_temperature", self.id_temperature, positive=True)
        check_config_float("id_weight", self.id_weight, lo=0)

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
        # files from before the field had a ReLU there
        return config_from_dict(cls, data, "perception", {"feature_activation": "relu"})


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

    def save(self, path, *, dtype: torch.dtype | None = None) -> Path:
        """Write the weights to ``path`` (.safetensors, config JSON in its metadata; floating tensors stored in
        ``dtype`` when given) and the config beside it (``<stem>.json``), each atomically (``fastface.weights``)."""
        return save_module(path, self, self.config.to_dict(), dtype=dtype)

    @classmethod
    def load(cls, path=None) -> AttributeClassifier:
        """Read a file written by ``save`` (default: the shipped face-s classifier); returns it in eval mode.

        Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` (a ``ValueError``) for a file that
        is not safetensors, has no config, or whose tensors do not match it.
        """
        path = Path(DEFAULT_PATH if path is None else path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no attribute classifier weights (train one with "
                                    f"`python -m fastface.perception.train --train --out {path}`)")
        config = stored_config(path, legacy_keys=("fastface_perception_config",))
        if config is None:
            raise CheckpointError(f"{path}: no perception config in the file's metadata nor in "
                                  f"{path.with_suffix('.json')}")
        try:
            cfg = PerceptionConfig.from_dict(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: config: {exc}") from None
        return load_module(path, lambda: cls(cfg)).eval()  # checked on a meta skeleton before it is built

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
