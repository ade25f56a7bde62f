"""Training: loss goes down, exact resume after an interruption, data-parallel equals one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import word_tokenizer

from fastface.config import FaceConfig
from fastface.model import FaceTransformer
from fastface.train import SyntheticData, TrainSettings, latest_state, make_batch, train


def setup(seed=0, **overrides):
    cfg = FaceConfig.from_name("tiny", **overrides)
    model = FaceTransformer(cfg)
    model.reset_parameters(seed)
    return cfg, model, SyntheticData(cfg, size=16, seed=seed), word_tokenizer(cfg.text_vocab_size)


def test_batches_mix_tasks_and_mask_targets():
    cfg, _, data, _ = setup()
    b = make_batch(data, cfg, seed=0, step=0, batch_size=8, mmu_fraction=0.5)
    assert len(b.t2i_rows) and len(b.mmu_rows), "a mixed batch"
    assert b.input_ids.shape[0] == 8
    img = b.input_ids[b.t2i_rows, b.image_start : b.image_start + cfg.image_tokens]
    assert torch.equal(img == cfg.mask_token_id, b.masked), "masked positions hold <mask>"
    assert bool((b.masked.sum(1) >= 1).all())
    assert torch.equal(img[~b.masked] - cfg.image_token_offset, b.targets[~b.masked])
    assert bool(b.answer_mask.any())


def test_a_few_steps_lower_the_loss():
    cfg, model, data, tok = setup()
    hist = train(model, data, tok, TrainSettings(steps=30, batch_size=8, lr=3e-3, warmup=3), progress=False)
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.8 * first, f"loss did not go down: {first:.3f} -> {last:.3f}"


def test_resume_is_exact(tmp_path):
    settings = TrainSettings(steps=6, batch_size=6, lr=2e-3, warmup=2, save_every=3)
    _, model_a, data, tok = setup()
    hist_a = train(model_a, data, tok, settings, tmp_path / "a", progress=False)
    _, model_b, _, _ = setup()
    train(model_b, data, tok, settings, tmp_path / "b", progress=False, stop_after=4)  # "killed" after step 4
    assert latest_state(tmp_path / "b").name == "step-0000003"
    _, model_c, _, _ = setup(seed=99)  # a fresh process: weights come from the checkpoint
    hist_c = train(model_c, data, tok, settings, tmp_path / "b", progress=False)
    assert [h["step"] for h in hist_c] == [4, 5, 6]
    assert [h["loss"] for h in hist_c] == [h["loss"] for h in hist_a[3:]]
    for (name, p), q in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """Same global batch, 2 gloo processes vs 1: the same loss curve."""
    script = os.path.join(os.path.dirname(__file__), "ddp_train_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, script, str(one)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    script, str(two)], check=True, env=env, timeout=300, capture_output=True)
    l1, l2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5 * abs(a), f"loss curves differ: {l1} vs {l2}"


@pytest.mark.parametrize("qa", [1, 5])
def test_face_world_data_understanding_rows(qa):
    """Face-world understanding rows: the image's own tokens, then ``qa`` question-answer turns whose answers
    (and only they) are supervised, and the answers agree with the face's attributes."""
    from fastface.config import BOS_ID, EOS_ID
    from fastface.data.text import answer_text
    from fastface.data.training import FaceWorldData

    cfg = FaceConfig.from_name("face-s")
    data = FaceWorldData.build(cfg, faces=3, seed=5, qa_per_example=qa)
    assert data.image_tokens.shape == (3, cfg.image_tokens)
    b = make_batch(data, cfg, seed=0, step=0, batch_size=4, mmu_fraction=1.0)
    assert len(b.mmu_rows) == 4 and not len(b.t2i_rows)
    values = {answer_text(k, v) for a in data.attrs for k, v in vars(a).items() if isinstance(v, str)}
    for j, row in enumerate(b.mmu_rows.tolist()):
        ids = b.input_ids[row]
        assert int((ids == BOS_ID).sum()) == qa
        # supervised next tokens: each answer's words and its <eos>, qa answers in all
        targets = b.next_targets[j][b.answer_mask[j]]
        assert int((targets == EOS_ID).sum()) == qa
        words = data.tokenizer.decode(targets[targets != EOS_ID].tolist()).split()
        assert words and all(any(w in v.split() for v in values | {"yes", "no"}) for w in words)
    with pytest.raises(ValueError, match="qa_per_example"):
        FaceWorldData.build(cfg, faces=1, qa_per_example=0)


def test_face_world_caption_turns():
    """With ``caption_rate=1`` every understanding row opens with the caption request, and its supervised answer
    is a caption of that very face; at rate 0 the rows are exactly those of a run without the option."""
    from fastface.config import BOS_ID, EOS_ID, UNK_ID
    from fastface.data.text import CAPTION_QUESTION, parse_caption
    from fastface.data.training import FaceWorldData

    cfg = FaceConfig.from_name("face-s")
    data = FaceWorldData.build(cfg, faces=3, seed=6, qa_per_example=2, caption_rate=1.0)
    question = data.encode(CAPTION_QUESTION)
    assert UNK_ID not in question
    gen = torch.Generator().manual_seed(0)
    for index in range(3):
        image, turns = data.mmu_example(index, gen)
        assert torch.equal(image, data.image_tokens[index]) and len(turns) == 3 and turns[0][0] == question
        found = parse_caption(data.tokenizer.decode(turns[0][1]))
        attrs = vars(data.attrs[index])
        assert len(found) >= 5 and all(attrs[name] in values for name, values in found.items()), found
    b = make_batch(data, cfg, seed=0, step=0, batch_size=3, mmu_fraction=1.0)
    for j, row in enumerate(b.mmu_rows.tolist()):
        assert int((b.input_ids[row] == BOS_ID).sum()) == 3
        targets = b.next_targets[j][b.answer_mask[j]]
        assert int((targets == EOS_ID).sum()) == 3 and len(targets) > 3 + 10  # a caption is many tokens
    plain = FaceWorldData(cfg, data.attrs, data.image_tokens, data.tokenizer, data.image_tokenizer, 2)
    zero = FaceWorldData(cfg, data.attrs, data.image_tokens, data.tokenizer, data.image_tokenizer, 2, 0.0)
    for step in range(3):
        a = make_batch(plain, cfg, seed=1, step=step, batch_size=4, mmu_fraction=1.0)
        z = make_batch(zero, cfg, seed=1, step=step, batch_size=4, mmu_fraction=1.0)
        assert torch.equal(a.input_ids, z.input_ids) and torch.equal(a.answer_mask, z.answer_mask)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="caption_rate"):
            FaceWorldData.build(cfg, faces=1, caption_rate=bad)


def test_init_from_a_checkpoint(tmp_path):
    """``--init`` starts a new run from another run's weights: with learning rate 0 they come out unchanged."""
    from fastface.checkpoint import load_checkpoint
    from fastface.train import main

    base = ["--preset", "tiny", "--data", "synthetic", "--batch-size", "4", "--threads", "1"]
    assert main([*base, "--steps", "2", "--save-every", "2", "--out", str(tmp_path / "a")]) == 0
    src = latest_state(tmp_path / "a")
    assert main([*base, "--steps", "1", "--lr", "0", "--init", str(src), "--out", str(tmp_path / "b")]) == 0
    before, _, _, _ = load_checkpoint(src)
    after, _, _, _ = load_checkpoint(latest_state(tmp_path / "b"))
    fresh = FaceTransformer(before.config)
    fresh.reset_parameters(0)
    for (name, p), q in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(before.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ValueError, match="config differs"):
        main(["--preset", "face-s", "--data", "synthetic", "--steps", "1", "--init", str(src),
              "--out", str(tmp_path / "c")])
