"""The hot ops, one contract each, every backend behind it.

    from fastface import ops
    y = ops.grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, top_k=2)
    tokens, masked = ops.masked_decode_step(logits, tokens, masked, u, step=s, steps=T, guidance=2.0)
    loss = ops.d3diff_loss(logits, targets, mask_ratio, alpha=0.1)
    qk = ops.rotary(qk, cos, sin)
    y = ops.attention(q, k, v, mask)
    y = ops.int8_linear(x, ops.quantize_int8(weight), bias)

One file per op, each in the same order: the op's vocabulary, its readable reference (the oracle every backend
is tested against), then the contract -- argument checks (once, for every backend: a bad argument raises
``ValueError`` or ``TypeError`` naming it; the C++ kernels check again before touching memory) and the call
into the backend ``fastface.backends`` picks. Nothing here imports the model or the decoding loops.

    ops/moe.py            grouped_moe          (reference: grouped_moe_reference)
    ops/masked_decode.py  masked_decode_step   (reference: masked_decode_step_reference)
    ops/d3diff.py         d3diff_loss          (reference: d3diff_loss_reference)
    ops/attention.py      attention, rotary    (reference: attention_reference, PyTorch's SDPA; rotary_reference)
    ops/int8.py           int8_linear          (reference: int8_linear_reference; quantize_int8, Int8Weight)
"""

from fastface.ops.attention import attention, rotary
from fastface.ops.d3diff import d3diff_loss
from fastface.ops.int8 import Int8Weight, int8_linear, quantize_int8
from fastface.ops.masked_decode import SCHEDULES, masked_decode_step
from fastface.ops.moe import ACTIVATIONS, grouped_moe

__all__ = ["ACTIVATIONS", "SCHEDULES", "Int8Weight", "attention", "d3diff_loss", "grouped_moe", "int8_linear",
           "masked_decode_step", "quantize_int8", "rotary"]
