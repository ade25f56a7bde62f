"""Opt-in int8 weights for a transformer: the attention projections and every expert of the token-level MoE.

    from fastface.quantization import quantize_int8
    quantize_int8(model)                       # in place; or fastface.load(..., weights="int8"), --weights int8

Each quantised linear layer keeps int8 values per output channel with a float32 scale (``fastface.ops.int8``: the
activations are quantised per token at every call, the integer products exact) and runs through
``ops.int8_linear`` -- the C++ kernel (AVX512-VNNI where the CPU has it) or the reference, bitwise the same. What is
quantised: q/k/v and the attention output (``Attention.qkv``, ``Attention.out``), the routed experts' gate/up and
down matrices and the shared experts' (packed per group, as the sorted dispatch runs them), and a dense MLP's linear
layers where a block has one instead of experts (the Phi / Show-o blocks). What stays as it was: the
embeddings, norms, routers, the sequence-level MoE, the embedding experts' projections and the LM head (their
outputs pick tokens or experts directly, and they are a small part of the work). The float weights of what is
quantised are dropped, so the expert and attention weights take a quarter of their float32 memory.

Forward only: a quantised model decodes and evaluates; it does not train. Its effect on generated faces is measured
by ``bench/bench_int8.py`` (attribute-judge accuracy, token agreement with the float model, speed).

A dtype cast of the model (``model.to(torch.bfloat16)``) casts the activations' dtype only: the int8 values and
their float32 scales stay as they are, and the products come back in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastface import ops
from fastface.checks import WEIGHT_FORMATS  # noqa: F401 - the choices load(weights=) takes
from fastface.ops.int8 import Int8Weight
from fastface.ops.int8 import quantize_int8 as quantize_weight


class _Int8Buffers(nn.Module):
    """Holds Int8Weights as buffers (``<name>_packed``, ``<name>_scale``, ``<name>_sums``): they move with the module
    and appear in its state dict; dtype casts leave them alone."""

    backend = "auto"  # for ops.int8_linear; FaceTransformer.set_backend sets it with the others

    def _put(self, name: str, w: Int8Weight) -> None:
        self.register_buffer(f"{name}_packed", w.packed)
        self.register_buffer(f"{name}_scale", w.scale)
        self.register_buffer(f"{name}_sums", w.sums)
        setattr(self, f"_{name}_k", w.in_features)

    def _get(self, name: str) -> Int8Weight:
        return Int8Weight(getattr(self, f"{name}_packed"), getattr(self, f"{name}_scale"),
                          getattr(self, f"{name}_sums"), getattr(self, f"_{name}_k"))

    def _apply(self, fn, recurse=True):
        # float32 scales and biases travel as their int32 bits, so a dtype cast moves them without rounding them
        kept = {n: b.dtype for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        for n in kept:
            self._buffers[n] = self._buffers[n].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for n in kept:
                self._buffers[n] = self._buffers[n].view(torch.float32)

    def linear(self, x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
        return ops.int8_linear(x, w, bias, backend=backend or self.backend)


class Int8Linear(_Int8Buffers):
    """``nn.Linear`` with int8 weights (``ops.int8_linear``); the bias, if any, in float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._put("weight", quantize_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """``backend``: of ``ops.int8_linear`` for this call (None: the module's own, set by ``set_backend``)."""
        return self.linear(x, self._get("weight"), self.bias, backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Experts(_Int8Buffers):
    """A ``TokenMoE``'s experts in int8, run by the sorted dispatch (``torch_backend.sorted_moe``): each routed expert
    on its own tokens, the shared experts of a group as one packed pair of matrices."""

    def __init__(self, moe):
        super().__init__()
        self._put("gate_up", quantize_weight(moe.gate_up_proj.detach()))  # [G, E, 2F, H]
        self._put("down", quantize_weight(moe.down_proj.detach()))  # [G, E, H, F]
        self.shared = moe.shared_gate_up_proj is not None
        if self.shared:
            from fastface.torch_backend import pack_experts

            # [G, S, 2Fs, H], [G, S, H, Fs] -> [G, 2 S Fs, H], [G, H, S Fs]: what the float sorted dispatch runs
            w1, w2 = pack_experts(moe.shared_gate_up_proj.detach(), moe.shared_down_proj.detach())
            self._put("shared_w1", quantize_weight(w1))
            self._put("shared_w2", quantize_weight(w2))

    def forward(self, x, groups, router_weight, *, top_k, normalize_topk, return_router_logits=False, backend=None):
        from fastface.torch_backend import sorted_moe

        gate_up, down = self._get("gate_up"), self._get("down")
        shared = None
        if self.shared:
            w1, w2 = self._get("shared_w1"), self._get("shared_w2")

            def shared(g):
                return w1[g], w2[g]

        return sorted_moe(x, groups, router_weight, lambda g, e: (gate_up[g, e], down[g, e]), shared, top_k=top_k,
                          normalize_topk=normalize_topk, return_router_logits=return_router_logits,
                          linear=lambda h, w: self.linear(h, w, backend=backend))


def quantize_int8(model) -> None:
    """Quantise a ``FaceTransformer``'s attention projections and token-level experts to int8, in place (see the
    module docstring). A second call does nothing."""
    if getattr(model, "weight_format", "float") == "int8":
        return
    for layer in model.layers:
        attn = layer.attn
        attn.qkv, attn.out = Int8Linear(attn.qkv), Int8Linear(attn.out)
        if layer.mlp is not None:  # a dense MLP (the Phi / Show-o blocks): each of its linear layers
            for name, child in list(layer.mlp.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(layer.mlp, name, Int8Linear(child))
        moe = layer.moe
        if moe is not None:
            moe.experts8 = Int8Experts(moe)
            for name in ("gate_up_proj", "down_proj", "shared_gate_up_proj", "shared_down_proj"):
                if getattr(moe, name, None) is not None:
                    delattr(moe, name)
                    setattr(moe, name, None)
    model.weight_format = "int8"
    model.set_backend(model.layers[0].attn.backend)


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters and buffers, split into int8-quantised and the rest."""
    quantised = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, _Int8Buffers)
                    for b in m.buffers(recurse=False))
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"int8_layers": quantised, "total": total}
