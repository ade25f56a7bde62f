"""The face-text contrastive model (UniDiff's image-text contrastive half): a face and a description of it map to
nearby unit vectors, so text can rank faces and faces can rank texts.

    ft = fastface.load_facetext()                      # the shipped face-s model
    ft.embed_images(images)                            # uint8 [B, 64, 64, 3] -> [B, E] unit rows (= e_sem)
    ft.embed_texts(["a smiling old man with a beard"]) # [T, E] unit rows
    ft.similarity(images, texts)                       # cosine [B, T]
    e_sem, e_id = ft.understanding_embeddings(images)  # both inputs of the understanding experts, one encoder pass

Legend: B images, T texts, L text tokens, A attribute queries, D their width, W text width, E embedding width.

Design:

- Image tower: the shipped Faceptor, locked (LiT, Zhai et al. 2022: a pretrained image model kept frozen while
  the text tower learns to meet it). Its refined attribute queries [B, A, D] are flattened and mapped by a small
  head (LayerNorm -> Linear -> GELU -> Linear) to E. The tower's weights stay in the Faceptor's own file; this
  model's config names that file and its SHA-256, so a retrained Faceptor is noticed instead of read wrongly.
- Text tower: token embeddings + learned positions -> a pre-norm transformer encoder (padding masked out of
  attention) -> LayerNorm -> the mean over the text's tokens -> Linear to E. Its tokenizer is the transformer's
  (``tokenizer.json`` beside the weights).
- Training: symmetric InfoNCE over a batch of (face, fresh caption) pairs with a learned temperature (CLIP);
  ``fastface.facetext.train``.
- ``e_sem`` of the understanding experts is the image embedding; ``e_id`` is the Faceptor's identity output, read
  from the same encoder pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastface.checks import check_config_int, check_strings, config_from_dict
from fastface.config import MAX_HIDDEN
from fastface.perception.faceptor import Faceptor, fused_for_inference
from fastface.perception.perceptor import Perceptor, image_batch
from fastface.weights import CheckpointError, load_config, load_module, save_module

DEFAULT_PATH = Path(__file__).parents[1] / "assets" / "face-s" / "facetext.safetensors"
MAX_TEXT_TOKENS = 4096
MAX_SCALE = 100.0  # CLIP's clamp of the learned inverse temperature


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FaceTextConfig:
    """Shape of a face-text model and the files it reads beside its own."""

    embed_dim: int = 64  # E (= the transformer's sem_dim when used as e_sem)
    vocab_size: int = 256  # the text tokenizer's size
    max_text_len: int = 64  # tokens per text; longer texts are cut
    text_width: int = 96  # W
    text_layers: int = 2
    text_heads: int = 4
    text_mlp_ratio: int = 4
    image_queries: int = 20  # A: the Faceptor's attribute queries
    image_dim: int = 96  # D: the Faceptor's decoder width
    head_hidden: int = 64
    image_tower: str = "faceptor.safetensors"  # the locked Faceptor, relative to this model's file
    image_tower_sha256: str = ""  # that file's hash when this model was trained ("" = not checked)
    tokenizer: str = "tokenizer.json"  # relative to this model's file
    metrics: dict = field(default_factory=dict)  # held-out retrieval, written at export (model card source)

    def __post_init__(self):
        for name, hi in (("embed_dim", MAX_HIDDEN), ("vocab_size", 1 << 20), ("max_text_len", MAX_TEXT_TOKENS),
                         ("text_width", MAX_HIDDEN), ("text_layers", 64), ("text_heads", 64), ("text_mlp_ratio", 16),
                         ("image_queries", 1024), ("image_dim", MAX_HIDDEN), ("head_hidden", MAX_HIDDEN)):
            check_config_int(name, getattr(self, name), 1, hi)
        if self.text_width % self.text_heads:
            raise ValueError(f"FaceTextConfig: text_width={self.text_width} is not divisible by "
                             f"text_heads={self.text_heads}")
        for name in ("image_tower", "tokenizer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or Path(value).name != value:
                raise ValueError(f"FaceTextConfig.{name} must be a file name beside the model, got {value!r:.60}")
        if not isinstance(self.image_tower_sha256, str):
            raise ValueError("FaceTextConfig.image_tower_sha256 must be a string")
        if not isinstance(self.metrics, dict):
            raise ValueError(f"FaceTextConfig.metrics must be a dict, got {type(self.metrics).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FaceTextConfig:
        return config_from_dict(cls, data, "face-text")


PRESETS = {
    "tiny": dict(embed_dim=8, vocab_size=64, max_text_len=16, text_width=16, text_layers=1, text_heads=2,
                 image_queries=20, image_dim=16, head_hidden=16),  # unit tests (over the tiny Faceptor)
    "face-s": dict(),
}


class TextEncoder(nn.Module):
    """Token ids [T, L] (padding where ``mask`` is False) -> embeddings [T, E], unit rows."""

    def __init__(self, cfg: FaceTextConfig):
        super().__init__()
        W = cfg.text_width
        self.embed = nn.Embedding(cfg.vocab_size, W)
        self.pos = nn.Parameter(torch.randn(cfg.max_text_len, W) * 0.02)
        layer = nn.TransformerEncoderLayer(W, cfg.text_heads, cfg.text_mlp_ratio * W, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(W)
        self.out = nn.Linear(W, cfg.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        w = mask.to(h.dtype)[..., None]
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        return F.normalize(self.out(pooled).float(), dim=1)


class FaceText(nn.Module):
    """The trained parts: the image head over the locked tower's attribute queries, the text tower, the
    temperature. ``forward(features [B, A, D], ids [T, L], mask [T, L]) -> (image [B, E], text [T, E])``."""

    def __init__(self, config: FaceTextConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else FaceTextConfig()
        n_in = cfg.image_queries * cfg.image_dim
        self.image_head = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, cfg.head_hidden), nn.GELU(),
                                        nn.Linear(cfg.head_hidden, cfg.embed_dim))
        self.text = TextEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @classmethod
    def from_name(cls, name: str, **overrides) -> FaceText:
        if name not in PRESETS:
            raise ValueError(f"unknown face-text preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(FaceTextConfig(**{**PRESETS[name], **overrides}))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Attribute query states [B, A, D] -> image embeddings [B, E], unit rows."""
        return F.normalize(self.image_head(features.flatten(1).float()), dim=1)

    def forward(self, features, ids, mask):
        return self.embed_features(features), self.text(ids, mask)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_SCALE)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows image [B, E], text [B, E] (row b of each is one pair)."""
    logits = scale * image @ text.T
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def tower_features(tower: Faceptor, x: torch.Tensor, with_identity: bool = False):
    """Normalised images [B, 3, S, S] -> attribute query states [B, A, D] (and ``e_id`` [B, id_dim])."""
    q = tower.query_states(x, ("attributes", "identity") if with_identity else ("attributes",))
    if with_identity:
        return q["attributes"], tower.identity_embedding(q["identity"])
    return q["attributes"]


def check_tower(cfg: FaceTextConfig, tower: Faceptor, where: str) -> None:
    tc = tower.config
    if (len(tc.attributes), tc.dim) != (cfg.image_queries, cfg.image_dim):
        raise CheckpointError(f"{where}: the image tower has {len(tc.attributes)} attribute queries of width "
                              f"{tc.dim}; this model reads {cfg.image_queries} of width {cfg.image_dim}")


class FaceTextModel:
    """A trained face-text model with its locked image tower and its tokenizer: what users call.

    Image embeddings of one image are the same whatever else is in the batch only up to float rounding
    (convolutions round by batch shape); ``Pipeline`` embeds understanding images one at a time for exactness.
    """

    def __init__(self, model: FaceText, tower: Faceptor, tokenizer):
        from fastface.tokenizer import text_only

        if not isinstance(model, FaceText):
            raise TypeError(f"model must be a FaceText, got {type(model).__name__}")
        if not isinstance(tower, Faceptor):
            raise TypeError(f"tower must be a Faceptor, got {type(tower).__name__}")
        check_tower(model.config, tower, "FaceTextModel")
        if tokenizer.get_vocab_size() != model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} ids; the model reads "
                             f"{model.config.vocab_size}")
        self.model = model.eval()
        self.config = model.config
        self.tower = tower.eval()
        self._fast = fused_for_inference(tower)
        self.tokenizer = text_only(tokenizer)
        self.image_size = tower.config.image_size
        self.embed_dim = model.config.embed_dim
        self.id_dim = tower.config.id_dim

    # ---------------------------------------------------------------------------------------- io
    @classmethod
    def load(cls, path=None) -> FaceTextModel:
        """Read a file written by ``fastface.facetext.train`` (default: the shipped face-s model), with the
        Faceptor and tokenizer its config names beside it."""
        from fastface.tokenizer import load_text_tokenizer

        path = Path(DEFAULT_PATH if path is None else path)
        cfg = load_config(path, FaceTextConfig.from_dict, "face-text", missing="train them with `python -m "
                          "fastface.facetext.train --train --out RUN`, then --export RUN")
        tower_path = path.parent / cfg.image_tower
        if not tower_path.is_file():
            raise CheckpointError(f"{path}: its image tower {tower_path} is missing")
        if cfg.image_tower_sha256 and file_sha256(tower_path) != cfg.image_tower_sha256:
            raise CheckpointError(f"{path}: {tower_path} is not the Faceptor this model was trained on (SHA-256 "
                                  f"differs); retrain the face-text model on it")
        tower = Perceptor.load(tower_path).model
        model = load_module(path, lambda: FaceText(cfg))
        return cls(model, tower, load_text_tokenizer(path.parent / cfg.tokenizer))

    def save(self, path, tower_path=None) -> Path:
        """Write the trained parts to ``path``; the tower and tokenizer are expected beside it under the names
        of the config (``tower_path``, when given, is hashed into the config)."""
        cfg = self.config
        if tower_path is not None:
            cfg.image_tower, cfg.image_tower_sha256 = Path(tower_path).name, file_sha256(tower_path)
        return save_module(path, self.model, cfg.to_dict())

    # ---------------------------------------------------------------------------------------- inference
    def text_ids(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids [T, L], mask [T, L]), right-padded, cut at ``max_text_len`` tokens."""
        from fastface.tokenizer import encode_text

        texts = check_strings("texts", texts)
        return pad_ids([encode_text(self.tokenizer, t) for t in texts], self.config.max_text_len)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        """Texts -> [T, E] float32 unit rows."""
        ids, mask = self.text_ids(texts)
        return self.model.text(ids, mask)

    @torch.no_grad()
    def understanding_embeddings(self, images, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB faces [B, S, S, 3] -> (``e_sem`` [B, E], ``e_id`` [B, id_dim]), float32 unit rows."""
        images = image_batch(images, self.image_size)
        sem, ids = [], []
        for i in range(0, images.shape[0], batch_size):
            x = self._fast.to_input(images[i : i + batch_size]).contiguous(memory_format=torch.channels_last)
            feats, e_id = tower_features(self._fast, x, with_identity=True)
            sem.append(self.model.embed_features(feats))
            ids.append(e_id)
        return torch.cat(sem), torch.cat(ids)

    def embed_images(self, images, batch_size: int = 64) -> torch.Tensor:
        """uint8 RGB faces [B, S, S, 3] -> image embeddings [B, E] (= ``e_sem``), float32 unit rows."""
        return self.understanding_embeddings(images, batch_size)[0]

    def similarity(self, images, texts) -> torch.Tensor:
        """Cosine similarity [B, T] of each face with each text."""
        return self.embed_images(images) @ self.embed_texts(texts).T


def pad_ids(rows: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [T, L] right-padded with 0, mask [T, L]); rows are cut at ``max_len``; an empty
    row keeps one (masked-in) padding token so that its embedding is defined."""
    rows = [r[:max_len] for r in rows]
    L = max([1, *map(len, rows)])
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : max(1, len(r))] = True
    return ids, mask


def load_facetext(path=None) -> FaceTextModel:
    """The face-text model at ``path`` (default: the shipped face-s one)."""
    return FaceTextModel.load(path)
