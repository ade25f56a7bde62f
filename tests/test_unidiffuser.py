"""One model for every direction (UniDiffuser, discrete): text and image masked at their own levels in training;
image-to-text by masked diffusion, joint generation and editing in the reference loops and the engine."""

import math

import numpy as np
import pytest
import torch

from fastface.config import FaceConfig
from fastface.engine import Engine
from fastface.model import FaceTransformer, omni_attention_mask
from fastface.ops.d3diff import d3diff_loss_reference
from fastface.prompts import (
    block_text,
    caption_block,
    describe_sequence,
    joint_sequence,
    t2i_prompt_ids,
    text_block_length,
)
from fastface.regions import REGIONS, resolve_region, token_region
from fastface.sampling import (
    describe_ids,
    generate_image_tokens,
    generate_pair_ids,
    text_logit_bias,
)
from fastface.train import SyntheticData, batch_loss, make_batch

CFG = FaceConfig.from_name("tiny")
# a second shape: odd widths, more image tokens than text positions, a sequence MoE reading embeddings
ODD = FaceConfig.from_name("tiny", hidden_size=40, num_heads=5, expert_ffn_size=23, shared_ffn_size=19,
                           max_text_len=11, image_grid=5, image_size=20)


def sharp_model(cfg=CFG, seed=11):
    model = FaceTransformer(cfg).eval()
    model.reset_parameters(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # sharp logits: tokens are not uniform noise
        model.lm_head.weight[[cfg.pad_id, cfg.eos_id]] = 0  # ... nor every caption all <pad>
        for layer in model.layers:  # embeddings matter: the semantic/identity projections are not zero
            if layer.seq_moe is not None:
                layer.seq_moe.sem_proj.weight.copy_(torch.randn(layer.seq_moe.sem_proj.weight.shape, generator=gen))
                layer.seq_moe.id_proj.weight.copy_(torch.randn(layer.seq_moe.id_proj.weight.shape, generator=gen))
    model.set_backend("reference")
    return model


_MODELS = {}


def model_of(cfg):
    key = id(cfg)
    if key not in _MODELS:
        _MODELS[key] = sharp_model(cfg)
    return _MODELS[key]


def images_of(cfg, B, seed=0):
    return torch.randint(0, cfg.codebook_size, (B, cfg.image_tokens), generator=torch.Generator().manual_seed(seed))


def embeddings_of(cfg, B, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.randn(B, cfg.sem_dim, generator=gen), torch.randn(B, cfg.id_dim, generator=gen)


# ----------------------------------------------------------------------------------------------- layouts


def test_caption_block_round_trip_and_truncation():
    T = text_block_length(CFG)
    block = caption_block([9, 10, 11], CFG)
    assert len(block) == T and block[:4] == [9, 10, 11, CFG.eos_id] and set(block[4:]) == {CFG.pad_id}
    assert block_text(block, CFG) == [9, 10, 11]
    assert block_text([12, CFG.bos_id, 13, CFG.eos_id, 14], CFG) == [12, 13], "stops at <eos>, drops specials"
    with pytest.warns(UserWarning, match="truncated"):
        long = caption_block(list(range(8, 8 + T + 5)), CFG)
    assert len(long) == T and long[-1] == CFG.eos_id


def test_block_attention_is_bidirectional_and_a_prefix():
    T, N = text_block_length(CFG), CFG.image_tokens
    block = torch.tensor([caption_block([9, 10], CFG)])
    image = images_of(CFG, 1) + CFG.image_token_offset
    ids, in_block = joint_sequence(block, image, CFG)
    mask = omni_attention_mask(ids, pad_id=CFG.pad_id, soi_id=CFG.soi_id, eoi_id=CFG.eoi_id, text_block=in_block)[0]
    blk = torch.nonzero(in_block[0]).squeeze(1)
    assert bool(mask[blk][:, blk].all()), "block rows see the whole block, its <pad>s included"
    assert not bool(mask[blk][:, T + 2:].any()), "the block never sees the image"
    assert bool(mask[T + 2:][:, : T + 2].all()), "image rows see the whole block"
    ids, in_block = describe_sequence(image, block, CFG)
    mask = omni_attention_mask(ids, pad_id=CFG.pad_id, soi_id=CFG.soi_id, eoi_id=CFG.eoi_id, text_block=in_block)[0]
    assert not bool(mask[: N + 4, N + 4:].any()), "the image prefix never sees the block"
    assert bool(mask[N + 4:].all()), "block rows see the prefix and the whole block"


def test_image_prefix_is_independent_of_the_block():
    """What makes the describe prefix cacheable: changing the block leaves every prefix position's output alone."""
    model = model_of(CFG)
    N = CFG.image_tokens
    image = images_of(CFG, 1) + CFG.image_token_offset
    task = torch.zeros(1, dtype=torch.long)
    outs = []
    for caption in ([9, 10, 11], [30, 31]):
        ids, in_block = describe_sequence(image, torch.tensor([caption_block(caption, CFG)]), CFG)
        cond = ~in_block
        outs.append(model(ids, task, text_block=in_block, cond_mask=cond).logits[0])
    assert torch.equal(outs[0][: N + 4], outs[1][: N + 4])
    assert not torch.equal(outs[0][N + 4:], outs[1][N + 4:])


# ---------------------------------------------------------------------------------------------- training


def test_each_modality_follows_its_own_mask_level():
    data = SyntheticData(CFG, size=32, seed=1)
    T, N = text_block_length(CFG), CFG.image_tokens
    image_levels, text_levels, pairs = [], [], 0
    for step in range(6):
        b = make_batch(data, CFG, seed=2, step=step, batch_size=16, mmu_fraction=0.5, text_diffusion=0.7)
        assert b.text_rows is not None and len(b.text_rows)
        for j, r in enumerate(b.text_rows.tolist()):
            m = float(b.text_ratio[j])
            want = T if m == 1.0 else max(1, round(T * m))
            assert int(b.text_masked[j].sum()) == want, "the block's masked count follows its level"
            ids = b.input_ids[r, int(b.text_start[j]) : int(b.text_start[j]) + T]
            assert torch.equal(ids, torch.where(b.text_masked[j], CFG.mask_token_id, b.text_targets[j]))
            assert bool(b.text_block[r].sum() == T)
            text_levels.append(m)
        for i in range(len(b.t2i_rows)):
            m = float(b.mask_ratio[i])
            assert int(b.masked[i].sum()) == max(1, round(N * m)), "the image's masked count follows its level"
            image_levels.append(m)
        # joint rows carry both levels: they are drawn independently
        joint = [r for r in b.text_rows.tolist() if r in b.t2i_rows.tolist()]
        for r in joint:
            i, j = b.t2i_rows.tolist().index(r), b.text_rows.tolist().index(r)
            pairs += 1
            assert abs(float(b.mask_ratio[i]) - float(b.text_ratio[j])) > 0 or float(b.text_ratio[j]) == 1.0
    assert pairs > 3
    assert len(set(text_levels)) > 5 and len(set(image_levels)) > 5
    assert any(m == 1.0 for m in text_levels), "some blocks fully masked: the unconditional of the image"


def test_text_diffusion_zero_draws_the_batches_it_drew_before():
    data = SyntheticData(CFG, size=16)
    a = make_batch(data, CFG, seed=0, step=3, batch_size=8, mmu_fraction=0.5)
    b = make_batch(data, CFG, seed=0, step=3, batch_size=8, mmu_fraction=0.5, text_diffusion=0.0)
    assert torch.equal(a.input_ids, b.input_ids) and b.text_block is None


def test_describe_rows_have_a_clean_or_blank_image_and_embeddings_to_match():
    data = SyntheticData(CFG, size=32, embeddings=True)
    cfg = FaceConfig.from_name("tiny", cond_dropout=0.5)
    N = cfg.image_tokens
    seen_blank = seen_clean = False
    for step in range(8):
        b = make_batch(data, cfg, seed=0, step=step, batch_size=12, mmu_fraction=0.5, text_diffusion=1.0)
        for r in b.text_rows.tolist():
            if int(b.task[r]) != 0:
                continue
            image = b.input_ids[r, int(b.text_start[b.text_rows.tolist().index(r)]) - N - 2:][:N]
            blank = bool((image == cfg.mask_token_id).all())
            assert blank or not bool((image == cfg.mask_token_id).any())
            assert blank == bool((b.e_sem[r] == 0).all()), "a blank image comes without its embeddings"
            seen_blank |= blank
            seen_clean |= not blank
    assert seen_blank and seen_clean


def test_text_loss_is_d3diff_on_normalised_text_logits():
    data = SyntheticData(CFG, size=16)
    model = sharp_model()
    model.train()
    b = make_batch(data, CFG, seed=0, step=1, batch_size=10, mmu_fraction=0.3, text_diffusion=0.6)
    torch.manual_seed(0)
    _, stats = batch_loss(model, b, CFG, loss_backend="reference")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(b.input_ids, b.task, cond_mask=b.cond_mask, text_block=b.text_block)
    T = b.text_masked.shape[1]
    total = 0.0
    for j, r in enumerate(b.text_rows.tolist()):
        s = int(b.text_start[j])
        logits = torch.log_softmax(out.logits[r, s : s + T, : CFG.text_vocab_size].float(), -1)[b.text_masked[j]]
        ratio = torch.full((len(logits),), float(b.text_ratio[j]))
        total += float(d3diff_loss_reference(logits, b.text_targets[j][b.text_masked[j]], ratio,
                                             alpha=CFG.d3diff_alpha, r_max=CFG.d3diff_r_max,
                                             reduction="none").sum())
    assert math.isclose(stats["text"], total / float(b.text_masked.sum()), rel_tol=1e-4)
    loss, _ = batch_loss(model, b, CFG, loss_backend="reference")
    loss.backward()
    assert model.lm_head.weight.grad[: CFG.text_vocab_size].abs().sum() > 0


def test_training_with_text_diffusion_resumes_exactly(tmp_path):
    from fastface.train import TrainSettings, train
    from tests.conftest import word_tokenizer

    data = SyntheticData(CFG, size=16, embeddings=True)
    tok = word_tokenizer(CFG.text_vocab_size)
    settings = TrainSettings(steps=4, batch_size=6, lr=1e-3, warmup=1, save_every=2, text_diffusion=0.5)

    def fresh():
        m = FaceTransformer(CFG)
        m.reset_parameters(0)
        return m

    whole = train(fresh(), data, tok, settings, progress=False)
    assert all("text" in h for h in whole)
    part = fresh()
    train(part, data, tok, settings, tmp_path / "run", progress=False, stop_after=2)
    rest = train(fresh(), data, tok, settings, tmp_path / "run", progress=False)
    assert [h["loss"] for h in rest] == [h["loss"] for h in whole[2:]]


# -------------------------------------------------------------------------------- engine == reference


CONFIGS = {"tiny": CFG, "odd": ODD}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_describe_engine_equals_reference(name, backend, guidance):
    cfg = CONFIGS[name]
    model = model_of(cfg)
    images = images_of(cfg, 3)
    e_sem, e_id = embeddings_of(cfg, 3)
    kw = dict(steps=5, guidance=guidance, seeds=[3, 1, 4], sample_temperature=0.7, confidence_temperature=1.0,
              e_sem=e_sem, e_id=e_id)
    want = describe_ids(model, images, backend="reference", **kw)
    got = Engine(model, backend=backend).describe_ids(images, **kw)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} text tokens differ"
    assert len(set(want.flatten().tolist())) > 2, "a degenerate model"
    specials = set(cfg.special_token_ids) - {cfg.eos_id, cfg.pad_id}
    assert not specials & set(want.flatten().tolist()), "a block never holds <bos>, <soi>, ..."


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_joint_engine_equals_reference(name, backend, guidance):
    cfg = CONFIGS[name]
    model = model_of(cfg)
    kw = dict(seeds=[5, 0, 7], steps=4, guidance=guidance, text_sample_temperature=0.8)
    want_text, want_image = generate_pair_ids(model, backend="reference", **kw)
    got_text, got_image = Engine(model, backend=backend).generate_pair_ids(**kw)
    assert torch.equal(got_text, want_text) and torch.equal(got_image, want_image)
    assert not bool((want_text == cfg.mask_token_id).any()), "every block position decoded"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_edit_engine_equals_reference_and_keeps_the_outside(name, backend, guidance):
    cfg = CONFIGS[name]
    model = model_of(cfg)
    images = images_of(cfg, 3, seed=4)
    region = torch.rand(3, cfg.image_tokens, generator=torch.Generator().manual_seed(2)) < 0.35
    region[2] = False  # an empty region: the image comes back unchanged
    ids = t2i_prompt_ids([[9, 10], [11], []], cfg)
    kw = dict(steps=4, guidance=guidance, seeds=[1, 2, 3], tokens=images, region=region)
    want = generate_image_tokens(model, ids, backend="reference", **kw)
    got = Engine(model, backend=backend).generate_image_tokens(ids, **kw)
    assert torch.equal(got, want)
    assert torch.equal(want[~region], images[~region]), "every token outside the region unchanged"
    assert bool((want[region] != images[region]).any()), "the region was re-drawn"


def test_known_tokens_never_change_in_any_direction():
    model = model_of(CFG)
    engine = Engine(model)

    def watcher():
        seen = {}

        def callback(step, tokens, masked_or_image):
            seen.setdefault("states", []).append((tokens.clone(), masked_or_image.clone()))
        return seen, callback

    seen, cb = watcher()
    engine.describe_ids(images_of(CFG, 2), steps=6, seeds=[0, 1], callback=cb)
    states = seen["states"]
    for (t0, m0), (t1, m1) in zip(states, states[1:]):
        assert torch.equal(t1[~m0], t0[~m0]), "a decoded caption token changed"
        assert bool((m1 <= m0).all()), "a decoded position was masked again"
    assert not bool(states[-1][1].any())
    region = torch.zeros(2, CFG.image_tokens, dtype=torch.bool)
    region[:, :7] = True
    seen, cb = watcher()
    images = images_of(CFG, 2)
    engine.generate_image_tokens(t2i_prompt_ids([[9], [10]], CFG), steps=4, guidance=1.0, seeds=[0, 1], tokens=images,
                                 region=region, callback=cb)
    for tokens, masked in seen["states"]:
        assert torch.equal(tokens[:, 7:], images[:, 7:])
        assert not bool(masked[:, 7:].any())
    masked_counts = [int(m[0].sum()) for _, m in seen["states"]]
    assert masked_counts[0] < 7 and masked_counts[-1] == 0, "the schedule runs over the region's 7 tokens"


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_request_alone_equals_in_a_batch(backend):
    model = model_of(CFG)
    engine = Engine(model, backend=backend) if backend != "reference" else None
    images = images_of(CFG, 4, seed=8)
    e_sem, e_id = embeddings_of(CFG, 4)

    def describe(rows):
        kw = dict(steps=4, guidance=1.0, seeds=[10 + r for r in rows], e_sem=e_sem[rows], e_id=e_id[rows])
        return (engine.describe_ids(images[rows], **kw) if engine else
                describe_ids(model, images[rows], backend="reference", **kw))

    def joint(rows):
        kw = dict(steps=4, guidance=1.0, seeds=[10 + r for r in rows])
        return engine.generate_pair_ids(**kw) if engine else generate_pair_ids(model, backend="reference", **kw)

    batch_describe, (batch_text, batch_image) = describe([0, 1, 2, 3]), joint([0, 1, 2, 3])
    for r in (0, 2):
        assert torch.equal(describe([r])[0], batch_describe[r])
        text, image = joint([r])
        assert torch.equal(text[0], batch_text[r]) and torch.equal(image[0], batch_image[r])


def test_unconditional_image_leaves_the_caption_masked_and_fixed_text_is_kept():
    model = model_of(CFG)
    engine = Engine(model)
    text, image = engine.generate_pair_ids(seeds=[0, 1], steps=3, decode_text=False, guidance=1.0)
    assert bool((text == CFG.mask_token_id).all()) and image.shape == (2, CFG.image_tokens)
    want_text, want_image = generate_pair_ids(model, seeds=[0, 1], steps=3, decode_text=False, guidance=1.0,
                                              backend="reference")
    assert torch.equal(want_image, image)
    given = torch.tensor([caption_block([9, 10], CFG), caption_block([11], CFG)])
    text, image = engine.generate_pair_ids(seeds=[0, 1], steps=3, text=given)
    assert torch.equal(text, given)
    assert torch.equal(image, generate_pair_ids(model, seeds=[0, 1], steps=3, text=given, backend="reference")[1])


def test_text_logit_bias_bans_specials_but_eos_and_pad():
    bias = text_logit_bias(CFG)
    banned = {i for i in range(CFG.text_vocab_size) if bias[i] < -1e29}
    assert banned == set(CFG.special_token_ids) - {CFG.eos_id, CFG.pad_id}


@pytest.mark.parametrize("call,match", [
    (lambda e: e.generate_pair_ids(seeds=[0], steps=0), "steps"),
    (lambda e: e.generate_pair_ids(seeds=[0], text=torch.zeros(1, 3, dtype=torch.long)), "text must be"),
    (lambda e: e.generate_pair_ids(seeds=[0], decode_text="yes"), "decode_text"),
    (lambda e: e.describe_ids(images_of(CFG, 1), seeds=[0], guidance=float("nan")), "guidance"),
    (lambda e: e.generate_image_tokens(t2i_prompt_ids([[9]], CFG), seeds=[0], region=torch.ones(1, CFG.image_tokens,
                                       dtype=torch.bool)), "region needs"),
    (lambda e: e.generate_image_tokens(t2i_prompt_ids([[9]], CFG), seeds=[0], tokens=images_of(CFG, 1),
                                       region=torch.ones(1, 3, dtype=torch.bool)), "region must have shape"),
    (lambda e: e.generate_image_tokens(t2i_prompt_ids([[9]], CFG), seeds=[0], tokens=images_of(CFG, 1) + 10**6,
                                       region=torch.ones(1, CFG.image_tokens, dtype=torch.bool)), "tokens must lie"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(Engine(model_of(CFG)))


# ----------------------------------------------------------------------------------------------- regions


def test_token_region_covers_every_patch_the_pixels_touch():
    mask = np.zeros((64, 64), dtype=bool)
    mask[5, 9] = True  # one pixel: token (1, 2) of a 16x16 grid
    tokens = token_region(mask, 16)
    assert tokens.shape == (256,) and int(tokens.sum()) == 1 and bool(tokens[1 * 16 + 2])
    grown = token_region(mask, 16, grow=1)
    assert int(grown.sum()) == 9
    with pytest.raises(ValueError, match="does not split"):
        token_region(np.zeros((30, 30), dtype=bool), 16)


def test_resolve_region_by_name_pixels_and_tokens():
    from fastface.data.renderer import PARSING_CLASSES

    parsing = np.zeros((64, 64), dtype=np.uint8)
    parsing[:16, :] = PARSING_CLASSES.index("hair")
    parsing[40:44, 20:28] = PARSING_CLASSES.index("lips")
    hair = resolve_region("hair", 16, parsing=parsing)
    assert int(hair.sum()) == 64 and bool(hair[:64].all())
    mouth = resolve_region("mouth", 16, parsing=parsing)
    assert int(mouth.sum()) == 2
    face = resolve_region("face", 16, parsing=parsing)
    assert bool((face >= mouth).all())
    assert torch.equal(resolve_region(parsing == PARSING_CLASSES.index("hair"), 16), hair)
    assert torch.equal(resolve_region(hair.numpy().reshape(16, 16), 16), hair)
    assert torch.equal(resolve_region(hair, 16), hair)
    assert set(REGIONS) >= {"face", "hair", "eyes", "mouth", "background"}
    for bad, err, match in (("elbow", ValueError, "region must be one of"), (np.zeros(7, dtype=bool), ValueError,
                                                                             "shape"),
                            (np.zeros(256), TypeError, "bool"), (3, TypeError, "name")):
        with pytest.raises(err, match=match):
            resolve_region(bad, 16, parsing=parsing)
    with pytest.raises(ValueError, match="parsing map"):
        resolve_region("hair", 16)


# ------------------------------------------------------------------------------- pipeline and command line


@pytest.fixture(scope="module")
def pipe():
    import fastface

    return fastface.load()


@pytest.fixture(scope="module")
def faces(pipe):
    from fastface.data.dataset import make_dataset

    return make_dataset(3, seed=12_345, captions=False)


def test_pipeline_describe_both_modes(pipe, faces):
    images = list(faces["images"])
    parallel = pipe.describe(images, steps=4, seed=3)
    assert len(parallel) == 3 and all(isinstance(c, str) for c in parallel)
    alone = pipe.describe(images[1:2], steps=4, seed=4)
    assert alone == parallel[1:2], "image b uses seed + b: the same caption alone"
    ids = pipe.encode_images(images)  # ids: their embeddings come from the decoded pixels
    assert len(pipe.describe(ids, steps=4, seed=3)) == 3
    auto = pipe.describe(images[:2], mode="autoregressive", max_new_tokens=6)
    assert len(auto) == 2 and all(len(c.split()) <= 6 for c in auto)
    assert pipe.describe([], steps=2) == [] and pipe.describe([], mode="autoregressive") == []
    with pytest.raises(ValueError, match="mode"):
        pipe.describe(images, mode="beam")


def test_pipeline_generate_pairs(pipe):
    captions, images = pipe.generate_pairs(2, steps=3, seed=1)
    assert len(captions) == len(images) == 2 and images[0].size == (pipe.config.image_size,) * 2
    again, tokens = pipe.generate_pair_tokens(1, steps=3, seed=2)
    assert again == captions[1:], "pair b uses seed + b"
    blank, _ = pipe.generate_pair_tokens(2, steps=3, text=False)
    assert blank == ["", ""]
    none, ids = pipe.generate_pair_tokens(0)
    assert none == [] and ids.shape == (0, pipe.config.image_tokens)
    with pytest.raises(ValueError, match="n"):
        pipe.generate_pair_tokens(-1)


def test_pipeline_edit_keeps_every_token_outside_the_region(pipe, faces):
    image = faces["images"][0]
    before = pipe.encode_images([image])
    mask = np.zeros((pipe.config.image_size,) * 2, dtype=bool)
    mask[:20, :] = True  # the top of the picture: 5 token rows of 16
    edited = pipe.edit_tokens([image], ["a woman with blue hair"], mask, steps=4, seed=0)
    region = resolve_region(mask, pipe.config.image_grid)
    assert int(region.sum()) == 5 * pipe.config.image_grid
    assert torch.equal(edited[0][~region], before[0][~region])
    assert bool((edited[0][region] != before[0][region]).any())
    by_name = pipe.edit(image, "a woman with blue hair", "hair", steps=4, seed=0)
    assert by_name.size == (pipe.config.image_size,) * 2
    batch = pipe.edit_tokens(list(faces["images"][:2]), ["a woman with blue hair", "a man"], [mask, region],
                             steps=4, seed=[0, 9])
    assert torch.equal(batch[0], edited[0]), "an edit alone == in a batch"
    assert torch.equal(batch[1][~region], pipe.encode_images([faces["images"][1]])[0][~region])
    with pytest.raises(ValueError, match="regions"):
        pipe.edit_tokens([image], ["a"], [mask, mask])
    with pytest.raises(ValueError, match="prompts"):
        pipe.edit_tokens([image], ["a", "b"], mask)
    with pytest.raises(ValueError, match="region must be one of"):
        pipe.edit(image, "a", "elbow")


def run_cli(argv, capsys):
    from fastface import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_describe_and_edit(faces, tmp_path, capsys):
    import json

    from PIL import Image

    path = tmp_path / "face.png"
    Image.fromarray(faces["images"][0]).save(path)
    code, out, err = run_cli(["describe", str(path), str(path), "--steps", "3", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [str(path)] * 2 and all(isinstance(r["caption"], str) for r in rows)
    code, out, err = run_cli(["describe", str(path), "--mode", "autoregressive"], capsys)
    assert code == 0 and out.endswith("\n"), err
    mask = tmp_path / "mask.npy"
    np.save(mask, np.arange(256).reshape(16, 16) < 48)
    for region in ("hair", str(mask)):
        code, out, err = run_cli(["edit", str(path), "a woman with blue hair", "--region", region, "--steps", "3",
                                  "-o", str(tmp_path / "out.png"), "--quiet"], capsys)
        assert code == 0, err
        assert Image.open(tmp_path / "out.png").size == (64, 64)


@pytest.mark.parametrize("argv,match", [
    (["describe", "missing.png"], "does not exist"),
    (["describe", "{face}", "--steps", "0"], "must be > 0"),
    (["edit", "{face}", "a", "--region", "elbow"], "must be one of"),
    (["edit", "{face}", "a", "--region", "{bad_mask}"], "shape"),
    (["edit", "{face}", " ", "--region", "hair"], "prompt is empty"),
    (["edit", "{face}", "a", "--region", "hair", "-o", "/no/such/dir/x.png"], "does not exist"),
])
def test_cli_errors_are_one_line(argv, match, faces, tmp_path, capsys):
    from PIL import Image

    face = tmp_path / "face.png"
    Image.fromarray(faces["images"][0]).save(face)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(7, dtype=bool))
    argv = [a.format(face=face, bad_mask=bad) for a in argv]
    try:
        code, out, err = run_cli(argv, capsys)
    except SystemExit as exc:  # argparse refuses the value itself
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert match in err


def test_canonical_captions_are_one_wording_per_face():
    """With ``canonical_captions`` a face's caption answer and its text diffusion blocks are one caption, whatever the
    row's randomness; without, they are fresh wordings."""
    from fastface.data.text import parse_caption
    from fastface.data.training import FaceWorldData

    cfg = FaceConfig.from_name("face-s")
    data = FaceWorldData.build(cfg, faces=3, seed=6, qa_per_example=1, caption_rate=1.0, canonical_captions=True)
    for index in range(3):
        text = data.canonical_caption(index)
        found = parse_caption(text)
        attrs = vars(data.attrs[index])
        assert len(found) >= 5 and all(attrs[n] in v for n, v in found.items())
        ids = data.encode(text)
        for s in range(3):
            gen = torch.Generator().manual_seed(s)
            assert data.block_example(index, gen)[0] == ids
            assert data.mmu_example(index, gen)[1][0][1] == ids
    fresh = FaceWorldData.build(cfg, faces=1, seed=6, qa_per_example=1)
    wordings = {tuple(fresh.block_example(0, torch.Generator().manual_seed(s))[0]) for s in range(4)}
    assert len(wordings) > 1
    b = make_batch(data, cfg, seed=0, step=0, batch_size=8, mmu_fraction=0.0, text_diffusion=1.0)
    canonical = [data.encode(data.canonical_caption(i)) for i in range(3)]
    for j in range(len(b.text_rows)):
        assert block_text(b.text_targets[j].tolist(), cfg) in canonical
    with pytest.raises(TypeError, match="canonical_captions"):
        FaceWorldData.build(cfg, faces=1, canonical_captions="yes")
