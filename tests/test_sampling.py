"""The decoding loops (fastface/sampling.py): their noise, image generation and answers, tested as samplers.

The op they call each step, ``ops.masked_decode_step``, is tested in tests/test_op_masked_decode.py.
"""

import pytest
import torch

from fastface.config import FaceConfig
from fastface.model import FaceTransformer
from fastface.prompts import mmu_prompt_ids, t2i_prompt_ids
from fastface.sampling import generate_answer_ids, generate_image_tokens, step_noise

CFG = FaceConfig.from_name("tiny")


def test_step_noise_contract():
    u = step_noise([5, 7], 3, 10)
    assert u.shape == (2, 2, 10) and u.dtype == torch.float32
    assert bool(((u > 0) & (u < 1)).all())
    alone = step_noise([7], 3, 10)
    assert torch.equal(u[:, 1:], alone), "a request's noise does not depend on the batch"
    assert not torch.equal(step_noise([5], 4, 10), u[:, :1]), "each step draws new noise"


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
