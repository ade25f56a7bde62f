"""Faceptor: one face perception model for six tasks — one encoder, one transformer decoder reading it through
task queries, one pixel decoder for the dense tasks, and Layer-Attention choosing each task's encoder layers.

    model = Faceptor.from_name("face-s")
    out = model(x)                           # x: normalised float [B, 3, 64, 64] (``model.to_input(uint8)``)
    out["parsing"]                           # [B, C, 64, 64] class logits (``PARSING_CLASSES``)
    out["landmarks"]                         # [B, K, 2] sub-pixel (x, y) by soft-argmax over heatmaps [B, K, 64, 64]
    out["attributes"]                        # list of logits [B, n_values] per attribute (``ATTRIBUTES`` order)
    out["identity"]                          # e_id [B, id_dim], unit rows

The user-facing interface is ``fastface.perception.perceptor.Perceptor`` (``fastface.load_perception()``).

Legend: B batch, L encoder layers, N memory tokens (``memory_grid**2``), D decoder width, Q a task's queries,
P pixel-embedding width, S image side, K landmarks, C parsing classes.

Design (the seed's single-encoder, dual-decoder Faceptor, sized for a CPU):

- Encoder: a conv net (the stem folds 2x2 pixels into channels, then levels at 32, 16 and 8 px). Each of its
  ``L`` layers' outputs is projected to D and pooled to an 8x8 grid: ``memory`` [L, B, N, D].
- Layer-Attention: every task t has learned logits over the L layers; its memory is
  ``sum_l softmax(logits_t)_l * memory_l`` [B, N, D] (the pixel decoder has its own mix too). A task that
  needs fine detail learns to read early layers; one that needs the whole face, late ones.
- Transformer decoder (shared by every task; pre-norm, self-attention among a task's queries, cross-attention
  to the task's memory, MLP): task queries in, refined queries out [B, Q, D].
- Global tasks (attributes — age and expression are among them — and identity): one query per attribute,
  a linear head per attribute on its refined query; identity has one query, a linear map to ``id_dim`` and an
  l2 norm.
- Dense tasks (parsing, landmarks): the pixel decoder upsamples its memory mix (8 -> 16 -> 32 px, with
  lateral inputs from the encoder and the pixels folded 2x2 into channels) and shuffles 4P channels at 32 px
  into pixel embeddings [B, P, 64, 64]; each refined query, projected to P, is dotted with every pixel:
  per-class parsing logits, per-landmark heatmaps. A landmark is the heatmap's expected position (soft-argmax),
  so it is sub-pixel.

Adding a task is adding a query set: an entry in ``TASKS`` (its queries), its output in ``forward``, and its
loss in ``fastface.perception.faceptor_train``; the encoder and both decoders stay as they are.

Files are written and checked by ``fastface.weights``: safetensors with the config in their metadata (and
beside them as JSON); never pickle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastface.checks import check_config_float, check_config_int, check_config_ints, config_from_dict
from fastface.config import MAX_HIDDEN, MAX_IMAGE_SIZE
from fastface.data.attributes import ATTRIBUTES
from fastface.data.renderer import LANDMARKS, PARSING_CLASSES
from fastface.perception.model import MAX_ATTRIBUTES, MAX_CHANNELS, MAX_VALUES

# the tasks, in the order of their Layer-Attention rows; "attributes" covers every attribute head (age and
# expression included: they are attributes of the face world and are reported on their own too)
TASKS = ("parsing", "landmarks", "attributes", "identity")
MAX_LAYERS = 32
MAX_QUERIES = 1024
MAX_HEADS = 64


@dataclass
class FaceptorConfig:
    """Shape of a Faceptor, its task vocabulary and its verification threshold."""

    image_size: int = 64
    channels: tuple[int, ...] = (24, 48, 96)  # encoder levels at 32, 16 and 8 px
    depth: tuple[int, ...] = (2, 2, 3)  # conv layers per level (each one a Layer-Attention candidate)
    dim: int = 96  # decoder width D
    heads: int = 4
    decoder_layers: int = 2
    mlp_ratio: int = 2
    memory_grid: int = 8  # the memory is pooled to memory_grid x memory_grid tokens
    pixel_dim: int = 16  # P
    id_dim: int = 64
    attributes: tuple[str, ...] = tuple(ATTRIBUTES)
    num_values: tuple[int, ...] = tuple(len(v) for v in ATTRIBUTES.values())
    parsing_classes: tuple[str, ...] = PARSING_CLASSES
    landmarks: tuple[str, ...] = LANDMARKS
    # cosine similarity at which ``Perceptor.verify`` calls two faces one person (set from held-out pairs at a
    # false-accept rate of 1% after training; see the model card)
    verify_threshold: float = 0.5
    metrics: dict = field(default_factory=dict)  # held-out metrics written at training time (model card source)

    def __post_init__(self):
        self.channels = check_config_ints("channels", self.channels, 1, MAX_CHANNELS, min_len=3, max_len=3)
        self.depth = check_config_ints("depth", self.depth, 1, MAX_LAYERS, min_len=3, max_len=3)
        for name, hi in (("image_size", MAX_IMAGE_SIZE), ("dim", MAX_HIDDEN), ("heads", MAX_HEADS),
                         ("decoder_layers", MAX_LAYERS), ("mlp_ratio", 16), ("memory_grid", 64),
                         ("pixel_dim", MAX_HIDDEN), ("id_dim", MAX_HIDDEN)):
            check_config_int(name, getattr(self, name), 1, hi)
        if self.image_size % 8 or (self.image_size // 8) % self.memory_grid:
            raise ValueError(f"FaceptorConfig: image_size={self.image_size} must be a multiple of 8 whose 8-px "
                             f"map divides into memory_grid={self.memory_grid}")
        if self.dim % self.heads:
            raise ValueError(f"FaceptorConfig: dim={self.dim} is not divisible by heads={self.heads}")
        for name in ("attributes", "parsing_classes", "landmarks"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(a, str) for a in value):
                raise ValueError(f"FaceptorConfig.{name} must be a non-empty list of names, got {value!r:.60}")
            if len(value) > MAX_QUERIES:
                raise ValueError(f"FaceptorConfig.{name} has {len(value)} entries, more than {MAX_QUERIES}")
            setattr(self, name, tuple(value))
        self.num_values = check_config_ints("num_values", self.num_values, 2, MAX_VALUES, max_len=MAX_ATTRIBUTES)
        if len(self.attributes) != len(self.num_values):
            raise ValueError("FaceptorConfig.attributes and num_values must pair up")
        if len(self.parsing_classes) < 2:
            raise ValueError("FaceptorConfig.parsing_classes needs at least 2 classes")
        check_config_float("verify_threshold", self.verify_threshold, lo=-1.0, hi=1.0)
        if not isinstance(self.metrics, dict):
            raise ValueError(f"FaceptorConfig.metrics must be a dict, got {type(self.metrics).__name__}")

    @property
    def n_layers(self) -> int:
        return sum(self.depth)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for k in ("channels", "depth", "attributes", "num_values", "parsing_classes", "landmarks"):
            out[k] = list(out[k])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FaceptorConfig:
        return config_from_dict(cls, data, "Faceptor")


PRESETS = {
    "tiny": dict(channels=(8, 8, 16), depth=(1, 1, 1), dim=16, heads=2, decoder_layers=1, memory_grid=4,
                 pixel_dim=8, id_dim=8),  # unit tests
    "face-s": dict(),
}


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _EncoderLayer(nn.Module):
    """conv3x3-BN-ReLU; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = _conv(cin, cout, stride)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: queries [B, Q, D] self-attend, cross-attend to memory [B, N, D], MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.norm2(q), memory, memory, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))


class Faceptor(nn.Module):
    """Encoder -> Layer-Attention -> (transformer decoder with task queries, pixel decoder) -> six tasks."""

    def __init__(self, config: FaceptorConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else FaceptorConfig()
        c0, c1, c2 = cfg.channels
        D, P = cfg.dim, cfg.pixel_dim
        # ---- encoder: levels at S/2, S/4, S/8; every conv layer is one Layer-Attention candidate
        self.stem = nn.PixelUnshuffle(2)
        layers, widths, cin = [], [], 12
        for level, (c, n) in enumerate(zip(cfg.channels, cfg.depth)):
            for i in range(n):
                layers.append(_EncoderLayer(cin, c, 2 if (i == 0 and level > 0) else 1))
                widths.append(c)
                cin = c
        self.encoder = nn.ModuleList(layers)
        self.level_of = [lv for lv, n in enumerate(cfg.depth) for _ in range(n)]
        self.memory_proj = nn.ModuleList(nn.Conv2d(w, D, 1) for w in widths)
        self.memory_pos = nn.Parameter(torch.randn(1, cfg.memory_grid ** 2, D) * 0.02)
        # Layer-Attention logits: one row per task plus one for the pixel decoder; zeros = the mean of the layers
        self.layer_attention = nn.Parameter(torch.zeros(len(TASKS) + 1, cfg.n_layers))
        # ---- transformer decoder and the task queries
        self.decoder = nn.ModuleList(DecoderLayer(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(D)
        n_queries = {"parsing": len(cfg.parsing_classes), "landmarks": len(cfg.landmarks),
                     "attributes": len(cfg.attributes), "identity": 1}
        self.queries = nn.ParameterDict({t: nn.Parameter(torch.randn(n_queries[t], D) * 0.02) for t in TASKS})
        self.attribute_heads = nn.ModuleList(nn.Linear(D, n) for n in cfg.num_values)
        self.identity_head = nn.Linear(D, cfg.id_dim)
        self.mask_proj = nn.ModuleDict({t: nn.Linear(D, P) for t in ("parsing", "landmarks")})
        # ---- pixel decoder at c1 channels: memory mix at S/8 -> S/4 -> S/2 with lateral inputs from the last layer
        # of each level and the pixels themselves (folded 2x2 into 12 channels at S/2: nothing lost), then 4P
        # channels at S/2 shuffled into P at S (a conv at S costs ~4x one at S/2 for the same work: 64-px maps of a
        # 64-face batch do not fit the cache)
        self.pixel_in = nn.Conv2d(D, c1, 1)
        self.lateral = nn.ModuleList([nn.Conv2d(c2, c1, 1), nn.Conv2d(c1, c1, 1), nn.Conv2d(c0, c1, 1)])
        self.refine = nn.ModuleList([_conv(c1, c1), _conv(c1 + 12, c1)])
        self.pixel_out = nn.Sequential(nn.Conv2d(c1, 4 * P, 1), nn.PixelShuffle(2))
        self.register_buffer("pixel_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))
        S = cfg.image_size
        grid = (torch.arange(S, dtype=torch.float32))  # pixel index = the landmark coordinate convention
        self.register_buffer("pixel_grid", torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).view(S * S, 2),
                             persistent=False)  # [S*S, 2] (x, y) of each pixel

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_name(cls, name: str, **overrides) -> Faceptor:
        if name not in PRESETS:
            raise ValueError(f"unknown Faceptor preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(FaceptorConfig(**{**PRESETS[name], **overrides}))

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> normalised float [B, 3, S, S]."""
        x = images.to(self.pixel_mean.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def layer_weights(self) -> dict[str, torch.Tensor]:
        """Each task's (and the pixel decoder's) softmax weights over the encoder layers -> {name: [L]}."""
        w = torch.softmax(self.layer_attention.float(), dim=1)
        return {name: w[i] for i, name in enumerate((*TASKS, "pixel"))}

    # ------------------------------------------------------------------------------- forward
    def encode(self, x: torch.Tensor):
        """x [B, 3, S, S] -> (memory [L, B, N, D], last feature map of each level)."""
        h = self.stem(x)
        memory, level_out = [], [None] * len(self.config.channels)
        g = self.config.memory_grid
        for layer, proj, level in zip(self.encoder, self.memory_proj, self.level_of):
            h = layer(h)
            level_out[level] = h
            m = F.adaptive_avg_pool2d(proj(h), g)  # [B, D, g, g]
            memory.append(m.flatten(2).transpose(1, 2))  # [B, N, D]
        return torch.stack(memory), level_out

    def decode_queries(self, task: str, memory: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The task's queries refined by the shared decoder over its memory mix -> [B, Q, D]."""
        mem = torch.einsum("l,lbnd->bnd", weights.to(memory.dtype), memory) + self.memory_pos  # [B, N, D]
        q = self.queries[task].to(mem.dtype).unsqueeze(0).expand(mem.shape[0], -1, -1)
        for layer in self.decoder:
            q = layer(q, mem)
        return self.decoder_norm(q)

    def query_states(self, x: torch.Tensor, tasks=("attributes",)) -> dict[str, torch.Tensor]:
        """Normalised float [B, 3, S, S] -> each task's refined queries {task: [B, Q, D]} (what its heads read;
        the face-text model's image tower reads the attribute queries)."""
        memory, _ = self.encode(x)
        weights = self.layer_weights()
        return {t: self.decode_queries(t, memory, weights[t]) for t in tasks}

    def identity_embedding(self, q_identity: torch.Tensor) -> torch.Tensor:
        """The identity task's refined query [B, 1, D] -> ``e_id`` [B, id_dim], float32, unit rows."""
        return F.normalize(self.identity_head(q_identity[:, 0]).float(), dim=1)

    def pixel_embeddings(self, x: torch.Tensor, memory: torch.Tensor, weights: torch.Tensor, level_out) -> torch.Tensor:
        """Pixel decoder -> [B, P, S, S]."""
        B, g = x.shape[0], self.config.memory_grid
        mem = torch.einsum("l,lbnd->bnd", weights.to(memory.dtype), memory)  # [B, N, D]
        h = self.pixel_in(mem.transpose(1, 2).reshape(B, -1, g, g))  # [B, c1, g, g]
        h = F.interpolate(h, size=level_out[2].shape[-2:], mode="nearest") + self.lateral[0](level_out[2])  # S/8
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False) + self.lateral[1](level_out[1])
        h = self.refine[0](h)  # S/4
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False) + self.lateral[2](level_out[0])
        h = self.refine[1](torch.cat([h, self.stem(x)], dim=1))  # S/2, with the pixels
        return self.pixel_out(h)  # [B, P, S, S]

    def forward(self, x: torch.Tensor, tasks=TASKS) -> dict:
        """Normalised float [B, 3, S, S] -> the outputs of ``tasks`` (see the module docstring)."""
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown Faceptor task(s) {unknown}; tasks are {TASKS}")
        memory, level_out = self.encode(x)
        weights = self.layer_weights()
        out = {}
        q = {t: self.decode_queries(t, memory, weights[t]) for t in tasks}
        if "attributes" in q:
            out["attributes"] = [head(q["attributes"][:, k]) for k, head in enumerate(self.attribute_heads)]
        if "identity" in q:
            out["identity"] = self.identity_embedding(q["identity"])
        dense = [t for t in ("parsing", "landmarks") if t in q]
        if dense:
            pix = self.pixel_embeddings(x, memory, weights["pixel"], level_out)  # [B, P, S, S]
            for t in dense:
                logits = torch.einsum("bqp,bpyx->bqyx", self.mask_proj[t](q[t]), pix)  # [B, Q, S, S]
                if t == "parsing":
                    out["parsing"] = logits
                else:
                    out["heatmaps"] = logits
                    out["landmarks"] = soft_argmax(logits.float(), self.pixel_grid)
        return out


def fused_for_inference(model: Faceptor) -> Faceptor:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the conv before it, in channels-last memory
    (measured on a 2-core AVX-512 EPYC, batch 64, 1 thread: channels-last 1.75x, the folding another ~5%). The
    same function up to float rounding; ``model`` is not changed."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fast = copy.deepcopy(model).eval()
    for mod in fast.modules():
        if isinstance(mod, nn.Sequential) and len(mod) >= 2 and isinstance(mod[0], nn.Conv2d) and \
                isinstance(mod[1], nn.BatchNorm2d):
            mod[0] = fuse_conv_bn_eval(mod[0], mod[1])
            mod[1] = nn.Identity()
    return fast.to(memory_format=torch.channels_last)


def soft_argmax(heatmaps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heatmap logits [B, K, S, S] -> expected (x, y) [B, K, 2] under their softmax over pixels; ``grid`` [S*S, 2]
    holds each pixel's (x, y)."""
    p = torch.softmax(heatmaps.flatten(2), dim=2)  # [B, K, S*S]
    return p @ grid
