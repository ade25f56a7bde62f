"""Bounds and finite-number guards: bad numbers are clear errors, the same for every backend, never silent garbage
or unbounded work."""

import math

import pytest
import torch

import fastface
from fastface import ops
from fastface.checks import MAX_NEW_TOKENS, MAX_STEPS
from fastface.testing import make_decode_inputs, make_moe_inputs

BACKENDS = ["reference", "auto"]


@pytest.fixture(scope="module", params=BACKENDS)
def pipe(request):
    return fastface.load(backend=request.param)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=10**9), "steps"),
    (dict(steps=MAX_STEPS + 1), "steps"),
    (dict(guidance=1e308), "guidance"),
    (dict(guidance=-1e5), "guidance"),
    (dict(sample_temperature=1e-45), "sample_temperature"),
    (dict(sample_temperature=1e300), "sample_temperature"),
    (dict(confidence_temperature=1e300), "confidence_temperature"),
])
def test_generation_options_are_bounded(pipe, kwargs, match):
    """Each raised at once (no step run), with the same bound on every backend."""
    calls = []
    with pytest.raises(ValueError, match=match):
        pipe.generate_tokens(["a man"], callback=lambda *_: calls.append(1), **kwargs)
    assert not calls


def test_the_bounds_admit_real_settings(pipe):
    tokens = pipe.generate_tokens(["a man"], steps=2, guidance=5.0, sample_temperature=0.5, seed=0)
    assert tokens.shape == (1, pipe.config.image_tokens)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(temperature=-1.0, top_p=0.9), ValueError, "temperature"),
    (dict(temperature=0.0, top_p=0.9), ValueError, "temperature"),
    (dict(temperature="hot", top_p=0.9), TypeError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(max_new_tokens=MAX_NEW_TOKENS + 1), ValueError, "max_new_tokens"),
])
def test_answer_options_are_checked(pipe, kwargs, exc, match):
    img = torch.zeros(1, pipe.config.image_tokens, dtype=torch.long)
    with pytest.raises(exc, match=match):
        pipe.answer(img, ["what colour is her hair?"], **kwargs)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp", "auto"])
@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
def test_decode_step_refuses_non_finite_logits(backend, bad):
    """NaN / +inf logits, or a masked position with no drawable token, gave token 0 without a word."""
    logits, tokens, masked, u = make_decode_inputs(2, 9, 7, guidance=2.0, masked_fraction=1.0, seed=1)
    logits = logits.clone()
    if bad == "nan":
        logits[3, 4, 2] = math.nan
    elif bad == "+inf":
        logits[1, 0, 5] = math.inf
    else:
        logits[2, 6, :] = -math.inf
    with pytest.raises(ValueError, match="logits"):
        ops.masked_decode_step(logits, tokens, masked, u, step=0, steps=4, guidance=2.0, backend=backend)


def test_single_banned_tokens_stay_allowed():
    """-inf for some tokens (a caller banning them) is fine: they are never drawn."""
    logits, tokens, masked, u = make_decode_inputs(2, 9, 7, masked_fraction=1.0, seed=2)
    logits = logits.clone()
    logits[..., 3] = -math.inf
    tokens, _ = ops.masked_decode_step(logits, tokens, masked, u, step=3, steps=4)
    assert not bool((tokens == 3).any())


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp", "auto"])
@pytest.mark.parametrize("H,F", [(0, 8), (8, 0)])
def test_grouped_moe_needs_positive_widths(backend, H, F):
    """H=0 or F=0 used to give different results on different backends; it is an error on all of them."""
    args = make_moe_inputs(3, max(H, 1), max(F, 1), seed=0)
    args["x"] = args["x"][:, :H]
    args["router_weight"] = args["router_weight"][..., :H]
    args["gate_up_proj"] = args["gate_up_proj"][:, :, : 2 * F, :H]
    args["down_proj"] = args["down_proj"][:, :, :H, :F]
    args["shared_gate_up_proj"] = args["shared_gate_up_proj"][:, :, : 2 * F, :H]
    args["shared_down_proj"] = args["shared_down_proj"][:, :, :H, :F]
    with pytest.raises(ValueError, match="H, F, E, G >= 1"):
        ops.grouped_moe(**args, top_k=2, backend=backend)


def test_decode_images_of_an_empty_batch_and_bad_ids():
    pipe = fastface.load()
    assert pipe.decode_images(torch.zeros(0, pipe.config.image_tokens, dtype=torch.long)) == []
    with pytest.raises(TypeError, match="LongTensor"):
        pipe.decode_images(torch.zeros(1, pipe.config.image_tokens))
    with pytest.raises(ValueError, match="image token ids"):
        pipe.decode_images(torch.full((1, pipe.config.image_tokens), 10**6, dtype=torch.long))
