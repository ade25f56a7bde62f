"""Helpers shared by the tests and the benchmarks: a verbose allclose and random op inputs."""

from __future__ import annotations

import torch

# (dtype, atol, rtol) used by kernel tests against the float32 reference. bf16 has an 8-bit mantissa
# (relative rounding 2^-8 = 3.9e-3); a kernel that rounds its inputs and intermediates to bf16 lands
# within a few of those roundings of the float32 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"):
    """torch.allclose with a report: how many elements differ, the worst one and where it is."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    if not torch.isfinite(e).all():
        same_nonfinite = (a == e) | (a.isnan() & e.isnan())
        finite = torch.isfinite(e)
        if not bool((same_nonfinite | finite).all()):
            raise AssertionError(f"{name}: non-finite values differ")
        a, e = a[finite], e[finite]
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bool(bad.any()):
        flat = torch.nonzero(bad.flatten()).squeeze(1)
        worst = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff)).flatten()))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {flat.numel()} / {a.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"worst at {where}: got {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g} "
            f"(|diff| {diff.flatten()[worst].item():.3g}); max |diff| {diff.max().item():.3g}"
        )


def make_moe_inputs(T, H, F, *, G=2, E=4, S=1, Fs=None, dtype=torch.float32, seed=0, device="cpu"):
    """Random grouped-MoE inputs with well-scaled weights: a dict of the op's tensor arguments.

    Group ids are random, so groups are mixed; ``S=0`` gives no shared experts.
    """
    gen = torch.Generator().manual_seed(seed)
    Fs = F if Fs is None else Fs

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    args = dict(
        x=randn(T, H),
        group_ids=torch.randint(0, G, (T,), generator=gen).to(device),
        router_weight=randn(G, E, H, scale=H**-0.5),
        gate_up_proj=randn(G, E, 2 * F, H, scale=H**-0.5),
        down_proj=randn(G, E, H, F, scale=F**-0.5),
    )
    if S:
        args["shared_gate_up_proj"] = randn(G, S, 2 * Fs, H, scale=H**-0.5)
        args["shared_down_proj"] = randn(G, S, H, Fs, scale=Fs**-0.5)
    return args


def make_decode_inputs(B, N, V, *, guidance=0.0, masked_fraction=0.7, dtype=torch.float32, seed=0, device="cpu"):
    """Random masked-decode-step inputs: (logits [R, N, V], tokens [B, N], masked [B, N], u [2, B, N])."""
    gen = torch.Generator().manual_seed(seed)
    R = 2 * B if guidance != 0 else B
    logits = (torch.randn(R, N, V, generator=gen) * 3).to(dtype=dtype, device=device)
    tokens = torch.randint(0, V, (B, N), generator=gen).to(device)
    masked = (torch.rand(B, N, generator=gen) < masked_fraction).to(device)
    u = torch.rand(2, B, N, generator=gen).clamp(1e-6, 1 - 1e-6).to(device)
    return logits, tokens, masked, u


# ------------------------------------------------------------------------------------ backend rows


def backend_marks(device_type: str = "cpu") -> dict:
    """backend name -> pytest marks that skip it where it cannot run (cpp unbuilt; triton without CUDA or
    TRITON_INTERPRET=1). The reference and torch backends always run."""
    import pytest

    from fastface import backends

    try:
        from fastface import _cpp  # noqa: F401
        cpp_missing = None
    except ImportError:
        cpp_missing = "fastface._C is not built (python setup.py build_ext --inplace)"
    triton_missing = None if backends.triton_usable(device_type) else "Triton not usable here (needs CUDA or " \
        "TRITON_INTERPRET=1)"
    return {"reference": [], "torch": [],
            "cpp": [pytest.mark.skipif(cpp_missing is not None, reason=cpp_missing or "")],
            "triton": [pytest.mark.skipif(triton_missing is not None, reason=triton_missing or "")]}


def backend_rows(*names: str, marks: dict):
    """One pytest param per backend name, id = the name, with that backend's skip marks."""
    import pytest

    return [pytest.param(name, marks=marks[name], id=name) for name in names]
