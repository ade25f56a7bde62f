"""transformers integration: the C++ grouped-expert kernel as an experts implementation named "fastface".

    import fastface.hf                    # registers "fastface" with transformers (import fastface does not)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="fastface")

Any transformers MoE whose experts class uses ``use_experts_implementation`` (Mixtral, Qwen-MoE, OLMoE, ...)
can then run its experts on fastface's CPU kernel: one group, no shared expert, the model's own router
and weight layout (``gate_up_proj [E, 2F, H]`` gate rows first, ``down_proj [E, H, F]``). Layouts or
features the kernel does not cover (transposed or interleaved weights, biases, ungated experts, a custom
gate, a post-expert norm, expert parallelism, activations other than SiLU and tanh-GELU, non-CPU
tensors, autograd) run transformers' own ``grouped_mm`` implementation instead, which computes the same
result.

Importing this module raises ImportError when transformers is not installed.

Legend: T tokens, H hidden, E experts, F ffn width, K top-k.
"""

from __future__ import annotations

import torch
from transformers.integrations import moe as _hf_moe

NAME = "fastface"

# activation modules of transformers.activations (and torch) that the kernel computes exactly
_SILU_TYPES = ("SiLU", "SiLUActivation", "SwishActivation")
_GELU_TANH_TYPES = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation")


def _activation_name(experts) -> str | None:
    """'silu' / 'gelu' for the experts' activation module, or None when the kernel has no match for it."""
    act = getattr(experts, "act_fn", None)
    if isinstance(act, torch.nn.GELU):
        return "gelu" if act.approximate == "tanh" else None
    name = type(act).__name__
    if name in _SILU_TYPES:
        return "silu"
    if name in _GELU_TANH_TYPES:
        return "gelu"
    return None


def _kernel_applies(experts, hidden_states: torch.Tensor) -> str | None:
    """The activation name when the fastface kernel computes this experts call exactly, else None."""
    if hidden_states.device.type != "cpu" or hidden_states.dtype not in (torch.float32, torch.bfloat16):
        return None
    if torch.is_grad_enabled() and (hidden_states.requires_grad or experts.gate_up_proj.requires_grad):
        return None  # the kernel is forward-only
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_bias", False):
        return None
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        return None
    if getattr(experts, "has_post_expert_norm", False) or getattr(experts, "_is_expert_parallel", False):
        return None
    if getattr(type(experts), "_apply_gate", _hf_moe._default_apply_gate) is not _hf_moe._default_apply_gate:
        return None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    if gate_up.dtype != hidden_states.dtype or down.dtype != hidden_states.dtype:
        return None
    return _activation_name(experts)


def fastface_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward on the fastface C++ kernel.

    Parameters
    ----------
    hidden_states : Tensor [T, H]
    top_k_index : Tensor [T, K] int64 -- chosen experts, from the model's router
    top_k_weights : Tensor [T, K] -- their routing weights

    Returns
    -------
    Tensor [T, H] in hidden_states.dtype: sum_k w[t, k] * down_e(act(gate_e x_t) * up_e x_t).
    """
    activation = _kernel_applies(self, hidden_states)
    if activation is None:
        return _hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    from fastface import _cpp

    return _cpp.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                            activation=activation)


def register() -> bool:
    """Register "fastface" in transformers' ExpertsInterface (once). Returns whether the C++ kernel is built.

    Without fastface._C the name still resolves (so configs that ask for it load) and runs transformers'
    grouped_mm implementation.
    """
    try:
        from fastface import _cpp  # noqa: F401
        built = True
    except ImportError:
        built = False
    forward = fastface_experts_forward if built else _hf_moe.grouped_mm_experts_forward
    _hf_moe.ExpertsInterface.register(NAME, forward)
    return built


register()  # importing this module is the registration

__all__ = ["NAME", "fastface_experts_forward", "register"]
