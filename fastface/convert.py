"""Weights of other models as fastface checkpoints: key names, layouts and configs.

    fastface convert showo SRC DST [--backbone-config PHI.json] [--tokenizer TOKENIZER.json] [--vq MAGVIT_DIR]
                                   [--dtype bfloat16]

A converter maps a state dict onto a ``FaceConfig`` that describes the same network (the variant fields do the
describing, see fastface/config.py), so the model runs it unchanged. Every source key is used exactly once; a key
left over or missing is an error, never a silent drop.

Phi (transformers' ``PhiForCausalLM``; Show-o's backbone):

    model.embed_tokens.weight                          embed.weight
    model.layers.{i}.input_layernorm.{weight,bias}     layers.{i}.ln_attn.{weight,bias}
    model.layers.{i}.self_attn.{q,k,v}_proj.{w,b}      layers.{i}.attn.qkv.{w,b}      (rows: q, then k, then v)
    model.layers.{i}.self_attn.dense.{w,b}             layers.{i}.attn.out.{w,b}
    model.layers.{i}.mlp.fc{1,2}.{w,b}                 layers.{i}.mlp.fc{1,2}.{w,b}
    model.final_layernorm.{weight,bias}                ln_f.{weight,bias}
    lm_head.{weight,bias}                              lm_head.{weight,bias}
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fastface.config import PRESETS, FaceConfig
from fastface.weights import CheckpointError

# the variant fields a FaceConfig needs to describe a Phi network
PHI_VARIANT = dict(block="parallel", mlp="dense", mlp_activation="gelu_tanh", seq_moe=False, bias=True)


def phi_state_dict_to_fastface(state_dict: dict[str, torch.Tensor], config: FaceConfig) -> dict[str, torch.Tensor]:
    """A ``PhiForCausalLM`` state dict -> the ``FaceTransformer(config)`` state dict of the same network.

    ``config`` must be a Phi variant (``PHI_VARIANT``) of the same shape: hidden size, layers, heads, MLP width
    (``dense_ffn_size``), vocabulary (``vocab_size``), ``rotary_fraction`` = Phi's partial_rotary_factor. Tensors are
    not copied except the fused q/k/v. Raises ``ValueError`` for a config of another variant, a missing or unused
    key (Phi's optional q/k LayerNorms have no place here) or a tensor of the wrong shape.
    """
    wrong = {k: getattr(config, k) for k, v in PHI_VARIANT.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"a Phi state dict needs a config with {PHI_VARIANT}; this one has {wrong}")
    src = dict(state_dict)

    def take(key: str, shape: tuple) -> torch.Tensor:
        if key not in src:
            raise ValueError(f"Phi state dict: missing {key!r}")
        t = src.pop(key)
        if tuple(t.shape) != shape:
            raise ValueError(f"Phi state dict: {key!r} has shape {tuple(t.shape)}, the config needs {shape}")
        return t

    H, V, Fd = config.hidden_size, config.vocab_size, config.dense_ffn_size
    out = {"embed.weight": take("model.embed_tokens.weight", (V, H))}
    for i in range(config.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for name in ("weight", "bias"):
            out[q + f"ln_attn.{name}"] = take(p + f"input_layernorm.{name}", (H,))
        for name, shape in (("weight", (H, H)), ("bias", (H,))):
            out[q + f"attn.qkv.{name}"] = torch.cat([take(p + f"self_attn.{x}_proj.{name}", shape) for x in "qkv"])
            out[q + f"attn.out.{name}"] = take(p + f"self_attn.dense.{name}", shape)
        for fc, weight, bias in (("fc1", (Fd, H), (Fd,)), ("fc2", (H, Fd), (H,))):
            out[q + f"mlp.{fc}.weight"] = take(p + f"mlp.{fc}.weight", weight)
            out[q + f"mlp.{fc}.bias"] = take(p + f"mlp.{fc}.bias", bias)
    for name in ("weight", "bias"):
        out[f"ln_f.{name}"] = take(f"model.final_layernorm.{name}", (H,))
    out["lm_head.weight"] = take("lm_head.weight", (V, H))
    out["lm_head.bias"] = take("lm_head.bias", (V,))
    if src:
        raise ValueError(f"Phi state dict: {len(src)} key(s) with no place in the model: {sorted(src)[:5]}")
    return out


# ----------------------------------------------------------------------------------------------------- Show-o
# Show-o's checkpoint directory as published: config.json (the Showo module's fields) and model.safetensors, whose
# keys are the PhiForCausalLM's under "showo.". Its vocabulary: the backbone's text ids (llm_vocab_size, Phi-1.5's
# 50295), then Show-o's special tokens, then the image codes, then <mask>. The backbone's shape is Phi-1.5's unless
# a transformers PhiConfig json says otherwise; its tokenizer is Phi-1.5's, to which Show-o adds its tokens.
SHOWO_SPECIALS = ("[PAD]", "<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>",
                  "<|lvg|>")
SHOWO_FIELDS = {"w_clip_vit", "vocab_size", "llm_vocab_size", "llm_model_path", "codebook_size", "num_vq_tokens",
                "load_from_showo", "mask_token_id"}
PHI_1_5 = dict(model_type="phi", vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
               num_attention_heads=32, num_key_value_heads=None, hidden_act="gelu_new", layer_norm_eps=1e-5,
               rope_theta=10000.0, partial_rotary_factor=0.5, qk_layernorm=False, bos_token_id=50256,
               eos_token_id=50256, tie_word_embeddings=False)
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing ({what})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object ({what})")
    return data


def showo_config(showo: dict, phi: dict, *, eos_id: int, file: Path, image_size: int | None = None) -> FaceConfig:
    """The FaceConfig of a Show-o checkpoint: its config.json fields ``showo`` over the backbone's ``phi``;
    ``image_size`` in pixels (default: 16 per token a side, MAGVIT-v2's downsampling)."""
    unknown = sorted(k for k in showo if k not in SHOWO_FIELDS and not k.startswith("_"))
    if unknown:
        raise CheckpointError(f"{file}: unknown Show-o config field(s) {unknown}")
    for key in ("vocab_size", "llm_vocab_size", "codebook_size", "num_vq_tokens"):
        if not isinstance(showo.get(key), int) or isinstance(showo.get(key), bool) or showo[key] <= 0:
            raise CheckpointError(f"{file}: field {key!r} must be a positive int, got {showo.get(key)!r}")
    if showo.get("w_clip_vit"):
        raise CheckpointError(f"{file}: w_clip_vit is true: the CLIP-ViT understanding variant of Show-o "
                              f"(mm_projector) is not supported, only its VQ-token form")
    V, text, codes = showo["vocab_size"], showo["llm_vocab_size"], showo["codebook_size"]
    specials = V - text - codes - 1
    if specials != len(SHOWO_SPECIALS):
        raise CheckpointError(f"{file}: vocab_size {V} = llm_vocab_size {text} + {specials} special tokens + "
                              f"codebook_size {codes} + 1 mask; Show-o has {len(SHOWO_SPECIALS)} special tokens")
    if showo.get("mask_token_id", V - 1) != V - 1:
        raise CheckpointError(f"{file}: mask_token_id {showo['mask_token_id']} must be vocab_size - 1 = {V - 1}")
    grid = math.isqrt(showo["num_vq_tokens"])
    if grid * grid != showo["num_vq_tokens"]:
        raise CheckpointError(f"{file}: num_vq_tokens {showo['num_vq_tokens']} is not a square grid")
    if phi.get("model_type") != "phi":
        raise CheckpointError(f"the backbone config names model_type {phi.get('model_type')!r}; Show-o's backbone "
                              f"is Phi ('phi')")
    for key, want in (("hidden_act", "gelu_new"), ("qk_layernorm", False), ("tie_word_embeddings", False)):
        if phi.get(key, want) != want:
            raise CheckpointError(f"the backbone config has {key}={phi[key]!r}; this converter reads {want!r}")
    heads = phi["num_attention_heads"]
    if phi.get("num_key_value_heads") not in (None, heads):
        raise CheckpointError(f"the backbone config has num_key_value_heads={phi['num_key_value_heads']} != "
                              f"num_attention_heads={heads}: grouped-query attention is not supported")
    pad, soi, eoi, t2i, mmu = (text + SHOWO_SPECIALS.index(t) for t in ("[PAD]", "<|soi|>", "<|eoi|>", "<|t2i|>",
                                                                           "<|mmu|>"))
    base = "showo-512" if grid == 32 else "showo-256"
    try:
        fields = dict(
            PRESETS[base], name=f"showo-{16 * grid}", text_vocab_size=text + specials, codebook_size=codes,
            image_grid=grid, image_size=image_size or 16 * grid, hidden_size=phi["hidden_size"],
            num_layers=phi["num_hidden_layers"],
            num_heads=heads, dense_ffn_size=phi["intermediate_size"], rope_theta=float(phi["rope_theta"]),
            layer_norm_eps=float(phi["layer_norm_eps"]), rotary_fraction=float(phi["partial_rotary_factor"]),
            special_token_ids=(pad, eos_id, eos_id, t2i, mmu, soi, eoi, eos_id))
        return FaceConfig(**fields)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{file}: the Show-o config does not describe a model fastface runs ({exc})") from None


def read_safetensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``src``'s model.safetensors (or the shards its model.safetensors.index.json names). A
    directory holding only pickle checkpoints is refused, its files never opened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted({str(v) for v in weight_map.values()})
        if any("/" in f or f.startswith("..") for f in files):
            raise CheckpointError(f"{index}: shard names must be files in {src}")
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(f.name for f in src.iterdir() if f.suffix in PICKLES) if src.is_dir() else []
        if pickles:
            raise CheckpointError(f"{src}: only pickle checkpoints ({', '.join(pickles)}); fastface reads safetensors "
                                  f"only and never unpickles (convert it with safetensors' own tools first)")
        raise CheckpointError(f"{src}: no model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_file(str(src / name))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{src / name}: not a readable safetensors file ({exc})") from None
        for key, t in part.items():
            if key in tensors:
                raise CheckpointError(f"{src / name}: tensor {key!r} appears in two shards")
            tensors[key] = t
    return tensors


def showo_tokenizer(file: Path, text_vocab: int):
    """The backbone's tokenizer.json with Show-o's special tokens added after its ``text_vocab`` tokens."""
    from tokenizers import AddedToken, Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{file}: not a readable tokenizer ({exc})") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != text_vocab:
        raise CheckpointError(f"{file}: the tokenizer has {size} tokens, the Show-o config's llm_vocab_size is "
                              f"{text_vocab}")
    if tokenizer.token_to_id("<|endoftext|>") is None:
        raise CheckpointError(f"{file}: no <|endoftext|> token (Phi's tokenizer has one)")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SHOWO_SPECIALS])
    for i, t in enumerate(SHOWO_SPECIALS):
        if tokenizer.token_to_id(t) != text_vocab + i:
            raise CheckpointError(f"{file}: the tokenizer already holds {t!r}; Show-o adds it at {text_vocab + i}")
    return tokenizer


def convert_showo(src, dst, *, backbone_config=None, tokenizer=None, vq=None, dtype: str | None = None) -> Path:
    """A Show-o checkpoint directory ``src`` -> a fastface checkpoint directory ``dst`` (returned).

    ``backbone_config``: a transformers PhiConfig json (default: Phi-1.5's shape, which Show-o's
    ``llm_model_path`` must then name). ``tokenizer``: the backbone's tokenizer.json (default: ``src``'s).
    ``vq``: Show-o's MAGVIT-v2 image tokenizer (a directory with config.json + model.safetensors, or the file),
    so the checkpoint returns images; its token count and codebook must be the Show-o config's.
    ``dtype``: of the written weights (default: as stored). Raises ``CheckpointError`` naming the file, field or
    key for anything that does not fit.
    """
    from fastface.checkpoint import DTYPES, dtype_name, save_state

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    showo = read_json(src / "config.json", "Show-o config")
    if backbone_config is None:
        path = str(showo.get("llm_model_path", ""))
        if "phi-1_5" not in path.lower() and "phi-1.5" not in path.lower():
            raise CheckpointError(f"{src / 'config.json'}: llm_model_path {path!r} does not name Phi-1.5; pass the "
                                  f"backbone's PhiConfig json as --backbone-config")
        phi = dict(PHI_1_5)
    else:
        phi = {**PHI_1_5, **read_json(Path(backbone_config), "backbone PhiConfig")}
    tok_file = Path(tokenizer) if tokenizer is not None else src / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file}: missing; Show-o reads Phi-1.5's tokenizer, pass its tokenizer.json as "
                              f"--tokenizer")
    text = showo.get("llm_vocab_size")
    eos = phi.get("eos_token_id")
    if not isinstance(eos, int) or not isinstance(text, int) or not 0 <= eos < text:
        raise CheckpointError(f"the backbone's eos_token_id {eos!r} must be a text id below llm_vocab_size {text!r}")
    image_tokenizer = None
    if vq is not None:
        from fastface.vq.magvit import MagvitTokenizer

        image_tokenizer = MagvitTokenizer.load(vq)
        got = (image_tokenizer.config.num_tokens, image_tokenizer.config.codebook_size)
        want = (showo.get("num_vq_tokens"), showo.get("codebook_size"))
        if got != want:
            raise CheckpointError(f"{vq}: the image tokenizer makes {got[0]} tokens of {got[1]} codes; the Show-o "
                                  f"config says num_vq_tokens {want[0]}, codebook_size {want[1]}")
    config = showo_config(showo, phi, eos_id=eos, file=src / "config.json",
                          image_size=image_tokenizer.config.resolution if image_tokenizer is not None else None)
    tok = showo_tokenizer(tok_file, text)
    if tok.token_to_id("<|endoftext|>") != eos:
        raise CheckpointError(f"{tok_file}: <|endoftext|> is id {tok.token_to_id('<|endoftext|>')}, the backbone's "
                              f"eos_token_id is {eos}")
    tensors = read_safetensors(src)
    foreign = sorted(k for k in tensors if not k.startswith("showo."))
    if foreign:
        raise CheckpointError(f"{src}: tensor(s) outside the Show-o module 'showo.': {foreign[:5]}")
    try:
        state = phi_state_dict_to_fastface({k[len("showo."):]: v for k, v in tensors.items()}, config)
    except ValueError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    stored = dtype or (dtype_name(floats.pop()) if len(floats) == 1 else "float32")
    if stored not in DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {stored!r}")
    return save_state(dst, config, state, tok, image_tokenizer, dtype=stored)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    s = sub.add_parser("showo", help="a Show-o checkpoint directory (config.json + model.safetensors)",
                       description="Convert a Show-o checkpoint (safetensors only; pickle files are refused, never "
                       "loaded) into a fastface checkpoint directory.")
    s.add_argument("src", help="Show-o checkpoint directory")
    s.add_argument("dst", help="fastface checkpoint directory to write")
    s.add_argument("--backbone-config", default=None,
                   help="transformers PhiConfig json of the backbone (default: Phi-1.5's shape)")
    s.add_argument("--tokenizer", default=None, help="the backbone's tokenizer.json (default: SRC/tokenizer.json)")
    s.add_argument("--vq", default=None, help="Show-o's MAGVIT-v2 image tokenizer (a directory with config.json and "
                   "model.safetensors): the converted checkpoint then returns images, not only tokens")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="dtype of the written weights "
                   "(default: as stored)")


def run(args) -> int:
    out = convert_showo(args.src, args.dst, backbone_config=args.backbone_config, tokenizer=args.tokenizer,
                        vq=args.vq, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


__all__ = ["PHI_VARIANT", "phi_state_dict_to_fastface", "SHOWO_SPECIALS", "convert_showo"]
