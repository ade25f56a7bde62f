"""Show-o's decoding options: its compounding confidence temperature (a quirk, off by default) and its presets."""

import pytest
import torch
from test_engine import sharp_model

import fastface
from fastface.engine import Engine
from fastface.prompts import t2i_prompt_ids
from fastface.sampling import DECODING_PRESETS, generate_image_tokens, step_confidence_temperature


@pytest.mark.parametrize("steps", [1, 5, 16, 50])
def test_compounding_is_shows_loop(steps):
    """Show-o's t2i_generate reassigns temperature *= (1 - ratio) each step and uses the result as the noise scale;
    the op scales what it is given by (1 - ratio), so the value handed over times (1 - ratio) is Show-o's."""
    base, showo = 4.5, 4.5
    for step in range(steps):
        ratio = (step + 1) / steps
        showo = showo * (1.0 - ratio)
        handed = step_confidence_temperature(base, step, steps, compounding=True)
        assert handed * (1.0 - ratio) == pytest.approx(showo, rel=1e-12, abs=1e-300)
        assert step_confidence_temperature(base, step, steps) == base  # off: the op's own linear decay


@pytest.mark.parametrize("guidance", [0.0, 1.75])
def test_engine_equals_reference_with_compounding(guidance):
    model = sharp_model()
    ids = t2i_prompt_ids([[9, 10, 11], [12], []], model.config)
    kw = dict(steps=6, guidance=guidance, seeds=[5, 6, 7], confidence_temperature=4.5, confidence_compounding=True)
    want = generate_image_tokens(model, ids, backend="reference", **kw)
    assert torch.equal(Engine(model).generate_image_tokens(ids, **kw), want)
    plain = generate_image_tokens(model, ids, backend="reference", **{**kw, "confidence_compounding": False})
    assert not torch.equal(plain, want), "compounding changed nothing: the option is not reaching the sampler"


def test_presets_run_through_the_pipeline():
    pipe = fastface.load()
    assert DECODING_PRESETS["showo-256"]["steps"] == 16 and DECODING_PRESETS["showo-256"]["guidance"] == 1.75
    assert DECODING_PRESETS["showo-512"]["steps"] == 50 and DECODING_PRESETS["showo-512"]["guidance"] == 5.0
    preset = dict(DECODING_PRESETS["showo-256"], steps=4)
    tokens = pipe.generate_tokens(["a woman with red hair"], seed=0, **preset)
    assert tokens.shape == (1, pipe.config.image_tokens)
    with pytest.raises(TypeError, match="confidence_compounding"):
        pipe.generate_tokens(["a man"], steps=2, confidence_compounding="yes")
