"""The UniF²ace-style unified transformer: reference model.

Legend: B sequences, L sequence length, H hidden, nh heads, hd head dim, rd rotary dims per head, G expert groups
(task), E routed experts, S shared experts, F expert ffn width, V unified vocabulary.

Block:  x += Attn(LN(x));  x += TokenMoE(LN(x));  x += SeqMoE(LN(x))

* Omni-attention: text rows attend causally; rows of an image segment (<soi> ... <eoi>, inclusive) attend
  to everything before the segment and to the whole segment; padding is never attended (a pad row
  attends only to itself so its softmax stays finite; its output is never used).
* Grouped token-level MoE: a token's expert group is its sequence's task; routing and expert FFNs run
  through ``fastface.ops.grouped_moe`` so every backend serves the model.
* Grouped sequence-level MoE: one routing decision per sequence from the mean of the sublayer input over
  the sequence's conditioning tokens (the prompt for t2i; image and question for mmu), softmax over 4
  experts, top-2, weights renormalised over the two (a choice: the paper does not say). Routing from the
  condition only keeps the decision fixed while image tokens or answer tokens change.

Variants (``FaceConfig`` fields; the defaults are the block above):

* ``block="parallel"`` (Phi): attention and MLP read one LN, their sum joins the residual: x += Attn(h) + MLP(h),
  h = LN(x).
* ``mlp="dense"``: one MLP in place of the token-level MoE (``DenseMLP``: Phi's fc1 -> gelu(tanh) -> fc2, or SwiGLU).
* ``seq_moe=False``: no sequence-level MoE sublayer. The block still reports a routing decision, an empty one (no
  expert chosen), and ``seq_mixtures`` gives it an identity mixture, so the decoding loops treat every model alike.
* ``rotary_fraction`` < 1: rotary on the first rd = int(hd * fraction) dims of each head (NeoX rotate-half over those
  dims, frequencies over rd, as transformers' Phi), the rest unrotated; the rotary tables are rd wide
  (``FaceTransformer.rotary``).
* ``bias``: biases on q/k/v/out, the dense MLP and the LM head.
* ``special_token_ids``: ``forward`` builds its masks, rotary positions and sequence-MoE condition from the config's
  <pad>, <soi> and <eoi> ids; the mask functions below take them as arguments (default: ids 0..7).

The model owns its fast path (the engine calls these modules, never their weights): attention writes its keys and
values through a cache object -- ``KVCache`` grows by concatenation (the reference), ``StaticKVCache`` writes into
preallocated buffers at a position the caller sets -- and a block accepts the sequence-level routing fixed in
advance (``FaceTransformer.seq_mixtures``), so a decoding step runs only the new tokens through the same modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastface import ops
from fastface.config import (
    EOI_ID,
    GROUP_GENERATION,
    GROUP_UNDERSTANDING,
    PAD_ID,
    SEQ_EXPERTS,
    SOI_ID,
    FaceConfig,
)
from fastface.loss import load_balancing_loss
from fastface.ops.attention import apply_rotary  # noqa: F401 - the model's rotary, re-exported

# ----------------------------------------------------------------------------------------------- masks


def image_segments(input_ids: torch.Tensor, *, soi_id: int = SOI_ID, eoi_id: int = EOI_ID) -> torch.Tensor:
    """Segment number of each position: k >= 1 inside the k-th <soi> ... <eoi> span (inclusive), else 0."""
    opened = torch.cumsum(input_ids == soi_id, dim=-1)
    is_eoi = input_ids == eoi_id
    closed_before = torch.cumsum(is_eoi, dim=-1) - is_eoi.long()
    return torch.where(opened > closed_before, opened, torch.zeros_like(opened))


def omni_attention_mask(input_ids: torch.Tensor, *, pad_id: int = PAD_ID, soi_id: int = SOI_ID,
                        eoi_id: int = EOI_ID, text_block: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] ids -> [B, L, L] bool, True where row i may attend to column j (special ids: ``FaceConfig``'s).

    ``text_block`` [B, L] bool marks a text diffusion block (``fastface.prompts``: a caption decoded in parallel):
    its rows attend like an image segment's -- to everything before the block and to the whole block -- and its
    <pad> tokens are ordinary tokens of the block (attended, counted in the rotary positions).
    """
    B, L = input_ids.shape
    pad = input_ids == pad_id  # [B, L]
    seg = image_segments(input_ids, soi_id=soi_id, eoi_id=eoi_id)  # [B, L]
    if text_block is not None:
        pad = pad & ~text_block
        seg = torch.where(text_block, torch.full_like(seg, -1), seg)  # the block is a segment of its own
    causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
    same_segment = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)  # [B, L, L]
    allowed = (causal | same_segment) & ~pad[:, None, :]
    eye = torch.eye(L, dtype=torch.bool, device=input_ids.device)
    return torch.where(pad[:, :, None], eye, allowed)


def token_valid(input_ids: torch.Tensor, *, pad_id: int = PAD_ID, text_block: torch.Tensor | None = None):
    """[B, L] bool: the positions that are tokens of the sequence (not padding; a text block's <pad>s are tokens)."""
    valid = input_ids != pad_id
    return valid if text_block is None else valid | text_block


def default_positions(input_ids: torch.Tensor, *, pad_id: int = PAD_ID,
                      text_block: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions counting only non-pad tokens, so left padding does not shift a sequence."""
    return (torch.cumsum(token_valid(input_ids, pad_id=pad_id, text_block=text_block), dim=-1) - 1).clamp(min=0)


def default_cond_mask(input_ids: torch.Tensor, task: torch.Tensor, *, pad_id: int = PAD_ID,
                      soi_id: int = SOI_ID, text_block: torch.Tensor | None = None) -> torch.Tensor:
    """Conditioning tokens: for t2i the tokens before the first <soi> (a text block among them); for mmu every
    token outside a text block (the input is taken to be the prompt: image and question; pass ``cond_mask`` when
    answers follow)."""
    before_image = torch.cumsum(input_ids == soi_id, dim=-1) == 0
    valid = token_valid(input_ids, pad_id=pad_id, text_block=text_block)
    outside_block = torch.ones_like(before_image) if text_block is None else ~text_block
    t2i = (task == GROUP_GENERATION)[:, None]
    return valid & torch.where(t2i, before_image, outside_block)


# --------------------------------------------------------------------------------------------- rotary


def rotary_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] -> (cos, sin) [B, 1, L, dim] in float32, for the ``dim`` rotated dims of a head
    (``FaceConfig.rotary_dim``: the head dim unless ``rotary_fraction`` < 1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = positions.float()[..., None] * inv_freq  # [B, L, dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, L, dim]
    return angles.cos(), angles.sin()


# ------------------------------------------------------------------------------------------- KV caches


@dataclass
class KVCache:
    """Keys/values of every layer for the tokens seen so far, plus the sequence-level routing decisions; grows by
    concatenation (the reference decoding loop).

    keys[i], values[i]: [B, nh, Lc, hd];  key_valid: [B, Lc] bool (False at padding);
    routes[i]: (weights [B, 2] float32, experts [B, 2] int64) decided at prefill.
    """

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    routes: list = field(default_factory=list)
    key_valid: torch.Tensor | None = None
    next_position: torch.Tensor | None = None  # [B] rotary position of the next token

    @property
    def length(self) -> int:
        return 0 if self.key_valid is None else self.key_valid.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append the new keys/values k, v [B, nh, L, hd] of ``layer``; returns all of them [B, nh, Lc + L, hd]."""
        if len(self.keys) > layer:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys.append(k)
            self.values.append(v)
        return k, v


class StaticKVCache:
    """Preallocated keys/values per layer, [R, nh, Lmax, hd] each (gpt-fast's static cache).

    ``start`` is where the next tokens' keys go: ``update`` writes positions [start, start + L) and returns the
    keys/values [0, start + L). The caller moves ``start`` (the engine rewrites the image segment at the same place
    every step, and appends one answer token at a time); nothing is allocated after construction.
    """

    def __init__(self, num_layers: int, rows: int, heads: int, max_len: int, head_dim: int, *, dtype, device):
        shape = (rows, heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.start = 0

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"StaticKVCache holds {self.max_len} positions; writing [{self.start}, {end})")
        self.keys[layer][:, :, self.start : end] = k
        self.values[layer][:, :, self.start : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# ------------------------------------------------------------------------------------------- modules


@dataclass
class BlockContext:
    """What every block of one forward reads.

    mask [B, 1, L, Lk] bool (True = may attend) or additive float (0 / -inf); cos, sin [B, 1, L, rd];
    groups [B * L] each token's expert group; task [B]; cond_mask [B, L] the sequence-MoE routing input;
    kv: a ``KVCache`` or ``StaticKVCache`` (or None); routes: per layer fixed routing (weights, experts) to reuse
    instead of deciding it; seq: per layer fixed ``SeqMixture`` (routing and embeddings folded in; overrides
    routes); router_logits: return the token routers' logits (training); backend: the grouped-MoE and attention
    backend for this forward (None: each module's own).
    """

    mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    groups: torch.Tensor
    task: torch.Tensor
    cond_mask: torch.Tensor | None = None
    e_sem: torch.Tensor | None = None
    e_id: torch.Tensor | None = None
    kv: KVCache | StaticKVCache | None = None
    routes: list | None = None
    seq: list | None = None
    router_logits: bool = False
    backend: str | None = None


def project(layer, x, backend: str):
    """A linear layer of the model on x: an ``nn.Linear``, or its int8 replacement (``fastface.quantization``),
    which runs ``ops.int8_linear`` with this call's backend."""
    return layer(x) if isinstance(layer, nn.Linear) else layer(x, backend=backend)


class Attention(nn.Module):
    def __init__(self, config: FaceConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)  # q, k, v rows
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.backend = "auto"  # passed to ops.attention; fastface.backends decides what runs

    def forward(self, x, mask, cos, sin, kv: KVCache | StaticKVCache | None = None, layer: int = 0,
                backend: str | None = None):
        """x [B, L, H], mask [B, 1, L, Lk], cos/sin [B, 1, L, rd] -> [B, L, H]; with ``kv`` the new keys/values join
        the cached ones. ``backend``: of ``ops.attention`` for this call (None: the module's own)."""
        B, L, H = x.shape
        nh, hd, rd = self.config.num_heads, self.config.head_dim, self.config.rotary_dim
        if cos.shape[-1] != rd:
            raise ValueError(f"rotary tables are {cos.shape[-1]} wide, this model rotates {rd} dims of each head "
                             f"(build them with FaceTransformer.rotary)")
        qkv = project(self.qkv, x, backend or self.backend).view(B, L, 3, nh, hd)
        # q and k rotate together, in the projection's [B, L, ·, nh, hd] layout (partial rotary: the first rd dims)
        qk = ops.rotary(qkv[:, :, :2], cos, sin, backend=backend or self.backend)  # [B, L, 2, nh, hd]
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if kv is not None:
            k, v = kv.update(layer, k, v)  # [B, nh, Lk, hd]
        y = ops.attention(q, k, v, mask, backend=backend or self.backend)  # [B, nh, L, hd]
        return project(self.out, y.transpose(1, 2).reshape(B, L, H), backend or self.backend)


class TokenMoE(nn.Module):
    """Grouped token-level MoE; weights in the transformers layout, one slice per group."""

    def __init__(self, config: FaceConfig):
        super().__init__()
        c = config
        G, E, S, H, Fe, Fs = c.num_groups, c.num_experts, c.num_shared_experts, c.hidden_size, c.expert_ffn_size, \
            c.shared_ffn_size
        self.config = c
        self.backend = "auto"  # passed to the op; fastface.backends decides what runs
        self.router_weight = nn.Parameter(torch.empty(G, E, H))
        self.gate_up_proj = nn.Parameter(torch.empty(G, E, 2 * Fe, H))
        self.down_proj = nn.Parameter(torch.empty(G, E, H, Fe))
        if S:
            self.shared_gate_up_proj = nn.Parameter(torch.empty(G, S, 2 * Fs, H))
            self.shared_down_proj = nn.Parameter(torch.empty(G, S, H, Fs))
        else:
            self.shared_gate_up_proj = self.shared_down_proj = None
        self.experts8 = None  # the experts in int8 (fastface.quantization), which then replace the float weights

    def forward(self, x, groups, router_logits: bool = False, backend: str | None = None):
        """x [B, L, H], groups [B * L] -> (y [B, L, H], router_logits [B*L, E] or None)."""
        B, L, H = x.shape
        if self.experts8 is not None:
            out = self.experts8(x.reshape(B * L, H), groups, self.router_weight, top_k=self.config.top_k,
                                normalize_topk=self.config.normalize_topk, return_router_logits=router_logits,
                                backend=backend or self.backend)
            y, logits = out if router_logits else (out, None)
            return y.view(B, L, H), logits
        out = ops.grouped_moe(
            x.reshape(B * L, H), groups, self.router_weight, self.gate_up_proj, self.down_proj,
            top_k=self.config.top_k, shared_gate_up_proj=self.shared_gate_up_proj,
            shared_down_proj=self.shared_down_proj, normalize_topk=self.config.normalize_topk,
            return_router_logits=router_logits, backend=backend or self.backend,
        )
        y, logits = out if router_logits else (out, None)
        return y.view(B, L, H), logits


class DenseMLP(nn.Module):
    """One MLP per block (``mlp="dense"``): ``fc2(gelu_tanh(fc1 x))`` as Phi, or SwiGLU
    ``down_proj(silu(gate_proj x) * up_proj x)`` as Llama; biases with ``config.bias``."""

    def __init__(self, config: FaceConfig):
        super().__init__()
        H, Fd, bias = config.hidden_size, config.dense_ffn_size, config.bias
        self.gated = config.mlp_activation == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(H, Fd, bias=bias)
            self.up_proj = nn.Linear(H, Fd, bias=bias)
            self.down_proj = nn.Linear(Fd, H, bias=bias)
        else:
            self.fc1 = nn.Linear(H, Fd, bias=bias)
            self.fc2 = nn.Linear(Fd, H, bias=bias)

    backend = "auto"  # of int8 layers, once fastface.quantization has replaced the linear ones

    def forward(self, x, backend: str | None = None):
        """x [B, L, H] -> [B, L, H]; ``backend``: of int8 layers for this call (None: the module's own)."""
        b = backend or self.backend
        if self.gated:
            return project(self.down_proj, F.silu(project(self.gate_proj, x, b)) * project(self.up_proj, x, b), b)
        return project(self.fc2, F.gelu(project(self.fc1, x, b), approximate="tanh"), b)


@dataclass
class SeqMixture:
    """A fixed sequence-level MoE decision folded into ``out = h * scale + bias_1 + bias_2 ...``.

    scale [B] in h's dtype (sum of the chosen experts' weights, Zero experts counting 0); biases: [B, H] terms of the
    Semantic/Identity experts whose embedding was given; noise [B] float32 weights of the Noise expert (training).
    """

    scale: torch.Tensor
    biases: list
    noise: torch.Tensor | None = None


class SeqMoE(nn.Module):
    """Grouped sequence-level MoE (4 experts per group, top-2, one decision per sequence)."""

    def __init__(self, config: FaceConfig):
        super().__init__()
        self.config = config
        self.router = nn.Parameter(torch.empty(config.num_groups, config.seq_num_experts, config.hidden_size))
        self.sem_proj = nn.Linear(config.sem_dim, config.hidden_size, bias=False)  # W_s
        self.id_proj = nn.Linear(config.id_dim, config.hidden_size, bias=False)  # W_id

    def route(self, h, group, cond_mask):
        """Routing from the mean of h over the conditioning tokens: (weights [B, 2], experts [B, 2])."""
        w = cond_mask.to(h.dtype)[..., None]  # [B, L, 1]
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # [B, H]
        logits = torch.einsum("bh,beh->be", pooled.float(), self.router[group].float())  # [B, 4]
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.config.seq_top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), experts

    def mixture(self, route, group, dtype, e_sem=None, e_id=None) -> SeqMixture:
        """Fold a routing decision (weights [B, 2], experts [B, 2]) and the embeddings into a ``SeqMixture``.

        Every expert is ``a * h + bias`` (copy: a=1; zero: a=0; semantic/identity: a=1, bias = W e; noise:
        a=1, bias = sigma * eps), so the top-2 mixture is ``(sum_k w_k a_k) * h + sum_k w_k bias_k``. An expert whose
        embedding is absent acts as Copy.
        """
        weights, experts = route
        device = weights.device
        kinds = [[SEQ_EXPERTS[int(g)][int(e)] for e in row] for g, row in zip(group.tolist(), experts.tolist())]

        def indicator(fn):
            return torch.tensor([[1.0 if fn(n) else 0.0 for n in row] for row in kinds], device=device)

        scale = (weights * indicator(lambda n: n != "zero")).sum(-1).to(dtype)  # [B]
        biases = []
        for name, emb, proj in (("semantic", e_sem, self.sem_proj), ("identity", e_id, self.id_proj)):
            if emb is not None:
                w = (weights * indicator(lambda n, name=name: n == name)).sum(-1)  # [B]
                biases.append((w[:, None] * proj(emb.to(dtype)).float()).to(dtype))  # [B, H]
        noise = (weights * indicator(lambda n: n == "noise")).sum(-1) if self.training else None
        return SeqMixture(scale, biases, noise)

    def apply(self, h, mix: SeqMixture):
        """h [B, L, H] -> the mixture's output [B, L, H]."""
        out = h * mix.scale[:, None, None]
        for bias in mix.biases:
            out = out + bias[:, None]
        if mix.noise is not None and self.config.seq_noise_std > 0 and bool((mix.noise > 0).any()):
            noise = torch.randn_like(h) * self.config.seq_noise_std
            out = out + noise * mix.noise.to(h.dtype)[:, None, None]
        return out

    def forward(self, h, group, cond_mask, e_sem=None, e_id=None, route=None, mixture: SeqMixture | None = None):
        """h [B, L, H] -> (out [B, L, H], route); the routing is decided from h unless ``route`` is given, and a
        given ``mixture`` (routing and embeddings already folded in) is applied as it is (route None)."""
        if mixture is not None:
            return self.apply(h, mixture), None
        if route is None:
            route = self.route(h, group, cond_mask)
        return self.apply(h, self.mixture(route, group, h.dtype, e_sem, e_id)), route


def empty_route(batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing decision of a block without a sequence-level MoE: no expert chosen, (weights [B, 0] float32,
    experts [B, 0] int64)."""
    return (torch.zeros(batch, 0, dtype=torch.float32, device=device),
            torch.zeros(batch, 0, dtype=torch.long, device=device))


class Block(nn.Module):
    """Attention, then the MLP (token-level MoE or dense), then the sequence-level MoE; ``config.block`` says whether
    the MLP follows the attention (sequential) or runs beside it on the same LN (parallel)."""

    def __init__(self, config: FaceConfig):
        super().__init__()
        eps, H = config.layer_norm_eps, config.hidden_size
        self.parallel = config.block == "parallel"
        self.ln_attn = nn.LayerNorm(H, eps=eps)  # parallel: the MLP reads it too
        self.attn = Attention(config)
        ln_mlp = None if self.parallel else nn.LayerNorm(H, eps=eps)
        if config.mlp == "moe":
            self.ln_moe, self.moe, self.ln_mlp, self.mlp = ln_mlp, TokenMoE(config), None, None
        else:
            self.ln_moe, self.moe, self.ln_mlp, self.mlp = None, None, ln_mlp, DenseMLP(config)
        if config.seq_moe:
            self.ln_seq = nn.LayerNorm(H, eps=eps)
            self.seq_moe = SeqMoE(config)
        else:
            self.ln_seq = self.seq_moe = None

    def _feed_forward(self, h, ctx: BlockContext):
        """h [B, L, H] -> (MLP output [B, L, H], token router logits or None)."""
        if self.moe is not None:
            return self.moe(h, ctx.groups, ctx.router_logits, ctx.backend)
        return self.mlp(h, ctx.backend), None

    def forward(self, x, ctx: BlockContext, layer: int):
        """x [B, L, H] -> (x [B, L, H], router logits or None, route of the sequence-level MoE or None)."""
        if self.parallel:
            h = self.ln_attn(x)
            a = self.attn(h, ctx.mask, ctx.cos, ctx.sin, ctx.kv, layer, ctx.backend)
            y, router_logits = self._feed_forward(h, ctx)
            x = x + (a + y)  # Phi's order: (attn + mlp) + residual
        else:
            x = x + self.attn(self.ln_attn(x), ctx.mask, ctx.cos, ctx.sin, ctx.kv, layer, ctx.backend)
            ln = self.ln_moe if self.moe is not None else self.ln_mlp
            y, router_logits = self._feed_forward(ln(x), ctx)
            x = x + y
        if self.seq_moe is None:
            return x, router_logits, None if ctx.seq is not None else empty_route(x.shape[0], x.device)
        route = ctx.routes[layer] if ctx.routes is not None else None
        mixture = ctx.seq[layer] if ctx.seq is not None else None
        s, route = self.seq_moe(self.ln_seq(x), ctx.task, ctx.cond_mask, ctx.e_sem, ctx.e_id, route, mixture)
        return x + s, router_logits, route


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, L, V] (or [B, len(logits_positions), V])
    aux_loss: torch.Tensor  # load-balancing loss, summed over layers and groups
    routes: list  # per layer (weights [B, 2], experts [B, 2]) of the sequence-level MoE
    hidden: torch.Tensor | None = None


class FaceTransformer(nn.Module):
    """Unified understanding + generation transformer (reference implementation)."""

    def __init__(self, config: FaceConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Deterministic init (std 0.02, output projections scaled by depth; LayerNorms 1, biases 0)."""
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        std = 0.02
        out_std = std / (2 * self.config.num_layers) ** 0.5
        out_names = ("out.weight", "down_proj", "down_proj.weight", "fc2.weight", "sem_proj.weight", "id_proj.weight")
        for name, p in self.named_parameters():
            if p.dim() == 1:  # LayerNorm weights and biases, linear biases
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            scale = out_std if name.endswith(out_names) else std
            p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def set_backend(self, backend: str):
        """The backend of every op the model calls (grouped MoE, attention, int8 linear layers)."""
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = backend

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    weight_format = "float"  # "int8" once fastface.quantization.quantize_int8 has run

    def weights_version(self) -> tuple:
        """Changes whenever a parameter is modified in place or the weights are quantised (caches of derived values
        compare it)."""
        return (self.weight_format, *(p._version for p in self.parameters()))

    # ------------------------------------------------------------------------ pieces the engine calls
    def blocks(self, input_ids: torch.Tensor, ctx: BlockContext):
        """Embed ids [B, L] and run every block -> (hidden [B, L, H] before ln_f, router logits per layer,
        routes per layer)."""
        x = self.embed(input_ids)
        router_logits, routes = [], []
        for i, layer in enumerate(self.layers):
            x, logits, route = layer(x, ctx, i)
            router_logits.append(logits)
            routes.append(route)
        return x, router_logits, routes

    def head(self, hidden: torch.Tensor, columns: slice | None = None) -> torch.Tensor:
        """Final norm and LM head over hidden [..., H] -> logits [..., V], or only the vocabulary ``columns``."""
        h = self.ln_f(hidden)
        if columns is None:
            return self.lm_head(h)
        bias = self.lm_head.bias
        return F.linear(h, self.lm_head.weight[columns], None if bias is None else bias[columns])

    def seq_mixtures(self, routes: list, task: torch.Tensor, e_sem=None, e_id=None) -> list:
        """Per layer ``SeqMixture`` of fixed routes (and embeddings), for ``BlockContext.seq``; a block without a
        sequence-level MoE gets the identity (scale 1, no bias), which it does not read."""
        identity = SeqMixture(torch.ones(task.shape[0], dtype=self.dtype, device=task.device), [])
        return [layer.seq_moe.mixture(route, task, self.dtype, e_sem, e_id) if layer.seq_moe is not None else identity
                for layer, route in zip(self.layers, routes)]

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables of rotary positions [B, L]: (cos, sin) [B, 1, L, rd] float32, for ``BlockContext``."""
        return rotary_tables(positions, self.config.rotary_dim, self.config.rope_theta)

    # ------------------------------------------------------------------------------------ reference
    def forward(
        self,
        input_ids: torch.Tensor,
        task: torch.Tensor,
        *,
        cond_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        e_sem: torch.Tensor | None = None,
        e_id: torch.Tensor | None = None,
        logits_positions: torch.Tensor | None = None,
        return_hidden: bool = False,
        text_block: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Forward over ``input_ids`` [B, L] of sequences with ``task`` [B] (0 = mmu, 1 = t2i).

        Without a cache, the omni-attention mask, rotary positions and conditioning mask are derived from
        the ids. With a non-empty ``cache`` the new tokens attend to the cached ones and to each other
        (``attn_mask`` [B, L, Lc + L] may be given; default: every valid cached key plus causal among the
        new tokens) and the sequence-level routing stored at prefill is reused.
        ``logits_positions`` [P] restricts the LM head to those positions. ``text_block`` [B, L] bool marks a text
        diffusion block (``omni_attention_mask``): its rows attend bidirectionally within it, its <pad>s are tokens.
        """
        B, L = input_ids.shape
        c = self.config
        cached = cache is not None and cache.length > 0
        if attn_mask is None:
            if cached:
                new_valid = token_valid(input_ids, pad_id=c.pad_id, text_block=text_block)
                causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
                attn_mask = torch.cat([cache.key_valid[:, None, :].expand(B, L, -1),
                                       causal[None] & new_valid[:, None, :]], dim=-1)
            else:
                attn_mask = omni_attention_mask(input_ids, pad_id=c.pad_id, soi_id=c.soi_id, eoi_id=c.eoi_id,
                                                text_block=text_block)
        if positions is None:
            positions = default_positions(input_ids, pad_id=c.pad_id, text_block=text_block)
            if cached:
                positions = cache.next_position[:, None] + positions
        if cond_mask is None and not cached:
            cond_mask = default_cond_mask(input_ids, task, pad_id=c.pad_id, soi_id=c.soi_id, text_block=text_block)
        cos, sin = self.rotary(positions)
        groups = task[:, None].expand(B, L).reshape(B * L)
        ctx = BlockContext(mask=attn_mask[:, None], cos=cos, sin=sin, groups=groups, task=task, cond_mask=cond_mask,
                           e_sem=e_sem, e_id=e_id, kv=cache, routes=cache.routes if cached else None,
                           router_logits=self.training)
        x, router_logits, routes = self.blocks(input_ids, ctx)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training:
            valid = token_valid(input_ids, pad_id=c.pad_id, text_block=text_block).reshape(-1)
            for logits in router_logits:
                if logits is not None:  # None: a dense MLP has no router
                    aux = aux + load_balancing_loss(logits[valid], groups[valid], c.num_groups, c.top_k)
        if cache is not None:
            if not cached:
                cache.routes = routes
            valid_new = token_valid(input_ids, pad_id=c.pad_id, text_block=text_block)
            cache.key_valid = valid_new if not cached else torch.cat([cache.key_valid, valid_new], dim=1)
            cache.next_position = positions[:, -1] + 1
        h = self.ln_f(x)
        if logits_positions is not None:
            h = h[:, logits_positions]
        return ModelOutput(self.lm_head(h), aux, cache.routes if cached else routes, h if return_hidden else None)

    def causal_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] of plain causal language modelling over ids [B, L] (a backbone's text forward, as
        transformers' ``*ForCausalLM``): row i attends to rows 0..i, rotary positions 0..L-1, whatever the ids are --
        no padding, no image segment -- in the understanding group. A sequence-level MoE, if the model has one, routes
        from the whole sequence."""
        B, L = input_ids.shape
        device = input_ids.device
        mask = torch.ones(L, L, dtype=torch.bool, device=device).tril().expand(B, L, L)
        positions = torch.arange(L, device=device).expand(B, L)
        task = torch.full((B,), GROUP_UNDERSTANDING, dtype=torch.long, device=device)
        cond_mask = torch.ones(B, L, dtype=torch.bool, device=device)
        return self(input_ids, task, cond_mask=cond_mask, attn_mask=mask, positions=positions).logits
