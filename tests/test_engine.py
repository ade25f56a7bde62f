"""The engine against the reference loops: same tokens for the same (seed, prompts), and its own invariants."""

import warnings

import pytest
import torch

import fastface
from fastface import backends
from fastface.config import FaceConfig
from fastface.engine import Engine, Timers
from fastface.model import FaceTransformer
from fastface.ops.masked_decode import scheduled_mask_len
from fastface.prompts import mmu_prompt_ids, t2i_prompt_ids
from fastface.sampling import generate_answer_ids, generate_image_tokens

CFG = FaceConfig.from_name("tiny")
# odd prompt lengths, including the empty prompt and one longer than max_text_len (truncated)
PROMPTS = [[9, 10, 11], [12], [], [13, 14, 15, 16, 17, 18, 19], [20, 21], list(range(30, 50))]


def sharp_model(seed=11, dtype=torch.float32):
    model = FaceTransformer(CFG).eval()
    model.reset_parameters(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # sharp logits: tokens are not uniform noise
    model.set_backend("reference")
    return model.to(dtype)


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def prompt_batch(n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last prompt is truncated to max_text_len, on purpose
        return t2i_prompt_ids(PROMPTS[:n], CFG)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("B,steps", [(1, 1), (2, 4), (6, 7)])
def test_engine_tokens_equal_reference(model, backend, schedule, guidance, B, steps):
    ids = prompt_batch(B)
    seeds = [7 * b + 1 for b in range(B)]
    kw = dict(steps=steps, guidance=guidance, seeds=seeds, schedule=schedule)
    want = generate_image_tokens(model, ids, backend="reference", **kw)
    got = Engine(model, backend=backend).generate_image_tokens(ids, **kw)
    assert got.dtype == torch.long and got.shape == want.shape
    diff = int((got != want).sum())
    assert diff == 0, f"{diff} / {want.numel()} tokens differ from the reference"


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_prompt_alone_or_in_batch(model, guidance):
    engine = Engine(model, backend="auto")
    ids = prompt_batch(5)
    batch = engine.generate_image_tokens(ids, steps=5, guidance=guidance, seeds=[4, 5, 6, 7, 8])
    for i in (0, 2, 4):
        alone = engine.generate_image_tokens(ids[i : i + 1], steps=5, guidance=guidance, seeds=[4 + i])
        assert torch.equal(alone[0], batch[i]), f"prompt {i} differs alone and in a batch"


def test_temperatures_and_callback(model):
    ids = prompt_batch(3)
    kw = dict(steps=6, guidance=1.5, seeds=[0, 1, 2], sample_temperature=0.7, confidence_temperature=2.0)
    seen = []
    got = Engine(model).generate_image_tokens(ids, callback=lambda s, t, m: seen.append((s, int(m.sum()))), **kw)
    assert torch.equal(got, generate_image_tokens(model, ids, backend="reference", **kw))
    assert [s for s, _ in seen] == list(range(6)) and seen[-1][1] == 0


def test_buffers_reused_and_uncond_cache_follows_weights():
    model = sharp_model(seed=3)
    engine = Engine(model)
    ids = prompt_batch(2)
    kw = dict(steps=3, guidance=2.0, seeds=[1, 2])
    first = engine.generate_image_tokens(ids, **kw)
    keys = next(iter(engine._buffers.values())).kv.keys[0]
    again = engine.generate_image_tokens(ids, **kw)
    assert torch.equal(first, again)
    assert len(engine._buffers) == 1 and next(iter(engine._buffers.values())).kv.keys[0] is keys, "buffers reused"
    with torch.no_grad():  # new weights in place: the cached empty-prompt keys/values must be recomputed
        model.layers[0].attn.qkv.weight.mul_(1.5)
    want = generate_image_tokens(model, ids, backend="reference", **kw)
    assert torch.equal(engine.generate_image_tokens(ids, **kw), want)


@pytest.mark.parametrize("top_p", [None, 0.8])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_answers_equal_reference(model, top_p, backend):
    gen = torch.Generator().manual_seed(1)
    img = torch.randint(0, CFG.codebook_size, (4, CFG.image_tokens), generator=gen)
    questions = [[20, 21, 22], [23], [24, 25, 26, 27, 28], []]  # different lengths: left padding
    ids = mmu_prompt_ids(img, questions, CFG)
    kw = dict(max_new_tokens=7, top_p=top_p, seeds=[3, 4, 5, 6], allowed_vocab=CFG.text_vocab_size)
    want = generate_answer_ids(model, ids, **kw)
    got = Engine(model, backend=backend).generate_answer_ids(ids, **kw)
    assert got == want
    assert any(len(a) for a in got)


def test_answer_with_embeddings_equals_reference(model):
    gen = torch.Generator().manual_seed(2)
    img = torch.randint(0, CFG.codebook_size, (3, CFG.image_tokens), generator=gen)
    ids = mmu_prompt_ids(img, [[20], [21, 22], [23, 24, 25]], CFG)
    e_sem = torch.randn(3, CFG.sem_dim, generator=gen)
    e_id = torch.randn(3, CFG.id_dim, generator=gen)
    kw = dict(max_new_tokens=6, allowed_vocab=CFG.text_vocab_size, e_sem=e_sem, e_id=e_id)
    assert Engine(model).generate_answer_ids(ids, **kw) == generate_answer_ids(model, ids, **kw)


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_threshold_decoding(model, threshold):
    engine = Engine(model)
    ids = prompt_batch(4)
    steps = 8
    history = []
    tokens = engine.generate_image_tokens(ids, steps=steps, guidance=2.0, seeds=[0, 1, 2, 3], threshold=threshold,
                                          callback=lambda s, t, m: history.append((t.clone(), m.clone())))
    stats = engine.last_stats
    assert stats.steps == steps and 1 <= stats.steps_run <= steps and len(history) == stats.steps_run
    prev_t, prev_m = torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool)
    for step, (t, m) in enumerate(history):
        assert torch.equal(t[~prev_m], prev_t[~prev_m]), "known tokens never change"
        assert not bool((m & ~prev_m).any()), "a known position is never masked again"
        scheduled = scheduled_mask_len(CFG.image_tokens, prev_m.sum(1), step, steps)
        assert bool((m.sum(1) <= scheduled).all()), "at least the scheduled number is accepted"
        prev_t, prev_m = t, m
    assert not bool(prev_m.any()) and torch.equal(prev_t, tokens)
    if threshold == 0.3:
        assert stats.steps_run < steps, "a low threshold on a sharp model finishes early"


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_threshold_decoding_equals_reference_loop(model, threshold):
    """Threshold decoding is an option of the op, so the reference loop and the engine draw the same tokens."""
    ids = prompt_batch(3)
    kw = dict(steps=8, guidance=2.0, seeds=[5, 6, 7], threshold=threshold)
    ran = []
    want = generate_image_tokens(model, ids, backend="reference", callback=lambda *_: ran.append(1), **kw)
    engine = Engine(model)
    assert torch.equal(engine.generate_image_tokens(ids, **kw), want)
    assert engine.last_stats.steps_run == len(ran)


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_bfloat16_engine_equals_bfloat16_reference_loop_on_the_same_kernels(backend):
    """In bf16 the engine runs the model's own blocks, so it matches the reference loop run on the same kernels
    token for token (the engine once re-implemented the sequence MoE in another operation order and did not)."""
    if backend == "cpp" and not backends.available("grouped_moe", "cpp"):
        pytest.skip("fastface._C is not built")
    m16 = sharp_model(seed=5, dtype=torch.bfloat16)
    ids = prompt_batch(3)
    kw = dict(steps=5, guidance=2.0, seeds=[0, 1, 2])
    m16.set_backend(backend)
    want = generate_image_tokens(m16, ids, backend=backend, **kw)
    assert torch.equal(Engine(m16, backend=backend).generate_image_tokens(ids, **kw), want)


def test_engine_leaves_the_models_backend_alone(model):
    model.set_backend("reference")
    Engine(model, backend="auto").generate_image_tokens(prompt_batch(1), steps=2, seeds=[0])
    assert all(layer.moe.backend == "reference" for layer in model.layers)


def test_decoder_is_the_one_choice_of_loop(model):
    from fastface.decoding import Decoder

    ids = prompt_batch(2)
    kw = dict(steps=3, guidance=2.0, seeds=[1, 2])
    ref, fast = Decoder(model, "reference"), Decoder(model, "auto")
    assert not ref.uses_engine and ref.engine is None and fast.uses_engine
    assert torch.equal(ref.image_tokens(ids, **kw), fast.image_tokens(ids, **kw))
    assert fast.last_stats.steps_run == 3 and ref.last_stats is None


def test_threshold_one_keeps_schedule_when_nothing_is_certain(model):
    """With threshold 1 only tokens of probability exactly 1 are extra; the schedule still bounds the loop."""
    engine = Engine(model)
    ids = prompt_batch(2)
    engine.generate_image_tokens(ids, steps=5, guidance=2.0, seeds=[0, 1], threshold=1.0)
    assert engine.last_stats.steps_run <= 5


def test_bfloat16_engine_runs_and_mostly_agrees():
    m32 = sharp_model(seed=5)
    m16 = sharp_model(seed=5, dtype=torch.bfloat16)
    ids = prompt_batch(3)
    kw = dict(steps=4, guidance=2.0, seeds=[0, 1, 2])
    a = Engine(m32).generate_image_tokens(ids, **kw)
    b = Engine(m16).generate_image_tokens(ids, **kw)
    assert b.shape == a.shape and bool(((b >= 0) & (b < CFG.codebook_size)).all())
    assert torch.equal(b, Engine(m16).generate_image_tokens(ids, **kw)), "bf16 is deterministic"
    assert (a == b).float().mean() > 0.5, "bf16 tokens mostly agree with fp32 on a sharp model"


def test_timers_cover_the_sections(model):
    timers = Timers()
    Engine(model).generate_image_tokens(prompt_batch(2), steps=3, guidance=2.0, seeds=[0, 1], timers=timers)
    for name in ("prefill", "attention", "moe", "seq_moe", "lm_head", "sampler"):
        assert timers.seconds.get(name, 0) > 0, name


def test_engine_validation(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="schedule"):
        engine.generate_image_tokens(prompt_batch(1), steps=2, seeds=[0], schedule="square")
    with pytest.raises(ValueError, match="threshold"):
        engine.generate_image_tokens(prompt_batch(1), steps=2, seeds=[0], threshold=0.0)
    with pytest.raises(ValueError, match="backend"):
        Engine(model, backend="gpu")


def test_pipeline_routes_to_engine(tiny_checkpoint):
    ref = fastface.load(tiny_checkpoint, backend="reference")
    fast = fastface.load(tiny_checkpoint, backend="auto")
    kw = dict(steps=4, guidance=2.0, seed=3)
    assert torch.equal(fast.generate_tokens(["w1 w2 w3", "w4", ""], **kw), ref.generate_tokens(["w1 w2 w3", "w4", ""],
                                                                                               **kw))
    assert fast.decoder._engine is not None and ref.decoder._engine is None and not ref.decoder.uses_engine
    img = torch.randint(0, ref.config.codebook_size, (2, ref.config.image_tokens))
    assert fast.answer(img, ["w1 w2", "w3"]) == ref.answer(img, ["w1 w2", "w3"])
    fast.generate_tokens(["w1"], steps=4, threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        fast.generate_tokens(["w1"], threshold=1.5)
