"""Backend choice (fastface/backends.py): the one place that decides which implementation runs each op."""

import warnings

import pytest
import torch

from fastface import backends, ops
from fastface.backends import BACKENDS, IMPLEMENTATIONS, resolve
from fastface.testing import make_moe_inputs

CPP = backends.available("grouped_moe", "cpp")


def test_every_registered_implementation_loads_or_is_reported_missing():
    for op, impls in IMPLEMENTATIONS.items():
        assert "reference" in impls and backends.available(op, "reference"), op
        for name in impls:
            assert name in BACKENDS, (op, name)


def test_reference_is_always_the_reference():
    for op in IMPLEMENTATIONS:
        assert resolve(op, "reference", "cpu", dtype=torch.bfloat16, grad=True) == "reference"


@pytest.mark.skipif(not CPP, reason="fastface._C is not built")
def test_auto_on_the_cpu():
    assert resolve("grouped_moe", "auto", "cpu", dtype=torch.float32) == "cpp"  # token-exact with the reference
    assert resolve("grouped_moe", "auto", "cpu", dtype=torch.bfloat16) == "torch"  # dense bf16 matmuls
    assert resolve("masked_decode_step", "auto", "cpu") == "cpp"
    assert resolve("d3diff_loss", "auto", "cpu") == "cpp"


def test_gradients_never_reach_a_forward_only_kernel():
    for asked in ("auto", "cpp", "torch"):
        got = resolve("grouped_moe", asked, "cpu", dtype=torch.float32, grad=True)
        assert got not in backends.FORWARD_ONLY["grouped_moe"], (asked, got)


def test_options_pick_a_backend_that_has_them():
    for asked in ("auto", "cpp", "triton", "torch", "reference"):
        got = resolve("masked_decode_step", asked, "cpu", options=("threshold",))
        assert got in backends.OPTIONS[("masked_decode_step", "threshold")], (asked, got)


def test_the_grouped_moe_op_trains_through_the_reference_on_the_cpu():
    """With gradients the op runs an implementation that has them, whatever backend is asked for."""
    args = make_moe_inputs(7, 16, 12, seed=3)
    args["gate_up_proj"].requires_grad_(True)
    want = None
    for asked in ("reference", "auto", "cpp", "torch"):
        y = ops.grouped_moe(**args, top_k=2, backend=asked)
        (g,) = torch.autograd.grad(y.square().sum(), args["gate_up_proj"])
        want = g if want is None else want
        assert torch.equal(g, want), f"{asked}: not the reference's gradient"
        assert g.abs().sum() > 0, asked


def test_a_missing_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "available", lambda op, b, device_type="cpu": b == "reference")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="not available"):
        assert resolve("d3diff_loss", "cpp", "cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve("d3diff_loss", "cpp", "cpu") == "reference"  # once per (op, backend)


def test_bad_choice_and_override(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        resolve("grouped_moe", "gpu", "cpu")
    monkeypatch.setenv("FASTFACE_BACKEND", "reference")
    assert resolve("grouped_moe", "auto", "cpu", dtype=torch.bfloat16) == "reference"
    monkeypatch.setenv("FASTFACE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTFACE_BACKEND"):
        resolve("grouped_moe", "auto", "cpu")
