"""Image tokenizer: a small VQ autoencoder, 64x64 RGB faces <-> 16x16 codebook ids.

    vq = VQModel.load("fastface/assets/face-s/image_tokenizer.safetensors")
    ids = vq.encode(images)          # uint8 [B, 64, 64, 3] (torch or numpy) -> int64 [B, 256]
    images = vq.decode(ids)          # int64 [B, 256] -> uint8 [B, 64, 64, 3]

Design (letters: B batch, C channels, D code width, K codebook size, G = grid side, N = G * G tokens):

- encoder: conv3x3 -> [ResBlock, 4x4 stride-2 conv] per level -> ResBlocks -> 1x1 conv to D channels
- quantizer: cosine-similarity lookup of l2-normalised vectors in a K x D codebook (ViT-VQGAN's
  factorised, normalised codes keep most of the codebook in use); codebook learned by EMA of the assigned
  encoder outputs, straight-through gradients to the encoder, commitment loss, and dead-code restarts
  (codes unused for a while are re-seeded from current encoder outputs)
- decoder: 1x1 conv -> ResBlocks -> [nearest 2x upsample, conv3x3, ResBlock] per level -> conv3x3 to RGB

Pixels are scaled to [-1, 1]; the reconstruction loss is MSE (PSNR is what we report) plus the commitment term.
Files are written and checked by ``fastface.weights`` (safetensors, config in the metadata and beside the file as
``<stem>.json``; never pickle). Train with ``fastface.vq.train.train_vq`` or ``python -m fastface.vq.train --train``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastface.checks import (
    check_config_float,
    check_config_int,
    check_config_ints,
    check_token_ids,
    check_uint8_images,
    config_from_dict,
)
from fastface.config import MAX_IMAGE_SIZE, MAX_VOCAB
from fastface.weights import load_config, load_module, save_module

# Bounds of a VQConfig beside fastface.config's (MAX_IMAGE_SIZE, MAX_VOCAB for the codebook), checked before any
# allocation. Generous: the SD / VQGAN autoencoders use 128..512 channels, 2 ResBlocks and 5 levels; MAGVIT-v2 has
# 2**18 codes; code widths run 4..256.
MAX_CHANNELS = 4096  # per level
MAX_LEVELS = 8  # resolution levels (downsampling 2**7)
MAX_BLOCKS = 16  # ResBlocks per level
MAX_CODE_DIM = 4096


@dataclass
class VQConfig:
    """Shape and training hyper-parameters of the image tokenizer (``grid`` is derived)."""

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)  # per resolution level: 64, 32, 16 for image_size 64
    enc_blocks: tuple[int, ...] = (0, 0, 1)  # ResBlocks per level in the encoder
    dec_blocks: tuple[int, ...] = (0, 1, 2)  # ResBlocks per level in the decoder (level 0 must be 0: the
    #                                          decoder's last layer predicts 2x2 pixels per position at level 1)
    codebook_size: int = 512  # K
    code_dim: int = 32  # D
    ema_decay: float = 0.99
    commitment: float = 0.25
    restart_threshold: float = 0.05  # EMA use (assignments per batch) below which a code is re-seeded
    grid: int = field(init=False)

    def __post_init__(self):
        # every field checked against its bound before anything is allocated (a crafted file must not ask for
        # 129.6 GB of convolutions); a ValueError naming the field and the value
        self.channels = check_config_ints("channels", self.channels, 1, MAX_CHANNELS, min_len=2, max_len=MAX_LEVELS)
        for name, hi in (("image_size", MAX_IMAGE_SIZE), ("codebook_size", MAX_VOCAB), ("code_dim", MAX_CODE_DIM)):
            check_config_int(name, getattr(self, name), 1, hi)
        for name in ("enc_blocks", "dec_blocks"):
            blocks = getattr(self, name)
            if not isinstance(blocks, (list, tuple)) or len(blocks) != len(self.channels):
                raise ValueError(f"VQConfig.{name} must hold one count >= 0 per level ({len(self.channels)}), "
                                 f"got {blocks!r:.60}")
            setattr(self, name, check_config_ints(name, blocks, 0, MAX_BLOCKS, max_len=MAX_LEVELS))
        if self.dec_blocks[0]:
            raise ValueError("VQConfig.dec_blocks[0] must be 0: the decoder ends with a 2x pixel shuffle")
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size={self.image_size} is not divisible by the downsampling factor {factor}")
        check_config_float("ema_decay", self.ema_decay)
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"VQConfig.ema_decay must lie in (0, 1), got {self.ema_decay}")
        check_config_float("commitment", self.commitment, lo=0)
        check_config_float("restart_threshold", self.restart_threshold, lo=0)
        self.grid = self.image_size // factor

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name in ("channels", "enc_blocks", "dec_blocks"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> VQConfig:
        return config_from_dict(cls, data, "image tokenizer")


PRESETS = {
    "tiny": dict(channels=(8, 16, 16), enc_blocks=(0, 0, 1), dec_blocks=(0, 1, 1), codebook_size=32,
                 code_dim=8),  # unit tests
    "face-s": dict(channels=(32, 64, 128), enc_blocks=(0, 0, 1), dec_blocks=(0, 1, 2), codebook_size=512,
                   code_dim=32),
}


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c), c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, c), c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """conv3x3 at full resolution, then per level: 4x4 stride-2 conv, ResBlocks; 1x1 conv to D channels.

    face-s: about 150 M multiply-adds per 64x64 image (most of it in the 16x16 ResBlock).
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch = cfg.channels
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        layers = [ResBlock(ch[0]) for _ in range(cfg.enc_blocks[0])]
        for i in range(1, len(ch)):
            layers.append(nn.Conv2d(ch[i - 1], ch[i], 4, stride=2, padding=1))  # [B, C_i, H/2, W/2]
            layers += [ResBlock(ch[i]) for _ in range(cfg.enc_blocks[i])]
        self.body = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(min(8, ch[-1]), ch[-1])
        self.proj = nn.Conv2d(ch[-1], cfg.code_dim, 1)

    def forward(self, x):  # [B, 3, S, S] -> [B, D, G, G]
        return self.proj(F.silu(self.norm(self.body(self.stem(x)))))


class Decoder(nn.Module):
    """1x1 conv, then per level (coarse to fine): ResBlocks, nearest 2x upsample + conv3x3; the last level
    predicts 2x2 RGB pixels per position (conv3x3 to 12 channels + pixel shuffle), so no layer runs at full
    resolution. face-s: about 310 M multiply-adds per image (a mirror of the encoder with full-resolution
    blocks costs 455 M).
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch = cfg.channels
        L = len(ch)
        self.proj = nn.Conv2d(cfg.code_dim, ch[-1], 1)
        layers = []
        for i in range(L - 1, 0, -1):
            layers += [ResBlock(ch[i]) for _ in range(cfg.dec_blocks[i])]
            if i > 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i - 1], 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(min(8, ch[1]), ch[1])
        self.out = nn.Conv2d(ch[1], 3 * 4, 3, padding=1)  # [B, 12, S/2, S/2] -> shuffle -> [B, 3, S, S]

    def forward(self, z):  # [B, D, G, G] -> [B, 3, S, S]
        return F.pixel_shuffle(self.out(F.silu(self.norm(self.body(self.proj(z))))), 2)


class VectorQuantizer(nn.Module):
    """Cosine-similarity VQ with an EMA-learned codebook and dead-code restarts.

    ``codebook`` [K, D] (unit rows) is the only persistent tensor; the EMA statistics are training state.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        K, D = cfg.codebook_size, cfg.code_dim
        self.decay = cfg.ema_decay
        self.restart_threshold = cfg.restart_threshold
        self.register_buffer("codebook", F.normalize(torch.randn(K, D), dim=1))
        self.register_buffer("ema_count", torch.ones(K), persistent=False)
        self.register_buffer("ema_sum", self.codebook.clone(), persistent=False)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Unit vectors z [M, D] -> nearest code ids [M] (largest cosine similarity)."""
        return torch.argmax(z @ self.codebook.t(), dim=1)  # [M, K] -> [M]

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """EMA step on unit vectors z [M, D] assigned to ids [M]; re-seed dead codes. Returns #restarted."""
        K = self.codebook.shape[0]
        onehot_count = torch.bincount(ids, minlength=K).to(z.dtype)  # [K]
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, z)  # [K, D]
        self.ema_count.mul_(self.decay).add_(onehot_count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.codebook.copy_(F.normalize(self.ema_sum, dim=1))
        dead = torch.nonzero(self.ema_count < self.restart_threshold).squeeze(1)
        if dead.numel():
            pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=generator).to(z.device)
            noise = torch.randn(dead.numel(), z.shape[1], generator=generator).to(z.device)
            fresh = F.normalize(z[pick] + 0.01 * noise, dim=1)
            self.codebook[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
        return int(dead.numel())

    def reset_ema(self):
        """Restart the EMA statistics from the codebook (after loading weights, before training on)."""
        self.ema_count.fill_(1.0)
        self.ema_sum.copy_(self.codebook)


class VQModel(nn.Module):
    """Encoder + vector quantizer + decoder; ``encode``/``decode`` map uint8 images to codebook ids and back."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = config if config is not None else VQConfig()
        self.encoder = Encoder(self.config)
        self.quantizer = VectorQuantizer(self.config)
        self.decoder = Decoder(self.config)

    # ----------------------------------------------------------------------------- construction, io
    @classmethod
    def from_name(cls, name: str, **overrides) -> VQModel:
        if name not in PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(VQConfig(**{**PRESETS[name], **overrides}))

    @classmethod
    def from_config_dict(cls, data: dict) -> VQModel:
        if not isinstance(data, dict):
            raise TypeError(f"image tokenizer config must be a dict, got {type(data).__name__}")
        return cls(VQConfig.from_dict(data))

    def save(self, path) -> Path:
        """Write the weights to ``path`` (.safetensors, config in its metadata) and the config beside it
        (``<stem>.json``), each atomically (``fastface.weights``)."""
        return save_module(path, self, self.config.to_dict())

    @classmethod
    def load(cls, path) -> VQModel:
        """Read a file written by ``save`` (config from the file's metadata, else from ``<stem>.json``).

        Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` (a ``ValueError``) for a file that
        is not safetensors, has no config, or whose tensors do not match it.
        """
        path = Path(path)
        vq_config = load_config(path, VQConfig.from_dict, "image tokenizer", legacy_keys=("fastface_vq_config",))
        model = load_module(path, lambda: cls(vq_config))  # checked on a meta skeleton before it is built
        model.quantizer.reset_ema()
        return model.eval()

    # ------------------------------------------------------------------------------------- tensors
    def _check_images(self, images) -> torch.Tensor:
        return check_uint8_images(images, self.config.image_size)

    def _check_ids(self, ids) -> torch.Tensor:
        return check_token_ids(ids, self.config.num_tokens, self.config.codebook_size)

    @staticmethod
    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in [-1, 1] -> uint8 [B, S, S, 3]."""
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def from_pixels(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> float [B, 3, S, S] in [-1, 1]."""
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] -> unit vectors [B, G, G, D]."""
        return F.normalize(self.encoder(x).permute(0, 2, 3, 1), dim=-1)

    def decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        """codes [B, G, G, D] -> float [B, 3, S, S]."""
        return self.decoder(q.permute(0, 3, 1, 2))

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """uint8 images [B, S, S, 3] (torch or numpy) -> codebook ids int64 [B, N] (row-major grid)."""
        images = self._check_images(images)
        z = self.encode_latents(self.from_pixels(images.to(self.quantizer.codebook.device)))  # [B, G, G, D]
        B = z.shape[0]
        return self.quantizer.lookup(z.reshape(-1, z.shape[-1])).view(B, -1)  # [B, N]

    @torch.no_grad()
    def decode(self, ids) -> torch.Tensor:
        """Codebook ids [B, N] -> uint8 images [B, S, S, 3] (on the CPU)."""
        ids = self._check_ids(ids).to(self.quantizer.codebook.device)
        G = self.config.grid
        q = self.quantizer.codebook[ids].view(ids.shape[0], G, G, -1)  # [B, G, G, D]
        return self.to_pixels(self.decode_latents(q)).cpu()

    def forward(self, x: torch.Tensor, *, update_codebook: bool = False, generator=None):
        """Training forward on float images [B, 3, H, W] in [-1, 1] (H, W multiples of the downsampling).

        Returns (reconstruction [B, 3, H, W], ids [B, h, w], commitment loss, number of restarted codes).
        """
        z = self.encode_latents(x).float()  # [B, h, w, D]; the quantizer runs in float32 under autocast
        flat = z.reshape(-1, z.shape[-1])
        ids = self.quantizer.lookup(flat.detach())
        restarted = 0
        if update_codebook:
            restarted = self.quantizer.update(flat.detach(), ids, generator)
        q = self.quantizer.codebook[ids].view_as(z)
        commit = F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through
        return self.decode_latents(q).float(), ids.view(z.shape[:3]), commit, restarted


def psnr(model: VQModel, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB, over images) of uint8 images [B, S, S, 3] after an encode/decode round trip."""
    images = model._check_images(images)
    values = []
    model.eval()
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        y = model.decode(model.encode(x))
        mse = ((x.float() - y.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        values.append(10 * torch.log10(255.0**2 / mse))
    return float(torch.cat(values).mean())
