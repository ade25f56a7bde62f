"""The three hot ops as ``torch.library`` custom ops, so ``torch.compile`` traces models that use them.

    from fastface import library
    y = library.grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, top_k=2)
    tokens, masked = library.masked_decode_step(logits, tokens, masked, u, step=s, steps=T, guidance=2.0)
    loss = library.d3diff_loss(logits, targets, mask_ratio, alpha=0.1)

Registered ops (``torch.ops.fastface.*``), each dispatching to ``fastface.ops`` with the backend passed as a
string argument (``"auto" | "reference" | "torch" | "cpp" | "triton"``), so one graph can hold any backend:

    fastface::grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj?,
                          shared_down_proj?, *, top_k, normalize_topk, activation, backend) -> (y, router_logits)
    fastface::masked_decode_step(logits, tokens, masked, u, *, step, steps, guidance, sample_temperature,
                                 confidence_temperature, schedule, backend) -> (tokens, masked)
    fastface::d3diff_loss(logits, targets, mask_ratio, *, alpha, reduction, r_max?, backend) -> loss

Each has a fake implementation (output shapes and dtypes from input shapes alone, for tracing). The two
differentiable ops have an autograd formula that calls a backward op, itself a custom op with a fake:

    fastface::grouped_moe_backward -> grads of x, router_weight, gate_up_proj, down_proj (+ shared weights):
        the Triton backward (``fastface.kernels.grouped_moe``) after recomputing the forward's dispatch state
        for ``triton``; the reference's autograd for the other backends (the C++ kernel is forward-only)
    fastface::d3diff_loss_backward -> grad of logits: the fused Triton backward for ``triton``; the backend's
        own autograd for the others

The wrappers below take the same arguments as ``fastface.ops`` and call the registered ops.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from fastface import backends, ops

__all__ = ["grouped_moe", "masked_decode_step", "d3diff_loss"]


def _fresh(out: Tensor, *inputs: Tensor | None) -> Tensor:
    """``out``, cloned if it shares memory with an input (a custom op's outputs may not alias its inputs)."""
    ptr = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return out.clone()
    return out


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd for a computation nested inside a custom op's implementation.

    The dispatcher runs an op's implementation below autograd (the autograd keys are excluded in thread-local
    state), so a reference backward that differentiates the reference forward turns them back on for its
    duration -- what torch's own higher-order ops do.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


# ---------------------------------------------------------------------------------------------------
# fastface::grouped_moe
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastface::grouped_moe", mutates_args=())
def _grouped_moe_op(x: Tensor, group_ids: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                    shared_gate_up_proj: Tensor | None, shared_down_proj: Tensor | None, *, top_k: int,
                    normalize_topk: bool, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    y, router_logits = ops.grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, top_k=top_k,
                                       shared_gate_up_proj=shared_gate_up_proj, shared_down_proj=shared_down_proj,
                                       normalize_topk=normalize_topk, return_router_logits=True,
                                       activation=activation, backend=backend)
    inputs = (x, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj)
    return _fresh(y, *inputs), _fresh(router_logits, *inputs)


@_grouped_moe_op.register_fake
def _(x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj, *, top_k,
      normalize_topk, activation, backend):
    T, E = x.shape[0], router_weight.shape[1]
    return torch.empty_like(x), x.new_empty(T, E, dtype=torch.float32)


@torch.library.custom_op("fastface::grouped_moe_backward", mutates_args=())
def _grouped_moe_backward_op(grad_y: Tensor, grad_router_logits: Tensor, x: Tensor, group_ids: Tensor,
                             router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                             shared_gate_up_proj: Tensor | None, shared_down_proj: Tensor | None, *, top_k: int,
                             normalize_topk: bool, activation: str, backend: str) -> list[Tensor]:
    weights = [router_weight, gate_up_proj, down_proj]
    if shared_gate_up_proj is not None:
        weights += [shared_gate_up_proj, shared_down_proj]
    if backends.resolve("grouped_moe", backend, x.device.type) == "triton":
        from fastface.kernels.grouped_moe import grouped_moe_backward, grouped_moe_forward

        _, _, saved = grouped_moe_forward(x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj,
                                          shared_down_proj, top_k=top_k, normalize_topk=normalize_topk,
                                          activation=activation, save_for_backward=True)
        grads = grouped_moe_backward(grad_y, grad_router_logits, x, group_ids, router_weight, gate_up_proj, down_proj,
                                     shared_gate_up_proj, shared_down_proj, saved, top_k=top_k,
                                     normalize_topk=normalize_topk, activation=activation)
        return [g.contiguous() for g in grads if g is not None]
    from fastface.ops.moe import grouped_moe_reference

    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_() for t in (x, *weights)]
        shared = leaves[4:] if shared_gate_up_proj is not None else [None, None]
        y, router_logits = grouped_moe_reference(leaves[0], group_ids, *leaves[1:4], top_k=top_k,
                                                 shared_gate_up_proj=shared[0], shared_down_proj=shared[1],
                                                 normalize_topk=normalize_topk, return_router_logits=True,
                                                 activation=activation)
        grads = torch.autograd.grad((y, router_logits), leaves, (grad_y, grad_router_logits), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@_grouped_moe_backward_op.register_fake
def _(grad_y, grad_router_logits, x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj,
      shared_down_proj, *, top_k, normalize_topk, activation, backend):
    tensors = [x, router_weight, gate_up_proj, down_proj]
    if shared_gate_up_proj is not None:
        tensors += [shared_gate_up_proj, shared_down_proj]
    return [torch.empty_like(t) for t in tensors]


def _grouped_moe_setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.options = keyword_only_inputs


def _grouped_moe_backward(ctx, grad_y, grad_router_logits):
    x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    if grad_router_logits is None:
        grad_router_logits = x.new_zeros(x.shape[0], router_weight.shape[1], dtype=torch.float32)
    grads = torch.ops.fastface.grouped_moe_backward(grad_y, grad_router_logits, x, group_ids, router_weight,
                                                    gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj,
                                                    **ctx.options)
    shared = grads[4:] if shared_gate_up_proj is not None else [None, None]
    return grads[0], None, grads[1], grads[2], grads[3], shared[0], shared[1]


torch.library.register_autograd("fastface::grouped_moe", _grouped_moe_backward,
                                setup_context=_grouped_moe_setup_context)


def grouped_moe(x, group_ids, router_weight, gate_up_proj, down_proj, *, top_k, shared_gate_up_proj=None,
                shared_down_proj=None, normalize_topk=True, return_router_logits=False, activation="silu",
                backend="auto"):
    """Grouped token-level MoE through ``torch.ops.fastface.grouped_moe`` (arguments: ``fastface.ops.grouped_moe``).

    Returns y [T, H] in x.dtype, or (y, router_logits [T, E] float32); differentiable with respect to x and
    every weight.
    """
    y, router_logits = torch.ops.fastface.grouped_moe(
        x, group_ids, router_weight, gate_up_proj, down_proj, shared_gate_up_proj, shared_down_proj, top_k=top_k,
        normalize_topk=normalize_topk, activation=activation, backend=backend)
    return (y, router_logits) if return_router_logits else y


# ---------------------------------------------------------------------------------------------------
# fastface::masked_decode_step
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastface::masked_decode_step", mutates_args=())
def _masked_decode_step_op(logits: Tensor, tokens: Tensor, masked: Tensor, u: Tensor, *, step: int, steps: int,
                           guidance: float, sample_temperature: float, confidence_temperature: float, schedule: str,
                           backend: str) -> tuple[Tensor, Tensor]:
    new_tokens, new_masked = ops.masked_decode_step(logits, tokens, masked, u, step=step, steps=steps,
                                                    guidance=guidance, sample_temperature=sample_temperature,
                                                    confidence_temperature=confidence_temperature, schedule=schedule,
                                                    backend=backend)
    return _fresh(new_tokens, tokens, masked), _fresh(new_masked, tokens, masked)


@_masked_decode_step_op.register_fake
def _(logits, tokens, masked, u, *, step, steps, guidance, sample_temperature, confidence_temperature, schedule,
      backend):
    return torch.empty_like(tokens), torch.empty_like(masked)


def masked_decode_step(logits, tokens, masked, u, *, step, steps, guidance=0.0, sample_temperature=1.0,
                       confidence_temperature=1.0, schedule="cosine", backend="auto"):
    """One masked-token decoding step through ``torch.ops.fastface.masked_decode_step``.

    Arguments and result: ``fastface.ops.masked_decode_step``; returns (tokens [B, N] int64, masked [B, N] bool).
    """
    return torch.ops.fastface.masked_decode_step(
        logits, tokens, masked, u, step=step, steps=steps, guidance=float(guidance),
        sample_temperature=float(sample_temperature), confidence_temperature=float(confidence_temperature),
        schedule=schedule, backend=backend)


# ---------------------------------------------------------------------------------------------------
# fastface::d3diff_loss
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastface::d3diff_loss", mutates_args=())
def _d3diff_loss_op(logits: Tensor, targets: Tensor, mask_ratio: Tensor, *, alpha: float, reduction: str,
                    r_max: float | None, backend: str) -> Tensor:
    loss = ops.d3diff_loss(logits, targets, mask_ratio, alpha=alpha, reduction=reduction, r_max=r_max,
                           backend=backend)
    return _fresh(loss.detach(), logits, mask_ratio)


@_d3diff_loss_op.register_fake
def _(logits, targets, mask_ratio, *, alpha, reduction, r_max, backend):
    shape = () if reduction == "mean" else (logits.shape[0],)
    return logits.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("fastface::d3diff_loss_backward", mutates_args=())
def _d3diff_loss_backward_op(grad_out: Tensor, logits: Tensor, targets: Tensor, mask_ratio: Tensor, *, alpha: float,
                             reduction: str, r_max: float | None, backend: str) -> Tensor:
    if backends.resolve("d3diff_loss", backend, logits.device.type) == "triton":
        from fastface.kernels.d3diff import d3diff_loss_backward

        return d3diff_loss_backward(grad_out, logits, targets, mask_ratio, alpha=alpha, reduction=reduction,
                                    r_max=r_max)
    with _autograd_inside_op():
        leaf = logits.detach().requires_grad_()
        loss = ops.d3diff_loss(leaf, targets, mask_ratio, alpha=alpha, reduction=reduction, r_max=r_max,
                               backend=backend)
        (grad,) = torch.autograd.grad(loss, leaf, grad_out)
    return grad


@_d3diff_loss_backward_op.register_fake
def _(grad_out, logits, targets, mask_ratio, *, alpha, reduction, r_max, backend):
    return torch.empty_like(logits)


def _d3diff_setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.options = keyword_only_inputs


def _d3diff_backward(ctx, grad_out):
    logits, targets, mask_ratio = ctx.saved_tensors
    grad = torch.ops.fastface.d3diff_loss_backward(grad_out, logits, targets, mask_ratio, **ctx.options)
    return grad, None, None


torch.library.register_autograd("fastface::d3diff_loss", _d3diff_backward, setup_context=_d3diff_setup_context)


def d3diff_loss(logits, targets, mask_ratio, *, alpha, reduction="mean", r_max=None, backend="auto"):
    """D3Diff loss through ``torch.ops.fastface.d3diff_loss`` (arguments: ``fastface.ops.d3diff_loss``).

    Returns a float32 scalar (reduction="mean") or [M] (reduction="none"), differentiable with respect to
    ``logits``.
    """
    return torch.ops.fastface.d3diff_loss(logits, targets, mask_ratio, alpha=float(alpha), reduction=reduction,
                                          r_max=None if r_max is None else float(r_max), backend=backend)
