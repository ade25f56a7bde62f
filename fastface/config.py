"""Model configuration: one dataclass, named presets.

Vocabulary layout (ids of the unified transformer):

    [0, text_vocab_size)                         text tokenizer ids, the special tokens among them
    [text_vocab_size, text_vocab_size + K)       image codebook (K = codebook_size)
    text_vocab_size + K                          <mask>

The special tokens are text tokenizer ids, at ``special_token_ids`` (in ``SPECIAL_TOKENS`` order; default 0..7).
Show-o's vocabulary fits the same layout: Phi's 50295 text ids, then the 10 tokens Show-o adds to the text tokenizer
([PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>), so text_vocab_size = 50305, then
8192 codes and <mask> (58497); its <bos>, <eos> and <unk> are all Phi's <|endoftext|> (50256).
See the "showo-256" preset.

Architecture variants (the model's branches are in fastface/model.py):

    block    "sequential": x += Attn(LN(x)); x += MLP(LN(x))      "parallel" (Phi): x += Attn(LN(x)) + MLP(LN(x))
    mlp      "moe": grouped token-level MoE                          "dense": one MLP per block (``mlp_activation``)
    seq_moe  the grouped sequence-level MoE sublayer after the MLP, x += SeqMoE(LN(x)) (on or off)
    rotary_fraction, bias: rotary on the first int(head_dim * fraction) dims of each head; biases on the attention
             projections, the dense MLP and the LM head

Sequence layouts (Show-o):

    t2i: <pad>… <t2i> <bos> text <eos> <soi> img_1 … img_N <eoi>      (prompt left-padded to max_text_len)
    mmu: <pad>… <mmu> <soi> img_1 … img_N <eoi> <bos> question … answer <eos>
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fastface.checks import check_config_float, check_config_int, check_config_ints

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<t2i>", "<mmu>", "<soi>", "<eoi>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, T2I_ID, MMU_ID, SOI_ID, EOI_ID, UNK_ID = range(len(SPECIAL_TOKENS))

# Expert groups of both MoE levels: a token's group is its sequence's task.
GROUP_UNDERSTANDING = 0  # mmu
GROUP_GENERATION = 1  # t2i

# Sequence-level experts, in router order, per group (ARCHITECTURE.md; the sequence-level MoE in fastface/model.py).
SEQ_EXPERTS = {
    GROUP_UNDERSTANDING: ("semantic", "identity", "copy", "copy"),
    GROUP_GENERATION: ("copy", "zero", "noise", "copy"),
}


# Bounds of a config, checked before anything is allocated (a crafted config.json must fail fast, not build
# ten million layers). Generous: real models sit well inside (Show-o 1.3B: hidden 2048, 24 layers, 32 heads,
# vocabulary 58498, MLP 8192; Llama-3 405B: hidden 16384, 126 layers, 128 heads, MLP 53248; DeepSeek-V3: 256
# routed experts; Gemma: 256k text tokens; MAGVIT-v2: 2**18 codes). Whether a config in bounds fits this machine
# is the memory estimate's question (fastface.checkpoint), not theirs.
MAX_LAYERS = 512
MAX_HIDDEN = 65536  # hidden_size, sem_dim, id_dim
MAX_HEADS = 1024
MAX_VOCAB = 2**20  # text_vocab_size and codebook_size, each
MAX_FFN = 2**18  # expert_ffn_size, shared_ffn_size
MAX_EXPERTS = 1024  # routed and shared experts per group
MAX_LENGTH = 65536  # max_text_len, max_answer_len (tokens)
MAX_IMAGE_GRID = 256  # tokens per image side: at most 65536 image tokens
MAX_IMAGE_SIZE = 16384  # pixels per side


@dataclass
class FaceConfig:
    """Shape and hyper-parameters of a UniF²ace-style model.

    Derived fields (``head_dim``, ``rotary_dim``, ``image_tokens``, ``mask_token_id``, ``vocab_size``) are computed
    in ``__post_init__`` and are not part of the serialised config. A field added later has a default that keeps
    the model every earlier config.json describes.
    """

    name: str = "custom"
    # vocabulary
    text_vocab_size: int = 64  # includes the 8 special tokens
    codebook_size: int = 64
    special_token_ids: tuple[int, ...] = tuple(range(len(SPECIAL_TOKENS)))  # id of each of SPECIAL_TOKENS
    # transformer
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    max_text_len: int = 16  # prompt length incl. <t2i> <bos> … <eos>, left-padded
    max_answer_len: int = 16
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    # architecture variant (the module docstring; defaults: the UniF²ace-style model)
    block: str = "sequential"  # "sequential" | "parallel" (one LN read by attention and MLP, as Phi)
    mlp: str = "moe"  # "moe" (grouped token-level MoE) | "dense" (one MLP)
    mlp_activation: str = "swiglu"  # dense MLP: "swiglu" down(silu(gate x) * up x) | "gelu_tanh" fc2(gelu(fc1 x))
    dense_ffn_size: int = 128  # width of the dense MLP
    seq_moe: bool = True  # the grouped sequence-level MoE sublayer
    rotary_fraction: float = 1.0  # rotary on the first int(head_dim * rotary_fraction) dims of each head
    bias: bool = False  # biases on q/k/v/out, the dense MLP and the LM head
    # image
    image_size: int = 64
    image_grid: int = 4  # tokens per side: N = image_grid ** 2
    # grouped token-level MoE
    num_groups: int = 2
    num_experts: int = 4  # routed experts per group (E)
    num_shared_experts: int = 1  # always-on experts per group (S)
    top_k: int = 2
    expert_ffn_size: int = 32  # F
    shared_ffn_size: int = 32  # Fs
    normalize_topk: bool = True
    router_aux_loss_coef: float = 0.01
    # grouped sequence-level MoE (4 experts per group, top-2; see SEQ_EXPERTS)
    seq_num_experts: int = 4
    seq_top_k: int = 2
    seq_noise_std: float = 0.1  # sigma of the Noise expert, training only
    sem_dim: int = 16  # e_sem width (CLIP-like semantic embedding)
    id_dim: int = 16  # e_id width (face-recognition identity embedding)
    # D3Diff loss
    d3diff_alpha: float = 0.1
    d3diff_r_max: float | None = 10.0  # clip of r = 1 / (e^sigma - 1); None = no clip
    # training
    cond_dropout: float = 0.1  # probability of replacing a t2i prompt by the empty prompt
    # derived
    head_dim: int = field(init=False, repr=False)
    rotary_dim: int = field(init=False, repr=False)
    image_tokens: int = field(init=False, repr=False)
    mask_token_id: int = field(init=False, repr=False)
    vocab_size: int = field(init=False, repr=False)

    def __post_init__(self):
        self.validate()
        self.special_token_ids = tuple(self.special_token_ids)  # a JSON list reads back as the tuple
        self.head_dim = self.hidden_size // self.num_heads
        self.rotary_dim = int(self.head_dim * self.rotary_fraction)
        self.image_tokens = self.image_grid**2
        self.mask_token_id = self.text_vocab_size + self.codebook_size
        self.vocab_size = self.mask_token_id + 1

    def validate(self) -> None:
        """Check every field against its type and bound (``MAX_*`` above) before anything is allocated; a
        ``ValueError`` naming the field and the value. A config read from a file is data: a wrong type is a bad
        value too."""
        if not isinstance(self.name, str):
            raise ValueError(f"config field 'name' must be a string, got {type(self.name).__name__}")
        for name, lo, hi in _INT_FIELDS:
            check_config_int(name, getattr(self, name), lo, hi)
        if self.text_vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"text_vocab_size={self.text_vocab_size} must exceed the {len(SPECIAL_TOKENS)} specials")
        self._validate_special_token_ids()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        check_config_float("rotary_fraction", self.rotary_fraction, positive=True, hi=1)
        rotary_dim = int(self.hidden_size // self.num_heads * self.rotary_fraction)
        if self.rotary_fraction == 1 and rotary_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(f"config field 'rotary_fraction'={self.rotary_fraction!r} rotates int(head_dim * "
                             f"rotary_fraction) = {rotary_dim} dims of each head; that must be a positive even number")
        _check_choice("block", self.block, BLOCKS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        if self.mlp == "moe" and self.mlp_activation != "swiglu":
            raise ValueError(f"config field 'mlp_activation'={self.mlp_activation!r} needs mlp='dense': the token "
                             f"experts are SwiGLU")
        for name in ("normalize_topk", "seq_moe", "bias"):
            _check_bool(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_groups != 2:
            raise ValueError(f"num_groups={self.num_groups}: the model has 2 groups (understanding, generation)")
        if self.seq_num_experts != 4 or self.seq_top_k != 2:
            raise ValueError("the sequence-level MoE has 4 experts per group with top-2 routing")
        if self.num_shared_experts and self.shared_ffn_size <= 0:
            raise ValueError("num_shared_experts must be >= 0 with a positive shared_ffn_size")
        check_config_float("rope_theta", self.rope_theta, positive=True)
        check_config_float("layer_norm_eps", self.layer_norm_eps, positive=True)
        check_config_float("router_aux_loss_coef", self.router_aux_loss_coef, lo=0)
        check_config_float("seq_noise_std", self.seq_noise_std, lo=0)
        check_config_float("d3diff_alpha", self.d3diff_alpha, lo=0)
        if self.d3diff_r_max is not None:
            check_config_float("d3diff_r_max", self.d3diff_r_max, positive=True)
        check_config_float("cond_dropout", self.cond_dropout, lo=0, hi=1)

    def _validate_special_token_ids(self) -> None:
        """Each special a text id; the ids the masks and prompts read (<pad>, <t2i>, <mmu>, <soi>, <eoi>) distinct
        from each other and from the rest. <bos>, <eos> and <unk> may share one (Phi's <|endoftext|> is all three)."""
        ids = check_config_ints("special_token_ids", self.special_token_ids, 0, MAX_VOCAB,
                                min_len=len(SPECIAL_TOKENS), max_len=len(SPECIAL_TOKENS))
        for token, i in zip(SPECIAL_TOKENS, ids):
            if i >= self.text_vocab_size:
                raise ValueError(f"config field 'special_token_ids': {token} id {i} is not a text id "
                                 f"(text_vocab_size={self.text_vocab_size})")
        owner: dict[int, str] = {}
        for token, i in zip(SPECIAL_TOKENS, ids):
            other = owner.setdefault(i, token)
            if other != token and not {other, token} <= _SHAREABLE_SPECIALS:
                raise ValueError(f"config field 'special_token_ids': {other} and {token} share id {i}; only "
                                 f"{', '.join(sorted(_SHAREABLE_SPECIALS))} may share one")

    # the special ids, by name
    pad_id = property(lambda self: self.special_token_ids[0])
    bos_id = property(lambda self: self.special_token_ids[1])
    eos_id = property(lambda self: self.special_token_ids[2])
    t2i_id = property(lambda self: self.special_token_ids[3])
    mmu_id = property(lambda self: self.special_token_ids[4])
    soi_id = property(lambda self: self.special_token_ids[5])
    eoi_id = property(lambda self: self.special_token_ids[6])
    unk_id = property(lambda self: self.special_token_ids[7])

    @property
    def image_token_offset(self) -> int:
        """Id of codebook entry 0 in the unified vocabulary."""
        return self.text_vocab_size

    @property
    def t2i_length(self) -> int:
        """Length of a t2i sequence: prompt + <soi> + N image tokens + <eoi>."""
        return self.max_text_len + self.image_tokens + 2

    def num_parameters(self) -> int:
        """Parameter count of the transformer (excluding the image tokenizer), for every variant."""
        h, b = self.hidden_size, int(self.bias)
        attn = 4 * h * h + b * 4 * h
        if self.mlp == "moe":
            f, fs = self.expert_ffn_size, self.shared_ffn_size
            g, e, s = self.num_groups, self.num_experts, self.num_shared_experts
            mlp = g * (e * h + e * 3 * h * f + s * 3 * h * fs)
        else:
            f = self.dense_ffn_size
            mats = 3 if self.mlp_activation == "swiglu" else 2  # gate, up, down | fc1, fc2
            mlp = mats * h * f + b * ((mats - 1) * f + h)
        seq = self.num_groups * (self.seq_num_experts * h) + h * (self.sem_dim + self.id_dim) if self.seq_moe else 0
        norms = (1 + (self.block == "sequential") + self.seq_moe) * 2 * h  # LNs before attention, MLP, sequence MoE
        embed, head = self.vocab_size * h, self.vocab_size * (h + b)
        return embed + head + self.num_layers * (attn + mlp + seq + norms) + 2 * h

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict) -> FaceConfig:
        if not isinstance(data, dict):
            raise TypeError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(map(repr, unknown))}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides) -> FaceConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})


BLOCKS = ("sequential", "parallel")
MLPS = ("moe", "dense")
MLP_ACTIVATIONS = ("swiglu", "gelu_tanh")
_SHAREABLE_SPECIALS = frozenset({"<bos>", "<eos>", "<unk>"})


def _check_choice(field: str, value, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
        raise ValueError(f"config field {field!r} must be one of {', '.join(map(repr, choices))}, got {shown}")


def _check_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"config field {field!r} must be true or false, got {type(value).__name__}")


# (field, lo, hi) of every int field; the cross-field rules are in FaceConfig.validate
_INT_FIELDS = (
    ("text_vocab_size", 1, MAX_VOCAB), ("codebook_size", 1, MAX_VOCAB), ("hidden_size", 1, MAX_HIDDEN),
    ("num_layers", 1, MAX_LAYERS), ("num_heads", 1, MAX_HEADS), ("max_text_len", 1, MAX_LENGTH),
    ("max_answer_len", 1, MAX_LENGTH), ("image_size", 1, MAX_IMAGE_SIZE), ("image_grid", 1, MAX_IMAGE_GRID),
    ("num_groups", 1, 2), ("num_experts", 1, MAX_EXPERTS), ("num_shared_experts", 0, MAX_EXPERTS),
    ("top_k", 1, MAX_EXPERTS), ("expert_ffn_size", 1, MAX_FFN), ("shared_ffn_size", 0, MAX_FFN),
    ("seq_num_experts", 1, 4), ("seq_top_k", 1, 4), ("sem_dim", 1, MAX_HIDDEN), ("id_dim", 1, MAX_HIDDEN),
    ("dense_ffn_size", 1, MAX_FFN),
)

PRESETS: dict[str, dict] = {
    # unit tests: a full forward takes milliseconds
    "tiny": dict(
        text_vocab_size=64, codebook_size=64, hidden_size=32, num_layers=2, num_heads=4, max_text_len=16,
        max_answer_len=8, image_grid=4, num_experts=4, num_shared_experts=1, top_k=2, expert_ffn_size=24,
        shared_ffn_size=24, sem_dim=8, id_dim=8,
    ),
    # the embedded default: 64x64 faces as 16x16 = 256 tokens
    "face-s": dict(
        text_vocab_size=256, codebook_size=512, hidden_size=256, num_layers=5, num_heads=8, max_text_len=64,
        max_answer_len=8, image_grid=16, num_experts=4, num_shared_experts=1, top_k=2, expert_ffn_size=192,
        shared_ffn_size=256, sem_dim=64, id_dim=64,
    ),
    # Show-o 256x256 as released: Phi-1.5 (parallel blocks, dense gelu MLP, half rotary, biases) over the Show-o
    # vocabulary (module docstring); the t2i prompt is Show-o's max_seq_length 128 + the <|t2i|> token
    "showo-256": dict(
        text_vocab_size=50305, codebook_size=8192,
        # [PAD]; <bos>, <eos> and <unk> are <|endoftext|>; <|t2i|> <|mmu|> <|soi|> <|eoi|>
        special_token_ids=(50295, 50256, 50256, 50300, 50301, 50296, 50297, 50256),
        hidden_size=2048, num_layers=24, num_heads=32, max_text_len=129, max_answer_len=64, image_size=256,
        image_grid=16, block="parallel", mlp="dense", mlp_activation="gelu_tanh", dense_ffn_size=8192, seq_moe=False,
        rotary_fraction=0.5, bias=True,
    ),
}
# the CPU speed benchmarks' mid-size MoE (random weights): face-s's layout at 507M parameters, experts of 1024
PRESETS["moe-507m"] = dict(
    PRESETS["face-s"], text_vocab_size=1000, codebook_size=8192, hidden_size=1024, num_layers=8, num_heads=16,
    num_experts=8, expert_ffn_size=1024, shared_ffn_size=1024,
)
# Show-o 512x512: the same backbone and vocabulary, 32 x 32 = 1024 image tokens
PRESETS["showo-512"] = dict(PRESETS["showo-256"], image_size=512, image_grid=32)
# UniF2ace at the paper's size: the Show-o backbone with the grouped token-level MoE (per group 1 shared + 8 routed
# SwiGLU experts of 416, top-4) and the sequence-level MoE in place of the dense MLP: 1.81B parameters
PRESETS["unif2ace-2b"] = dict(
    PRESETS["showo-256"], mlp="moe", mlp_activation="swiglu", seq_moe=True, num_experts=8, num_shared_experts=1,
    top_k=4, expert_ffn_size=416, shared_ffn_size=416, sem_dim=768, id_dim=512,
)


def cosine_schedule(ratio: float) -> float:
    """Fraction of image tokens still masked at progress ``ratio`` in [0, 1]."""
    return math.cos(math.pi / 2 * ratio)
