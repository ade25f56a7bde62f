"""Weights of other models as ``FaceTransformer`` state dicts: key names and layouts, nothing else.

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

import torch

from fastface.config import FaceConfig

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


__all__ = ["PHI_VARIANT", "phi_state_dict_to_fastface"]
