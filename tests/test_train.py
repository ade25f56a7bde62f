"""Training: loss goes down, exact resume after an interruption, data-parallel equals one process, and a run
directory whose checkpoints survive kills, damage, full disks and a mistaken fresh start."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import word_tokenizer

from fastface.config import FaceConfig
from fastface.model import FaceTransformer
from fastface.train import (
    RunDirError,
    SyntheticData,
    TrainSettings,
    checkpoint_problem,
    latest_state,
    make_batch,
    make_optimizer,
    save_train_state,
    train,
)


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
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          script, str(two)], env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"torchrun exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
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


def test_init_from_a_checkpoint(tmp_path, capsys):
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
    assert main(["--preset", "face-s", "--data", "synthetic", "--steps", "1", "--init", str(src),
                 "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastface train: error: ") and "config differs" in err[-1]  # one line, no traceback


# ------------------------------------------------------------------------------------------ run directory

CLI = ["--preset", "tiny", "--data", "synthetic", "--batch-size", "4", "--threads", "1"]


def short_run(out, steps, **kwargs):
    """Train the tiny model to ``steps`` in ``out`` (checkpoints every 2 steps) -> the steps this call ran."""
    _, model, data, tok = setup()
    settings = TrainSettings(steps=steps, batch_size=4, lr=2e-3, warmup=1, save_every=2)
    return [h["step"] for h in train(model, data, tok, settings, out, progress=False, **kwargs)]


def contents(out):
    return sorted(p.name for p in out.iterdir() if p.name != "train.log")


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run directory after 4 steps: step-0000002, step-0000004, latest -> step-0000004 (copy it before use)."""
    out = tmp_path_factory.mktemp("template") / "run"
    assert short_run(out, 4) == [1, 2, 3, 4]
    return out


@pytest.fixture
def run_dir(four_steps, tmp_path):
    return shutil.copytree(four_steps, tmp_path / "run")


def full_disk(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\0" * 100)  # a partly written file
    raise OSError(errno.ENOSPC, "No space left on device", filename)


def test_pruning_never_removes_a_newer_checkpoint(tmp_path):
    """Writing step 1 into a directory holding steps 7 and 8 keeps all three, and ``latest`` names step 1."""
    _, model, _, tok = setup()
    optimizer = make_optimizer(model, 1e-3, 0.0)
    for step in (7, 8, 1):
        save_train_state(tmp_path, step, model, tok, optimizer, {})
    assert contents(tmp_path) == ["latest", "step-0000001", "step-0000007", "step-0000008"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    for step in (2, 3):  # keep=2: this one and the newest older one
        save_train_state(tmp_path, step, model, tok, optimizer, {})
    assert contents(tmp_path) == ["latest", "step-0000002", "step-0000003", "step-0000007", "step-0000008"]


def test_a_fresh_start_refuses_existing_checkpoints(run_dir, capsys):
    """``resume=False`` / ``--no-resume`` leaves a directory with checkpoints alone; ``--overwrite`` deletes them
    before training and starts from step 0."""
    before = contents(run_dir)
    with pytest.raises(RunDirError, match="already holds checkpoints"):
        short_run(run_dir, 2, resume=False)
    from fastface.train import main

    assert main([*CLI, "--steps", "2", "--no-resume", "--out", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0] and "--overwrite" in err[0], err
    assert contents(run_dir) == before
    assert main([*CLI, "--steps", "1", "--save-every", "1", "--overwrite", "--out", str(run_dir)]) == 0
    assert contents(run_dir) == ["latest", "step-0000001"]
    assert json.loads((run_dir / "step-0000001" / "trainer.json").read_text())["step"] == 1


def break_trainer_json(folder):
    (folder / "trainer.json").write_text("{")


@pytest.mark.parametrize("damage, resumed_from", [
    ("missing", 4), ("empty", 4), ("binary", 4), ("outside", 4), ("absolute", 4), ("no such folder", 4),
    ("incomplete", 2), ("behind", 4),
])
def test_resume_does_not_depend_on_latest(run_dir, tmp_path, capsys, damage, resumed_from):
    """Whatever ``latest`` says, a resume continues from the newest complete step folder of the run directory
    (never a folder outside it), and says so in one line."""
    elsewhere = shutil.copytree(run_dir / "step-0000002", tmp_path / "elsewhere")  # a complete checkpoint
    pointer = run_dir / "latest"
    if damage == "missing":
        pointer.unlink()
    elif damage == "empty":
        pointer.write_text("")
    elif damage == "binary":
        pointer.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "outside":
        pointer.write_text("../elsewhere\n")
    elif damage == "absolute":
        pointer.write_text(f"{elsewhere}\n")
    elif damage == "no such folder":
        pointer.write_text("step-0000009\n")
    elif damage == "incomplete":
        break_trainer_json(run_dir / "step-0000004")
    elif damage == "behind":  # stopped between renaming step-0000004 and updating latest
        pointer.write_text("step-0000002\n")
    assert short_run(run_dir, 6) == list(range(resumed_from + 1, 7))
    err = [line for line in capsys.readouterr().err.splitlines() if "resuming from" in line]
    assert len(err) == 1 and str(run_dir / f"step-{resumed_from:07d}") in err[0], err
    assert pointer.read_text().strip() == "step-0000006"


def test_no_complete_checkpoint_is_an_error(run_dir, tmp_path, capsys):
    """A damaged ``latest`` with no checkpoint to fall back on, or step folders that are all incomplete, stop the
    run with an error naming them, instead of a silent start from step 0."""
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "latest").write_text("???\n")
    with pytest.raises(RunDirError, match="latest names '\\?\\?\\?'"):
        short_run(garbage, 2)
    from fastface.train import main

    assert main([*CLI, "--steps", "2", "--out", str(garbage)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latest" in err[0], err
    assert contents(garbage) == ["latest"], "nothing was trained or written"

    (run_dir / "latest").unlink()
    break_trainer_json(run_dir / "step-0000002")
    (run_dir / "step-0000004" / "model.safetensors").unlink()
    with pytest.raises(RunDirError, match="step-0000002: trainer.json.*step-0000004: missing model.safetensors"):
        short_run(run_dir, 6)
    (run_dir / "latest").write_text("step-0000004\n")
    with pytest.raises(RunDirError, match="latest names step-0000004, which is incomplete.*step-0000002"):
        short_run(run_dir, 6)


def test_stale_temporaries_are_removed(run_dir):
    """Temporaries of writers that no longer run (and of this process) go at the start; a live writer's stay."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = [f".step-0000006.tmp-{dead.pid}", f".step-0000008.tmp-{os.getpid()}"]
    for name in stale:
        (run_dir / name).mkdir()
        (run_dir / name / "model.safetensors").write_bytes(b"\0" * 10)
    stale.append(f".latest.tmp-{dead.pid}-0123abcd")
    (run_dir / stale[-1]).write_text("step-0000006\n")
    live = f".step-0000006.tmp-{os.getppid()}"
    (run_dir / live).mkdir()
    (run_dir / ".notes").write_text("mine\n")
    assert short_run(run_dir, 6) == [5, 6]
    assert contents(run_dir) == [".notes", live, "latest", "step-0000004", "step-0000006"]


def test_a_failed_write_leaves_the_earlier_checkpoints(run_dir, monkeypatch):
    """A checkpoint write that fails (a full disk) removes its temporary folder and leaves ``latest`` and the
    earlier checkpoints as they were; the next run resumes from them."""
    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(RunDirError, match="cannot write checkpoint step-0000006 .*No space left on device"):
        short_run(run_dir, 6)
    assert contents(run_dir) == ["latest", "step-0000002", "step-0000004"]
    assert (run_dir / "latest").read_text().strip() == "step-0000004"
    assert checkpoint_problem(run_dir / "step-0000002") is None and checkpoint_problem(run_dir / "step-0000004") is None
    monkeypatch.undo()
    assert short_run(run_dir, 6) == [5, 6]


@pytest.mark.parametrize("entry", ["python -m fastface.train", "fastface train"])
def test_cli_failed_write_is_one_line(tmp_path, monkeypatch, capsys, entry):
    from fastface import cli, train

    monkeypatch.delenv("FASTFACE_DEBUG", raising=False)
    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    argv = [*CLI, "--steps", "2", "--save-every", "1", "--out", str(tmp_path / "run")]
    status = train.main(argv) if entry == "python -m fastface.train" else cli.main(["train", *argv])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fastface train: error: cannot write checkpoint step-0000001"), err
    assert "No space left on device" in err.strip().splitlines()[-1]
    assert contents(tmp_path / "run") == []


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "must be > 0"), ("--steps", "-5", "must be > 0"), ("--save-every", "0", "must be > 0"),
    ("--mmu-fraction", "2", "must lie in [0, 1]"), ("--mmu-fraction", "nan", "must be finite"),
    ("--out", "{file}", "is a file"), ("--out", "{file}/run", "lies under the file"),
    ("--batch-size", "0", "must be > 0"), ("--faces", "-1", "must be > 0"), ("--lr", "-0.001", "must be >= 0"),
    ("--lr", "inf", "must be finite"), ("--warmup", "-1", "must be >= 0"), ("--qa-per-example", "0", "must be > 0"),
    ("--caption-rate", "1.5", "must lie in [0, 1]"), ("--seed", "-3", "must be >= 0"),
    ("--max-minutes", "0", "must be > 0"), ("--threads", "0", "must be > 0"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, option, value, message):
    from fastface.train import main

    file = tmp_path / "file"
    file.write_text("not a directory\n")
    argv = [*CLI, "--steps", "1", "--out", str(tmp_path / "run"), option, value.format(file=file)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"error: argument {option}: " in err.strip().splitlines()[-1] and message in err, err
    assert not (tmp_path / "run").exists()


def test_train_settings_are_checked():
    for bad in ({"steps": 0}, {"save_every": 0}, {"batch_size": -1}, {"mmu_fraction": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainSettings(**bad)
