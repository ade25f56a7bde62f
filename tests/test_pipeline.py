"""The public pipeline on a random-weight tiny checkpoint: end to end, and every bad input."""

import math

import numpy as np
import pytest
import torch

import fastface


@pytest.fixture
def pipe(tiny_checkpoint):
    return fastface.load(tiny_checkpoint, backend="reference")


def test_generate_tokens_end_to_end(pipe):
    tokens = pipe.generate_tokens(["w1 w2 w3", "w4"], steps=4, guidance=2.0, seed=3)
    assert tokens.shape == (2, pipe.config.image_tokens) and tokens.dtype == torch.long
    assert bool(((tokens >= 0) & (tokens < pipe.config.codebook_size)).all())
    again = pipe.generate_tokens(["w1 w2 w3", "w4"], steps=4, guidance=2.0, seed=3)
    assert torch.equal(tokens, again)
    alone = pipe.generate_tokens(["w4"], steps=4, guidance=2.0, seed=4)
    assert torch.equal(alone[0], tokens[1]), "prompt 1 uses seed + 1 in the batch"
    per_prompt = pipe.generate_tokens(["w4", "w1 w2 w3"], steps=4, guidance=2.0, seed=[4, 3])
    assert torch.equal(per_prompt, tokens.flip(0))


def test_unknown_words_do_not_crash(pipe):
    tokens = pipe.generate_tokens(["zebra-striped w1 qqq"], steps=2, guidance=0.0)
    assert tokens.shape == (1, pipe.config.image_tokens)


def test_answer_with_image_tokens(pipe):
    img = torch.randint(0, pipe.config.codebook_size, (2, pipe.config.image_tokens))
    answers = pipe.answer(img, ["w1 w2", "w3"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_bfloat16_pipeline(tiny_checkpoint):
    pipe = fastface.load(tiny_checkpoint, backend="reference", dtype="bfloat16")
    tokens = pipe.generate_tokens(["w1"], steps=2)
    assert tokens.shape == (1, pipe.config.image_tokens)


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bfloat16_warns_without_bf16_matrix_units(tiny_checkpoint, monkeypatch, recwarn, has_bf16):
    from fastface import backends

    monkeypatch.setattr(backends, "cpu_has_bf16_matmul", lambda: has_bf16)
    monkeypatch.setattr(backends, "_warned", set())
    fastface.load(tiny_checkpoint, backend="reference", dtype="bfloat16")
    fastface.load(tiny_checkpoint, backend="reference", dtype="float32")
    slow = [w for w in recwarn if "no bf16 matrix instructions" in str(w.message)]
    assert len(slow) == (0 if has_bf16 else 1)


@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_runs_float32_math_where_the_cpu_has_no_bf16(tiny_checkpoint, monkeypatch, recwarn, has_bf16):
    """``auto`` with bfloat16 on a CPU without bf16 instructions keeps the transformer in float32 (said once), and
    draws exactly what the float32 pipeline of the bf16-rounded weights draws; a named backend runs bf16 as asked."""
    import torch

    from fastface import backends

    monkeypatch.setattr(backends, "cpu_has_bf16_matmul", lambda: has_bf16)
    monkeypatch.setattr(backends, "_warned", set())
    auto = fastface.load(tiny_checkpoint, backend="auto", dtype="bfloat16")
    fastface.load(tiny_checkpoint, backend="auto", dtype="bfloat16")
    assert auto.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    said = [w for w in recwarn if "runs float32 math" in str(w.message)]
    assert len(said) == (0 if has_bf16 else 1)
    named = fastface.load(tiny_checkpoint, backend="torch", dtype="bfloat16")
    assert named.dtype == torch.bfloat16
    if not has_bf16:
        rounded = fastface.load(tiny_checkpoint, backend="auto", dtype="float32")
        with torch.no_grad():
            for p in rounded.model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        assert torch.equal(auto.generate_tokens(["w1", "w2"], steps=3), rounded.generate_tokens(["w1", "w2"], steps=3))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(prompts=[]), ValueError, "prompts is empty"),
    (dict(prompts="w1", steps=0), ValueError, "steps"),
    (dict(prompts="w1", steps=-3), ValueError, "steps"),
    (dict(prompts="w1", steps=2.5), TypeError, "steps"),
    (dict(prompts="w1", guidance=math.nan), ValueError, "guidance"),
    (dict(prompts="w1", guidance=math.inf), ValueError, "guidance"),
    (dict(prompts=[1, 2]), TypeError, r"prompts\[0\]"),
    (dict(prompts=None), TypeError, "prompts"),
    (dict(prompts="w1", seed=-1), ValueError, "seed"),
    (dict(prompts=["w1", "w2"], seed=[1]), ValueError, "seeds"),
    (dict(prompts="w1", sample_temperature=0.0), ValueError, "sample_temperature"),
    (dict(prompts="w1", schedule="square"), ValueError, "schedule"),
])
def test_generate_bad_inputs(pipe, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pipe.generate_tokens(**kwargs)


def test_answer_bad_inputs(pipe):
    N, K = pipe.config.image_tokens, pipe.config.codebook_size
    img = torch.randint(0, K, (1, N))
    with pytest.raises(ValueError, match="questions is empty"):
        pipe.answer(img, [])
    with pytest.raises(ValueError, match="image token ids"):
        pipe.answer(torch.full((1, N), K), ["w1"])
    with pytest.raises(ValueError, match="shape"):
        pipe.answer(img[:, :-1], ["w1"])
    with pytest.raises(ValueError, match="2 questions"):
        pipe.answer(img, ["w1", "w2"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.answer(img, ["w1"], max_new_tokens=0)


def test_generate_without_image_tokenizer_is_clear(pipe):
    with pytest.raises(RuntimeError, match="image tokenizer"):
        pipe.generate(["w1"], steps=1)


def test_load_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match="backend"):
        fastface.load(tiny_checkpoint, backend="gpu")
    with pytest.raises(ValueError, match="dtype"):
        fastface.load(tiny_checkpoint, dtype="float64")


def test_image_pixels_and_ids_do_not_depend_on_the_batch():
    """A batched convolution rounds differently at other batch sizes (±1 in some pixels when the image tokenizer
    ran whole batches): an image's pixels and ids must be the same alone and in any batch."""
    embedded = fastface.load()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, embedded.config.codebook_size, (9, embedded.config.image_tokens), generator=gen)
    together = embedded.decode_images(tokens)
    for i in (0, 4, 8):
        assert np.array_equal(np.asarray(embedded.decode_images(tokens[i : i + 1])[0]), np.asarray(together[i]))
    ids = embedded.encode_images(together)
    for i in (0, 4, 8):
        assert torch.equal(embedded.encode_images([together[i]])[0], ids[i])
    assert embedded.encode_images([]).shape == (0, embedded.config.image_tokens)
