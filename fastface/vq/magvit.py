"""MAGVIT-v2 image tokenizer as Show-o publishes it: RGB images <-> grids of 13-bit lookup-free codes.

    tok = MagvitTokenizer.from_pretrained("path/to/magvitv2")   # config.json + model.safetensors (Show-o layout)
    ids = tok.encode(images)          # uint8 [B, 256, 256, 3] (torch or numpy) -> int64 [B, 256] in [0, 8192)
    images = tok.decode(ids)          # int64 [B, 256] -> uint8 [B, 256, 256, 3]

Same ``encode``/``decode`` interface as ``fastface.vq.model.VQModel``, so a Pipeline takes either.

Letters: B batch, C channels, D code bits (= z_channels = token_size), K = 2**D codes, S image side,
G = S / 2**(L - 1) grid side for L resolution levels, N = G * G tokens.

Architecture (Show-o's ``models/modeling_magvitv2.py``: ``VQGANEncoder``, ``LFQuantizer``, ``VQGANDecoder``, the
taming-transformers blocks of ``models/common_modules.py``); the module and parameter names are theirs, so the
state dict of ``MagvitTokenizer`` has exactly the keys of Show-o's ``MAGVITv2`` (in the same order):

- encoder: conv3x3 ``conv_in`` -> per level ``down.{i}``: ResnetBlocks ``block.{j}`` (+ ``attn.{j}`` at the
  ``attn_resolutions``), a stride-2 conv3x3 ``downsample.conv`` (padded right/bottom by one) except at the last
  level -> ``mid`` (``block_1``, ``attn_1``, ``block_2``) -> GroupNorm ``norm_out``, SiLU, conv3x3 ``conv_out`` to
  D channels -> 1x1 ``quant_conv``
- quantiser ``quantize`` (LFQ, MAGVIT-v2 paper, arXiv 2310.05737 section 3.1): each of the D channels is quantised
  to its sign, -1 or +1 (0 counts as -1); the id is sum_d bit_d * 2**(D - 1 - d) with bit_d = (z_d > 0), channel 0
  the most significant bit. Buffers ``embedding`` [K, D] (the +-1 code of every id) and ``power_vals`` [D] are
  persistent, as in Show-o, and checked on load.
- decoder: 1x1 ``post_quant_conv`` -> conv3x3 ``conv_in`` -> ``mid`` -> per level ``up.{i}`` from the coarsest:
  ResnetBlocks (+ attention), nearest 2x upsample + conv3x3 ``upsample.conv`` except at level 0 -> ``norm_out``,
  SiLU, conv3x3 ``conv_out`` to RGB
- ResnetBlock: GroupNorm(32, eps 1e-6), SiLU, conv3x3, GroupNorm, SiLU, dropout, conv3x3, plus the input (through a
  1x1 ``nin_shortcut`` where the width changes); AttnBlock: single-head self-attention over the G*G positions with
  1x1 ``q``/``k``/``v``/``proj_out`` convs.

Show-o's defaults (``ch`` 128; encoder multipliers 1, 2, 2, 4, 4 with 4, 3, 4, 3, 4 blocks; decoder 1, 1, 2, 2, 4
with 4, 4, 3, 4, 3; 13 bits): 256 px -> 16 x 16 = 256 tokens, 512 px -> 32 x 32 = 1024 tokens with the same
weights (the network is convolutional plus one attention at the grid; the default ``attn_resolutions`` [5] is never
reached, so no per-level attention exists). Pixels follow Show-o's ``training/utils.py:image_transform``
(``ToTensor`` then ``Normalize(0.5, 0.5)``: [-1, 1]) on the way in and its inference scripts on the way out
(``clamp((x + 1) / 2, 0, 1) * 255`` cast to uint8, i.e. truncated).

Show-o ships ``pytorch_model.bin`` (a pickle) and a ``config.json`` that holds only ``_class_name``-style metadata
(``MAGVITv2.__init__`` takes no arguments); fastface reads only safetensors (``model.safetensors``, converted
beforehand) and refuses a pickle file by name, unopened. Training losses (entropy and commitment, Show-o's
formulas) are ``LFQ.losses``; inference never computes them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastface.checks import (
    check_config_float,
    check_config_int,
    check_config_ints,
    check_token_ids,
    check_uint8_images,
)
from fastface.config import MAX_IMAGE_SIZE, MAX_VOCAB
from fastface.vq.model import MAX_BLOCKS, MAX_CHANNELS, MAX_LEVELS
from fastface.weights import (
    CheckpointError,
    check_memory,
    load_weights,
    module_nbytes,
    save_module,
    save_weights,
    stored_config,
    write_json,
)

MAX_TOKEN_BITS = 20  # 2**20 codes = MAX_VOCAB; MAGVIT-v2 itself goes to 18 bits, Show-o uses 13
MAX_ATTN_RESOLUTIONS = 16
NORM_GROUPS = 32  # Show-o's Normalize: GroupNorm(32, C, eps=1e-6), so every width is a multiple of 32
NORM_EPS = 1e-6
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CLASS_NAMES = ("MAGVITv2", "MagvitTokenizer")  # accepted ``_class_name`` of a config.json


@dataclass
class MagvitConfig:
    """Shape of Show-o's MAGVIT-v2 (their ``VQGANEncoder``/``VQGANDecoder``/``LFQuantizer`` defaults); ``grid`` is
    derived. Field names follow Show-o's (``ch``, ``ch_mult``, ``num_res_blocks`` ... split into encoder and
    decoder, which differ in Show-o)."""

    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    attn_resolutions: tuple[int, ...] = (5,)  # feature-map sides with an AttnBlock after each ResnetBlock
    dropout: float = 0.0
    in_ch: int = 3
    out_ch: int = 3
    resolution: int = 256
    z_channels: int = 13  # D: the encoder's output width, one bit each
    double_z: bool = False
    codebook_size: int = 8192  # K = 2**token_size
    token_size: int = 13  # D (Show-o's LFQuantizer codebook_dim)
    beta: float = 0.25  # commitment: weight of the second term
    entropy_multiplier: float = 0.1
    commit_loss_multiplier: float = 0.1
    grid: int = field(init=False)

    def __post_init__(self):
        # every field checked against its bound before anything is allocated (a crafted config.json must not ask
        # for terabytes of convolutions); a ValueError naming the field and the value
        check_config_int("ch", self.ch, 1, MAX_CHANNELS)
        if self.ch % NORM_GROUPS:
            raise ValueError(f"config field 'ch'={self.ch} must be a multiple of {NORM_GROUPS} (GroupNorm groups)")
        levels = None
        for side in ("encoder", "decoder"):
            mult_name, blocks_name = f"{side}_ch_mult", f"{side}_num_res_blocks"
            mult = check_config_ints(mult_name, getattr(self, mult_name), 1, MAX_CHANNELS, max_len=MAX_LEVELS)
            # at least one block per level: Show-o sizes each level's resample conv by its blocks' output width
            blocks = check_config_ints(blocks_name, getattr(self, blocks_name), 1, MAX_BLOCKS, max_len=MAX_LEVELS)
            if len(blocks) != len(mult):
                raise ValueError(f"config field {blocks_name!r} must hold one count per level of {mult_name!r} "
                                 f"({len(mult)}), got {len(blocks)}")
            for i, m in enumerate(mult):
                width = self.ch * m
                if width > MAX_CHANNELS or width % NORM_GROUPS:
                    raise ValueError(f"config field '{mult_name}[{i}]'={m}: width ch * {m} = {width} must be a "
                                     f"multiple of {NORM_GROUPS} (GroupNorm groups) and at most {MAX_CHANNELS}")
            if levels is not None and len(mult) != levels:
                raise ValueError(f"config field {mult_name!r} must have as many levels as 'encoder_ch_mult' "
                                 f"({levels}), got {len(mult)}: the decoder must upsample what the encoder reduced")
            levels = len(mult)
            setattr(self, mult_name, mult)
            setattr(self, blocks_name, blocks)
        self.attn_resolutions = check_config_ints("attn_resolutions", self.attn_resolutions, 1, MAX_IMAGE_SIZE,
                                                  min_len=0, max_len=MAX_ATTN_RESOLUTIONS)
        check_config_float("dropout", self.dropout, lo=0.0, hi=1.0)
        if self.dropout >= 1.0:
            raise ValueError(f"config field 'dropout'={self.dropout} must be below 1")
        for name in ("in_ch", "out_ch"):
            check_config_int(name, getattr(self, name), 1, 64)
            if getattr(self, name) != 3:
                raise ValueError(f"config field {name!r}={getattr(self, name)}: images are RGB, it must be 3")
        check_config_int("resolution", self.resolution, 1, MAX_IMAGE_SIZE)
        factor = 2 ** (levels - 1)
        if self.resolution % factor:
            raise ValueError(f"config field 'resolution'={self.resolution} is not divisible by the downsampling "
                             f"factor {factor} ({levels} levels)")
        check_config_int("token_size", self.token_size, 1, MAX_TOKEN_BITS)
        check_config_int("codebook_size", self.codebook_size, 2, MAX_VOCAB)
        if self.codebook_size != 2**self.token_size:
            raise ValueError(f"config field 'codebook_size'={self.codebook_size} must be 2**token_size = "
                             f"{2 ** self.token_size} (one code per sign pattern)")
        check_config_int("z_channels", self.z_channels, 1, MAX_TOKEN_BITS)
        if self.z_channels != self.token_size:
            raise ValueError(f"config field 'z_channels'={self.z_channels} must equal token_size={self.token_size}: "
                             "the quantiser takes one bit per encoder channel")
        if not isinstance(self.double_z, bool) or self.double_z:
            raise ValueError(f"config field 'double_z' must be False (Show-o's quant_conv takes z_channels inputs), "
                             f"got {self.double_z!r:.40}")
        for name in ("beta", "entropy_multiplier", "commit_loss_multiplier"):
            check_config_float(name, getattr(self, name), lo=0.0)
        self.grid = self.resolution // factor

    @property
    def image_size(self) -> int:
        """S (VQConfig's name for it)."""
        return self.resolution

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name, value in out.items():
            if isinstance(value, tuple):
                out[name] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MagvitConfig:
        """A config dict (ours, or Show-o's config.json: keys starting with ``_`` are metadata and skipped)."""
        if not isinstance(data, dict):
            raise TypeError(f"MAGVIT config must be a dict, got {type(data).__name__}")
        cls_name = data.get("_class_name")
        if cls_name is not None and cls_name not in CLASS_NAMES:
            raise ValueError(f"config is for {cls_name!r:.60}, not a MAGVIT-v2 tokenizer ({' or '.join(CLASS_NAMES)})")
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("_"))}
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"unknown MagvitConfig field(s): {', '.join(map(repr, unknown))}")
        return cls(**data)


PRESETS = {
    "showo-256": dict(resolution=256),  # Show-o's tokenizer: 256 tokens per image
    "showo-512": dict(resolution=512),  # the same weights at 512 px (show-o-512x512): 1024 tokens
    "tiny": dict(ch=32, encoder_ch_mult=(1, 2), encoder_num_res_blocks=(1, 1), decoder_ch_mult=(1, 2),
                 decoder_num_res_blocks=(1, 1), attn_resolutions=(16,), resolution=32, z_channels=6,
                 token_size=6, codebook_size=64),  # unit tests: 16 x 16 grid, attention at level 1
}


# --------------------------------------------------------------------------------------------- blocks
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, c, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """Pre-norm residual block, c_in -> c_out channels (a 1x1 ``nin_shortcut`` on the skip path if they differ)."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):  # [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):  # [B, C, H, W] -> [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))  # [B,1,HW,C]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v: [B, 1, HW, C]
        return x + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding one zero row/column at the bottom/right: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsample then conv3x3: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (one AttnBlock per block, or none) and the
    ``downsample`` / ``upsample`` named by ``resample`` (None at the level that has none)."""

    def __init__(self, c_in: int, c_out: int, blocks: int, attention: bool, dropout: float, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(blocks if attention else 0))
        if resample == "down":
            self.downsample = Downsample(c_out)
        elif resample == "up":
            self.upsample = Upsample(c_out)

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class _Middle(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the grid resolution."""

    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c, dropout)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class MagvitEncoder(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] -> continuous codes [B, D, G, G] (Show-o's ``VQGANEncoder``)."""

    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        mult, L = cfg.encoder_ch_mult, len(cfg.encoder_ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        side, c_in = cfg.resolution, cfg.ch
        for i in range(L):
            c_out = cfg.ch * mult[i]
            self.down.append(_Level(c_in, c_out, cfg.encoder_num_res_blocks[i], side in cfg.attn_resolutions,
                                    cfg.dropout, "down" if i < L - 1 else None))
            if i < L - 1:
                side //= 2
            c_in = c_out
        self.mid = _Middle(c_in, cfg.dropout)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x):  # [B, 3, S, S] -> [B, D, G, G]
        h = self.conv_in(x)  # [B, ch, S, S]
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # [B, C_i, side / 2, side / 2]
        h = self.mid(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class MagvitDecoder(nn.Module):
    """Codes [B, D, G, G] (+-1 after quantisation) -> images [B, 3, S, S] (Show-o's ``VQGANDecoder``)."""

    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        mult, L = cfg.decoder_ch_mult, len(cfg.decoder_ch_mult)
        c_in = cfg.ch * mult[-1]
        side = cfg.resolution // 2 ** (L - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Middle(c_in, cfg.dropout)
        levels = [None] * L
        for i in reversed(range(L)):  # coarse to fine; stored by level index, finest first (Show-o's order)
            c_out = cfg.ch * mult[i]
            levels[i] = _Level(c_in, c_out, cfg.decoder_num_res_blocks[i], side in cfg.attn_resolutions,
                               cfg.dropout, "up" if i > 0 else None)
            c_in = c_out
            if i > 0:
                side *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, z):  # [B, D, G, G] -> [B, 3, S, S]
        h = self.mid(self.conv_in(self.post_quant_conv(z)))  # [B, C_{L-1}, G, G]
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # [B, C_i, 2 side, 2 side]
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------ quantiser
class LFQLosses(NamedTuple):
    """Training terms of ``LFQ.losses`` (scalars). ``entropy_loss`` and ``commitment_loss`` carry the config's
    multipliers; the two entropies are unweighted."""

    entropy_loss: torch.Tensor
    commitment_loss: torch.Tensor
    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor


class LFQ(nn.Module):
    """Lookup-free quantiser: D channels -> D signs -> one of K = 2**D ids (no learned codebook).

    ``embedding`` [K, D] float (+-1; row k holds the bits of k, most significant first, mapped 0 -> -1, 1 -> +1)
    and ``power_vals`` [D] int64 (2**(D-1) .. 1) are persistent buffers with Show-o's names.
    """

    def __init__(self, bits: int = 13, *, beta: float = 0.25, entropy_multiplier: float = 0.1,
                 commit_loss_multiplier: float = 0.1):
        super().__init__()
        check_config_int("token_size", bits, 1, MAX_TOKEN_BITS)
        self.bits = bits
        self.beta = beta
        self.entropy_multiplier = entropy_multiplier
        self.commit_loss_multiplier = commit_loss_multiplier
        embedding, power_vals = self.code_table(bits)
        self.register_buffer("embedding", embedding)
        self.register_buffer("power_vals", power_vals)

    @staticmethod
    def code_table(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding [2**bits, bits] float +-1, power_vals [bits] int64): the fixed tables every LFQ holds."""
        power_vals = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.int64)  # [D] MSB first
        ids = torch.arange(2**bits, dtype=torch.int64)
        embedding = (torch.bitwise_and(ids[:, None], power_vals) != 0).float() * 2 - 1  # [K, D]
        return embedding, power_vals

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    def _check_z(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() < 2 or z.shape[1] != self.bits:
            raise ValueError(f"LFQ input must be a tensor [B, {self.bits}, ...], got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")

    def ids_of(self, z: torch.Tensor) -> torch.Tensor:
        """Channel-first z [B, D, *] -> int64 ids [B, *]: sum_d (z_d > 0) * 2**(D - 1 - d)."""
        self._check_z(z)
        shape = (1, self.bits) + (1,) * (z.dim() - 2)
        return ((z > 0).long() * self.power_vals.view(shape)).sum(1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel-first z [B, D, *] -> (z_q [B, D, *] float32 in {-1, +1}, ids int64 [B, *]).

        Where z carries a gradient, z_q is the straight-through value z + (q - z).detach() (gradient 1 to z);
        otherwise it is q itself, exactly +-1.
        """
        ids = self.ids_of(z)
        zf = z.float()
        q = torch.where(zf > 0, 1.0, -1.0)
        z_q = zf + (q - zf).detach() if zf.requires_grad else q
        return z_q, ids

    def codes_to_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """int ids [*] in [0, K) -> codes [*, D] (+-1, the embedding's dtype): the inverse of ``ids_of``."""
        return self.embedding[ids]

    def losses(self, z: torch.Tensor, *, entropy: str = "bits") -> LFQLosses:
        """The training terms for channel-first z [B, D, *] (computed in float32).

        The distribution over codes is q(c | z) = softmax_c(-||z - c||^2) over the K sign vectors c (MAGVIT-v2's
        entropy penalty, arXiv 2310.05737 eq. 5: E[H(q(z))] - H(E[q(z)])). It factorises over the bits: bit d is
        +1 with probability sigmoid(4 z_d) (the logits -(z_d - 1)^2 and -(z_d + 1)^2 differ by 4 z_d).

        - ``entropy="bits"`` (Show-o's ``LFQuantizer``): per-sample entropy = the mean over tokens and bits of the
          bit entropies; codebook entropy = the mean over bits of the entropy of the batch-averaged bit
          probability. Both are 1/D of the code-level values when bits are independent across the batch.
        - ``entropy="codes"``: the same over the K codes exactly (per-sample entropy = the sum of the bit
          entropies; codebook entropy from the batch-averaged [K] distribution; costs an [M, K] matrix).

        ``entropy_loss`` = (per-sample entropy - codebook entropy) * entropy_multiplier. ``commitment_loss`` =
        (mean((q - z)^2) + beta * mean((z_st - z.detach())^2)) * commit_loss_multiplier, Show-o's form: z_st is
        the straight-through output, so the value is (1 + beta) * mse and the gradient to z is (1 - beta) times
        mse's.
        """
        self._check_z(z)
        zf = z.float().movedim(1, -1).reshape(-1, self.bits)  # [M, D], M = B * positions
        q = torch.where(zf > 0, 1.0, -1.0).detach()
        logit_pos = 4 * zf  # log p(+1) - log p(-1) per bit
        logp_pos, logp_neg = F.logsigmoid(logit_pos), F.logsigmoid(-logit_pos)  # [M, D]
        p_pos = logp_pos.exp()
        bit_entropy = -(p_pos * logp_pos + (1 - p_pos) * logp_neg)  # [M, D]
        if entropy == "bits":
            per_sample = bit_entropy.mean()
            mean_pos = p_pos.mean(0)  # [D]
            codebook = _binary_entropy(mean_pos).mean()
        elif entropy == "codes":
            per_sample = bit_entropy.sum(1).mean()
            bits01 = (self.embedding.float() > 0).float()  # [K, D]
            log_q = logp_pos @ bits01.t() + logp_neg @ (1 - bits01).t()  # [M, K] log q(c | z)
            mean_q = log_q.softmax(1).mean(0)  # [K] (each row already sums to 1; softmax guards rounding)
            codebook = -(mean_q * mean_q.clamp_min(torch.finfo(mean_q.dtype).tiny).log()).sum()
        else:
            raise ValueError(f"entropy must be 'bits' (Show-o) or 'codes', got {entropy!r}")
        z_st = zf + (q - zf).detach()
        commitment = F.mse_loss(zf, q) + self.beta * F.mse_loss(z_st, zf.detach())
        return LFQLosses(entropy_loss=(per_sample - codebook) * self.entropy_multiplier,
                         commitment_loss=commitment * self.commit_loss_multiplier,
                         per_sample_entropy=per_sample, codebook_entropy=codebook)

    def forward(self, z: torch.Tensor, *, losses: bool = False, entropy: str = "bits"):
        """``quantize(z)``; with ``losses`` also ``self.losses(z, entropy=entropy)`` as a third item."""
        z_q, ids = self.quantize(z)
        return (z_q, ids, self.losses(z, entropy=entropy)) if losses else (z_q, ids)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(p), elementwise; 0 at p = 0 or 1."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


# ------------------------------------------------------------------------------------------ tokenizer
class MagvitTokenizer(nn.Module):
    """Encoder + LFQ + decoder with Show-o's module names; ``encode``/``decode`` map uint8 images to ids and back."""

    def __init__(self, config: MagvitConfig | None = None):
        super().__init__()
        self.config = config if config is not None else MagvitConfig()
        cfg = self.config
        self.encoder = MagvitEncoder(cfg)  # registration order = Show-o's MAGVITv2: encoder, decoder, quantize
        self.decoder = MagvitDecoder(cfg)
        self.quantize = LFQ(cfg.token_size, beta=cfg.beta, entropy_multiplier=cfg.entropy_multiplier,
                            commit_loss_multiplier=cfg.commit_loss_multiplier)

    # ----------------------------------------------------------------------------- construction, io
    @classmethod
    def from_name(cls, name: str, **overrides) -> MagvitTokenizer:
        if name not in PRESETS:
            raise ValueError(f"unknown MAGVIT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(MagvitConfig(**{**PRESETS[name], **overrides}))

    def save(self, path) -> Path:
        """One file: weights in ``path`` (.safetensors, config in its metadata) and the config as ``<stem>.json``."""
        return save_module(path, self, self.config.to_dict())

    def save_pretrained(self, directory) -> Path:
        """Show-o's directory layout, safetensors only: ``config.json`` and ``model.safetensors``. Returns the
        directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        save_weights(directory / WEIGHTS_NAME, self.state_dict(), config=config)
        write_json(directory / CONFIG_NAME, {"_class_name": "MAGVITv2", **config})
        return directory

    @classmethod
    def from_pretrained(cls, directory, *, dtype: torch.dtype | None = None) -> MagvitTokenizer:
        """Read ``directory/config.json`` and ``directory/model.safetensors`` (a Show-o ``MAGVITv2`` state dict).

        Raises ``FileNotFoundError`` for a missing directory or config, and ``CheckpointError`` (a ``ValueError``)
        for a directory holding only a pickle checkpoint (``pytorch_model.bin`` ...: never opened), a file that is
        not safetensors, missing or unexpected tensors, wrong shapes or dtypes, non-finite values, a bad config, or
        LFQ tables that are not the fixed +-1 code table.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no MAGVIT tokenizer directory")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(f"{directory / pickles[0]}: a pickle checkpoint; fastface never unpickles "
                                      f"(it can run code). Convert it to {WEIGHTS_NAME} (safetensors) first")
            raise CheckpointError(f"{weights}: missing")
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing")
        return cls._load(weights, _read_json(config_file), dtype, where=config_file)

    @classmethod
    def load(cls, path, *, dtype: torch.dtype | None = None) -> MagvitTokenizer:
        """A directory (``from_pretrained``) or a .safetensors file; a file's config comes from its metadata, else
        ``<stem>.json``, else ``config.json`` beside it. A pickle file (.bin, .pt, .pth, .ckpt, .pkl) is refused
        with ``CheckpointError``, unopened."""
        path = Path(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: a pickle checkpoint; fastface never unpickles (it can run code). "
                                  f"Convert it to safetensors first")
        if path.is_dir():
            return cls.from_pretrained(path, dtype=dtype)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no MAGVIT tokenizer weights")
        config, where = stored_config(path), path
        if config is None and (path.parent / CONFIG_NAME).is_file():
            config, where = _read_json(path.parent / CONFIG_NAME), path.parent / CONFIG_NAME
        if config is None:
            raise CheckpointError(f"{path}: no MAGVIT config in the file's metadata, {path.with_suffix('.json')} "
                                  f"or {path.parent / CONFIG_NAME}")
        return cls._load(path, config, dtype, where=where)

    @classmethod
    def _load(cls, file: Path, config: dict, dtype: torch.dtype | None, *, where: Path) -> MagvitTokenizer:
        try:
            cfg = MagvitConfig.from_dict(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: config: {exc}") from None
        with torch.device("meta"):  # the expected tensors and the size, nothing allocated
            skeleton = cls(cfg)
        check_memory(2 * module_nbytes(skeleton), str(file))
        # floating tensors may be stored in any floating dtype (a converted fp16/bf16 file) and come back float32;
        # integer ones (power_vals) must be int64
        tensors = load_weights(file, skeleton, dtype=torch.float32)
        embedding, power_vals = LFQ.code_table(cfg.token_size)
        for key, want in (("quantize.embedding", embedding), ("quantize.power_vals", power_vals)):
            if not torch.equal(tensors[key], want):
                raise CheckpointError(f"{file}: tensor {key!r} is not LFQ's fixed table (+-1 bits of each id, most "
                                      f"significant first / powers of two): the ids would not match the codes")
        model = cls(cfg)
        model.load_state_dict(tensors)
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    # ------------------------------------------------------------------------------------- tensors
    def _param(self) -> torch.Tensor:
        return self.encoder.conv_in.weight

    def _check_images(self, images) -> torch.Tensor:
        return check_uint8_images(images, self.config.resolution)

    def _check_ids(self, ids) -> torch.Tensor:
        return check_token_ids(ids, self.config.num_tokens, self.config.codebook_size)

    @staticmethod
    def from_pixels(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] in [-1, 1], as Show-o's ToTensor + Normalize(0.5, 0.5)."""
        return (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5

    @staticmethod
    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] -> uint8 [B, S, S, 3], as Show-o's scripts: clamp((x + 1) / 2, 0, 1) * 255, truncated."""
        x = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0) * 255.0
        return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] in [-1, 1] -> continuous codes [B, D, G, G] (before quantisation)."""
        p = self._param()
        return self.encoder(x.to(p.device, p.dtype))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """codes [B, D, G, G] -> float [B, 3, S, S] (about [-1, 1])."""
        p = self._param()
        return self.decoder(z_q.to(p.device, p.dtype))

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """uint8 images [B, S, S, 3] (torch or numpy) -> code ids int64 [B, N] (row-major grid, on the CPU)."""
        images = self._check_images(images)
        z = self.encode_latents(self.from_pixels(images.to(self._param().device)))  # [B, D, G, G]
        return self.quantize.ids_of(z).reshape(images.shape[0], -1).cpu()  # [B, N]

    @torch.no_grad()
    def decode(self, ids) -> torch.Tensor:
        """Code ids [B, N] -> uint8 images [B, S, S, 3] (on the CPU)."""
        ids = self._check_ids(ids).to(self._param().device)
        G = self.config.grid
        codes = self.quantize.codes_to_vectors(ids).view(ids.shape[0], G, G, -1)  # [B, G, G, D]
        return self.to_pixels(self.decode_latents(codes.permute(0, 3, 1, 2))).cpu()

    def forward(self, x: torch.Tensor, *, entropy: str = "bits"):
        """Training forward on float images [B, 3, H, W] in [-1, 1] (H, W multiples of the downsampling).

        Returns (reconstruction [B, 3, H, W], ids [B, h, w], LFQLosses).
        """
        z = self.encode_latents(x)
        z_q, ids, losses = self.quantize(z, losses=True, entropy=entropy)
        return self.decode_latents(z_q), ids, losses


def _read_json(file: Path) -> dict:
    """A config.json as a dict; ``CheckpointError`` naming the file if it is not a JSON object."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data
