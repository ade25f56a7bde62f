"""The reference sampler, tested as a sampler."""

import math

import pytest
import torch

from fastface import ops
from fastface.config import FaceConfig
from fastface.model import FaceTransformer
from fastface.prompts import mmu_prompt_ids, t2i_prompt_ids
from fastface.ops.masked_decode import masked_decode_step_reference, scheduled_mask_len
from fastface.sampling import generate_answer_ids, generate_image_tokens, step_noise
from fastface.testing import make_decode_inputs

CFG = FaceConfig.from_name("tiny")


@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("B,N,V,steps", [(1, 1, 5, 1), (3, 16, 33, 4), (2, 129, 7, 8)])
def test_full_loop_invariants(guidance, schedule, B, N, V, steps):
    gen = torch.Generator().manual_seed(B * N + V)
    tokens = torch.zeros(B, N, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    for step in range(steps):
        R = 2 * B if guidance else B
        logits = torch.randn(R, N, V, generator=gen) * 2
        u = step_noise(list(range(B)), step, N)
        new_tokens, new_masked = ops.masked_decode_step(logits, tokens, masked, u, step=step, steps=steps,
                                                        guidance=guidance, schedule=schedule, backend="reference")
        assert torch.equal(new_tokens[~masked], tokens[~masked]), "known tokens never change"
        assert not bool((new_masked & ~masked).any()), "a known position is never masked again"
        want = scheduled_mask_len(N, masked.sum(1), step, steps, schedule)
        assert new_masked.sum(1).tolist() == want.tolist(), "each step leaves the scheduled number masked"
        assert bool(((new_tokens >= 0) & (new_tokens < V)).all())
        tokens, masked = new_tokens, new_masked
    assert not bool(masked.any()), "no position is masked after the last step"


def test_schedule_counts():
    n = torch.tensor([256, 10, 1, 0])
    assert scheduled_mask_len(256, n, 0, 16).tolist() == [math.floor(256 * math.cos(math.pi / 2 / 16)), 9, 0, 0]
    assert scheduled_mask_len(256, n, 15, 16).tolist() == [0, 0, 0, 0]


def test_sampling_frequencies_match_softmax():
    """Observed frequencies of the inverse-CDF sample against softmax(logits / tau) over many draws."""
    V, draws = 12, 20000
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(V, generator=gen) * 1.5
    row[3] = -math.inf  # zero probability: never drawn
    for tau in (1.0, 0.5):
        logits = row.expand(1, draws, V).contiguous()
        u = torch.rand(2, 1, draws, generator=gen).clamp(1e-7, 1 - 1e-7)
        tokens, _ = masked_decode_step_reference(logits, torch.zeros(1, draws, dtype=torch.long),
                                                 torch.ones(1, draws, dtype=torch.bool), u, step=0, steps=2,
                                                 sample_temperature=tau)
        freq = torch.bincount(tokens[0], minlength=V).float() / draws
        p = torch.softmax(row / tau, 0)
        assert freq[3] == 0, "a zero-probability token was drawn"
        cos = torch.nn.functional.cosine_similarity(freq, p, dim=0)
        assert cos > 0.99, f"frequencies differ from softmax (cosine {cos:.4f})"
        assert (freq - p).abs().max() < 0.02


def test_guidance_combination_and_lowest_confidence_remasked():
    B, N, V = 1, 6, 4
    cond = torch.randn(B, N, V)
    uncond = torch.randn(B, N, V)
    u = torch.rand(2, B, N).clamp(1e-6, 1 - 1e-6)
    masked = torch.ones(B, N, dtype=torch.bool)
    tokens = torch.zeros(B, N, dtype=torch.long)
    w = 1.5
    a = masked_decode_step_reference(torch.cat([cond, uncond]), tokens, masked, u, step=0, steps=3, guidance=w,
                                     confidence_temperature=0.0)
    b = masked_decode_step_reference((1 + w) * cond - w * uncond, tokens, masked, u, step=0, steps=3,
                                     confidence_temperature=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # with no Gumbel noise the positions left masked are exactly those with the lowest log p of the sample
    logits = (1 + w) * cond - w * uncond
    logp = torch.log_softmax(logits, -1).gather(-1, a[0][..., None]).squeeze(-1)
    k = int(a[1].sum())
    lowest = set(torch.argsort(logp[0])[:k].tolist())
    assert set(torch.nonzero(a[1][0]).squeeze(1).tolist()) == lowest


def test_step_noise_contract():
    u = step_noise([5, 7], 3, 10)
    assert u.shape == (2, 2, 10) and u.dtype == torch.float32
    assert bool(((u > 0) & (u < 1)).all())
    alone = step_noise([7], 3, 10)
    assert torch.equal(u[:, 1:], alone), "a request's noise does not depend on the batch"
    assert not torch.equal(step_noise([5], 4, 10), u[:, :1]), "each step draws new noise"


def test_decode_step_validation():
    logits, tokens, masked, u = make_decode_inputs(2, 5, 7, guidance=1.0)
    kw = dict(step=0, steps=4, guidance=1.0, backend="reference")
    ops.masked_decode_step(logits, tokens, masked, u, **kw)
    with pytest.raises(ValueError, match="logits"):
        ops.masked_decode_step(logits[:2], tokens, masked, u, **kw)
    with pytest.raises(ValueError, match="step"):
        ops.masked_decode_step(logits, tokens, masked, u, **dict(kw, step=4))
    with pytest.raises(ValueError, match="steps"):
        ops.masked_decode_step(logits, tokens, masked, u, **dict(kw, steps=0, step=0))
    with pytest.raises(ValueError, match="guidance"):
        ops.masked_decode_step(logits, tokens, masked, u, **dict(kw, guidance=float("nan")))
    with pytest.raises(ValueError, match="u must"):
        ops.masked_decode_step(logits, tokens, masked, u * 0, **kw)
    with pytest.raises(TypeError, match="masked"):
        ops.masked_decode_step(logits, tokens, masked.long(), u, **kw)
    bad = tokens.clone()
    bad[~masked] = 7
    if (~masked).any():
        with pytest.raises(ValueError, match="tokens"):
            ops.masked_decode_step(logits, bad, masked, u, **kw)
    with pytest.raises(TypeError, match="logits"):
        ops.masked_decode_step(logits.double(), tokens, masked, u, **kw)


def tiny_model():
    model = FaceTransformer(CFG).eval()
    model.reset_parameters(11)
    # sharpen the LM head so generations are not uniform noise
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_generate_deterministic_and_batch_independent(guidance):
    model = tiny_model()
    prompts = t2i_prompt_ids([[9, 10, 11], [12], [13, 14]], CFG)
    a = generate_image_tokens(model, prompts, steps=4, guidance=guidance, seeds=[3, 4, 5])
    b = generate_image_tokens(model, prompts, steps=4, guidance=guidance, seeds=[3, 4, 5])
    assert torch.equal(a, b), "same (seed, prompts) -> same tokens"
    for i in range(3):
        alone = generate_image_tokens(model, prompts[i : i + 1], steps=4, guidance=guidance, seeds=[3 + i])
        assert torch.equal(alone[0], a[i]), f"prompt {i} differs alone and in a batch"
    other = generate_image_tokens(model, prompts, steps=4, guidance=guidance, seeds=[6, 7, 8])
    assert not torch.equal(other, a), "different seeds give different images"
    assert a.shape == (3, CFG.image_tokens) and bool(((a >= 0) & (a < CFG.codebook_size)).all())


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_answer_kv_cache_matches_full_recompute(top_p):
    model = tiny_model()
    img = torch.randint(0, CFG.codebook_size, (3, CFG.image_tokens))
    ids = mmu_prompt_ids(img, [[20, 21, 22], [23], [24, 25]], CFG)
    kw = dict(max_new_tokens=6, top_p=top_p, seeds=[0, 1, 2], allowed_vocab=CFG.text_vocab_size)
    cached = generate_answer_ids(model, ids, **kw)
    full = generate_answer_ids(model, ids, use_cache=False, **kw)
    assert cached == full
    alone = generate_answer_ids(model, ids[1:2, -(CFG.image_tokens + 5):], **dict(kw, seeds=[1]))
    assert alone[0] == cached[1], "an answer does not depend on the rest of the batch"
    assert all(0 <= t < CFG.text_vocab_size for a in cached for t in a)
