"""fastface eval: the scoring logic on hand-made cases, and every part end to end on a tiny random model."""

import argparse
import json

import numpy as np
import pytest
import torch

from fastface.data.attributes import ATTRIBUTES
from fastface.data.dataset import make_dataset
from fastface.data.text import parse_caption, split_words
from fastface.evaluate import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    add_arguments,
    attribute_prompts,
    evaluate,
    evaluate_generation,
    image_psnr,
    main,
    markdown_report,
    normalize_answer,
    score_generation,
    score_vqa,
    vqa_questions,
)
from fastface.perception import IGNORE, AttributeClassifier

NAMES = list(ATTRIBUTES)


@pytest.fixture(scope="module")
def faces():
    return make_dataset(4, seed=10_003, captions=False)


def tiny_vq():
    """A random VQ tokenizer matching the tiny transformer: 4x4 = 16 tokens, codebook 64."""
    from fastface.vq import VQConfig, VQModel

    torch.manual_seed(0)
    return VQModel(VQConfig(channels=(4, 4, 4, 4, 8), enc_blocks=(0, 0, 0, 0, 0), dec_blocks=(0, 0, 0, 0, 0),
                            codebook_size=64, code_dim=8)).eval()


@pytest.fixture
def tiny_pipe(tiny_checkpoint):
    from fastface.checkpoint import load_checkpoint
    from fastface.pipeline import Pipeline

    model, tokenizer, _, _ = load_checkpoint(tiny_checkpoint)
    return Pipeline(model, tokenizer, tiny_vq(), backend="reference")


def test_defaults_follow_the_pipeline():
    import inspect

    from fastface.pipeline import Pipeline

    params = inspect.signature(Pipeline.generate).parameters
    assert (DEFAULT_STEPS, DEFAULT_GUIDANCE) == (params["steps"].default, params["guidance"].default)


def test_normalize_answer():
    assert normalize_answer(" Middle - Aged. ") == "middle-aged"
    assert normalize_answer("buzz  cut") == "buzz cut"
    assert normalize_answer("YES?") == "yes"


def test_score_vqa_ground_truth_and_hand_made(faces):
    records = vqa_questions(faces["attrs"], per_face=5, seed=1)
    assert len(records) == 20 and all(0 <= r["face"] < 4 for r in records)
    perfect = score_vqa(records, [r["answer"] for r in records])
    assert perfect["mean"] == 1.0 and perfect["overall"] == 1.0 and perfect["count"] == 20
    for row in perfect["per_attribute"].values():
        assert row["accuracy"] in (1.0, None) and (row["accuracy"] is None) == (row["count"] == 0)
    hand = [{"attribute": "age", "answer": "old", "kind": "open"},
            {"attribute": "age", "answer": "yes", "kind": "yes/no"},
            {"attribute": "hat", "answer": "top hat", "kind": "open"}]
    out = score_vqa(hand, ["Old", "no", "top hat"])
    assert out["per_attribute"]["age"] == {"accuracy": 0.5, "count": 2}
    assert out["per_attribute"]["hat"] == {"accuracy": 1.0, "count": 1}
    assert out["mean"] == 0.75 and out["overall"] == pytest.approx(2 / 3)
    assert out["by_kind"] == {"open": {"accuracy": 1.0, "count": 2}, "yes/no": {"accuracy": 0.0, "count": 1}}
    with pytest.raises(ValueError, match="predictions"):
        score_vqa(hand, ["old"])


def test_attribute_prompts_name_what_they_score(faces):
    prompts, labels = attribute_prompts(faces["attrs"], per_prompt=5, seed=0, max_words=40)
    assert len(prompts) == 4 and labels.shape == (4, len(NAMES))
    for text, row, attrs in zip(prompts, labels, faces["attrs"]):
        assert len(split_words(text)) <= 40
        found = parse_caption(text)
        assert row[NAMES.index("gender")] == ATTRIBUTES["gender"].index(attrs.gender)
        for k, name in enumerate(NAMES):
            if row[k] != IGNORE:
                assert found[name] == {getattr(attrs, name)}
                assert ATTRIBUTES[name][row[k]] == getattr(attrs, name)
        assert 1 <= (row != IGNORE).sum() <= 9
    assert (labels != IGNORE).sum() >= 4 * 3  # gender and most named attributes are scored
    again, labels2 = attribute_prompts(faces["attrs"], per_prompt=5, seed=0, max_words=40)
    assert again == prompts and np.array_equal(labels, labels2)
    only, lab = attribute_prompts(faces["attrs"], per_prompt=0)
    assert ((lab != IGNORE).sum(1) == 1).all()  # gender only
    with pytest.raises(ValueError, match="unknown prompt attribute"):
        attribute_prompts(faces["attrs"], names=["tattoo"])


def test_score_generation_ground_truth_and_hand_made():
    labels = np.full((3, len(NAMES)), IGNORE)
    g, a = NAMES.index("gender"), NAMES.index("age")
    labels[:, g] = [0, 1, 1]
    labels[:2, a] = [2, 0]
    perfect = score_generation(labels.clip(0), labels.clip(0), labels)
    assert perfect["mean_generated"] == 1.0 and perfect["mean_real"] == 1.0 and perfect["count"] == 5
    pred = labels.clip(0).copy()
    pred[0, g] = 1  # one gender wrong
    out = score_generation(pred, labels.clip(0), labels)
    assert out["per_attribute"]["gender"] == {"generated": pytest.approx(2 / 3), "real": 1.0, "count": 3}
    assert "reconstructed" not in out["per_attribute"]["age"]
    both = score_generation(pred, labels.clip(0), labels, pred_reconstructed=pred)
    assert both["per_attribute"]["gender"]["reconstructed"] == pytest.approx(2 / 3)
    assert both["mean_reconstructed"] == out["mean_generated"]
    assert out["per_attribute"]["age"] == {"generated": 1.0, "real": 1.0, "count": 2}
    assert out["per_attribute"]["hat"] == {"generated": None, "real": None, "count": 0}
    assert out["mean_generated"] == pytest.approx((2 / 3 + 1) / 2) and out["overall_generated"] == 0.8


def test_image_psnr():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    b[1] = 10  # mse 100 -> 10 log10(255^2 / 100)
    v = image_psnr(a, b)
    assert v[0] == pytest.approx(100.0) and v[1] == pytest.approx(10 * np.log10(255**2 / 100))
    with pytest.raises(ValueError, match="one shape"):
        image_psnr(a, b[:1])


def test_evaluate_end_to_end_on_a_tiny_model(tiny_pipe, faces, tmp_path):
    torch.manual_seed(0)
    clf = AttributeClassifier.from_name("tiny").eval()
    result = evaluate(tiny_pipe, clf, faces=faces, num_faces=4, steps=2, guidance=1.0, questions_per_face=2,
                      per_prompt=3, batch_size=3, save_dir=tmp_path / "gen")
    vqa, gen, psnr = result["vqa"], result["generation"], result["psnr"]
    assert vqa["count"] == 8 and set(vqa["per_attribute"]) == set(ATTRIBUTES)
    assert 0 <= vqa["mean"] <= 1 and sum(r["count"] for r in vqa["per_attribute"].values()) == 8
    assert set(gen["per_attribute"]) == set(ATTRIBUTES) and gen["prompts"] == 4
    assert gen["per_attribute"]["gender"]["count"] == 4 and gen["steps"] == 2
    for row in gen["per_attribute"].values():
        for key in ("generated", "real", "reconstructed"):
            assert row[key] is None or 0 <= row[key] <= 1
    assert len(list((tmp_path / "gen").glob("*.png"))) == 4
    assert psnr["count"] == 4 and np.isfinite(psnr["psnr_db"])
    json.dumps(result)  # JSON-ready
    table = markdown_report(result)
    for name in ATTRIBUTES:
        assert f"| {name} |" in table
    assert "mean over attributes" in table and "PSNR" in table


def test_evaluate_without_image_tokenizer_skips(tiny_checkpoint, faces):
    import fastface

    pipe = fastface.load(tiny_checkpoint, backend="reference")
    result = evaluate(pipe, None, faces=faces, num_faces=4)
    assert all(result[p] == {"skipped": "no image tokenizer"} for p in ("vqa", "generation", "psnr"))
    assert "skipped" in markdown_report(result)
    with pytest.raises(ValueError, match="unknown part"):
        evaluate(pipe, None, faces=faces, parts=["speed"])


def test_cli_writes_json_and_markdown(tiny_checkpoint, tmp_path, capsys):
    from fastface.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer, _, _ = load_checkpoint(tiny_checkpoint)
    ckpt = save_checkpoint(tmp_path / "with_vq", model, tokenizer, tiny_vq())
    torch.manual_seed(0)
    clf_path = AttributeClassifier.from_name("tiny").save(tmp_path / "clf.safetensors")
    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    rc = main(["--model", str(ckpt), "--backend", "reference", "--num-faces", "2", "--steps", "2",
               "--questions-per-face", "1", "--attributes-per-prompt", "2", "--classifier", str(clf_path),
               "--output", str(out), "--markdown", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["faces"] == 2 and result["vqa"]["count"] == 2 and result["generation"]["prompts"] == 2
    assert md.read_text() == capsys.readouterr().out
    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.steps == DEFAULT_STEPS and args.guidance == DEFAULT_GUIDANCE and args.num_faces == 200
    assert main(["--model", str(tmp_path / "nowhere"), "--parts", "psnr"]) == 2


def test_eval_command_exits_cleanly(tiny_checkpoint, tmp_path, capsys):
    """``fastface eval`` end to end through the CLI: table printed, JSON and markdown written, exit status 0."""
    from fastface import cli
    from fastface.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer, _, _ = load_checkpoint(tiny_checkpoint)
    ckpt = save_checkpoint(tmp_path / "with-vq", model, tokenizer, tiny_vq())
    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    status = cli.main(["eval", "--model", str(ckpt), "--backend", "reference", "--num-faces", "2", "--steps", "2",
                       "--parts", "vqa", "psnr", "--questions-per-face", "1", "-o", str(out), "--markdown", str(md)])
    assert status == 0
    result = json.loads(out.read_text())
    assert result["faces"] == 2 and 0.0 <= result["vqa"]["mean"] <= 1.0 and result["psnr"]["psnr_db"] > 0
    assert "mean over attributes" in md.read_text() and "mean over attributes" in capsys.readouterr().out
    assert (result["backend"], result["dtype"], result["weights"]) == ("reference", "float32", "float")
    status = cli.main(["eval", "--model", str(ckpt), "--backend", "reference", "--num-faces", "2", "--steps", "2",
                       "--parts", "vqa", "--questions-per-face", "1", "--weights", "int8", "-o", str(out)])
    assert status == 0 and json.loads(out.read_text())["weights"] == "int8"
    assert "int8 weights" in capsys.readouterr().out


def test_generation_with_confidence_threshold_reports_steps_run(tiny_pipe, faces, capsys):
    clf = AttributeClassifier.from_name("tiny").eval()
    kw = dict(steps=4, guidance=1.0, per_prompt=2, batch_size=2)
    eager = evaluate_generation(tiny_pipe, clf, faces["images"][:4], faces["attrs"][:4], threshold=1e-6, **kw)
    assert eager["threshold"] == 1e-6 and eager["mean_steps_run"] == 1.0  # every sampled token passes at once
    exact = evaluate_generation(tiny_pipe, clf, faces["images"][:4], faces["attrs"][:4], **kw)
    assert exact["threshold"] is None and exact["mean_steps_run"] == 4.0
    assert "threshold 1e-06 (1.0 steps run" in markdown_report({"faces": 4, "seed": 0, "generation": eager})
    assert main(["--threshold", "1.5", "--parts", "generation"]) == 2
    assert "argument --threshold: must lie in (0, 1], got 1.5" in capsys.readouterr().err


# ------------------------------------------------------------------- captions, joint pairs, edits


def test_score_captions_on_truth_and_hand_made(faces):
    from fastface.data.text import caption
    from fastface.eval_directions import caption_labels, score_captions

    attrs = faces["attrs"]
    truth = [caption(a, np.random.default_rng(i), max_tokens=60) for i, a in enumerate(attrs)]
    ok = score_captions(truth, attrs)
    assert ok["overall"] == 1.0 and ok["named_per_caption"] >= 5
    a = attrs[0]
    other = next(c for c in ATTRIBUTES["hair_colour"] if c != a.hair_colour and c != "none")
    wrong = score_captions([f"a {a.gender} with short {other} hair"], attrs[:1])
    assert wrong["per_attribute"]["gender"] == 1.0 and wrong["per_attribute"]["hair_colour"] == 0.0
    assert wrong["named_per_caption"] >= 2
    row = caption_labels("a man with red hair and blonde hair")
    assert row[NAMES.index("hair_colour")] == -2, "two hair colours: a contradiction, scored wrong"
    assert score_captions([""], attrs[:1])["named_per_caption"] == 0


def test_captions_and_pairs_end_to_end_on_a_tiny_model(tiny_pipe, faces):
    torch.manual_seed(0)
    clf = AttributeClassifier.from_name("tiny").eval()
    result = evaluate(tiny_pipe, clf, faces=faces, num_faces=4, steps=2, parts=["captions", "pairs"], batch_size=3)
    runs = result["captions"]["runs"]
    assert set(runs) == {"diffusion-4", "diffusion-8", "diffusion-16", "autoregressive"}
    assert all(r["text_tokens"] >= 4 and r["text_tokens_per_s"] > 0 for r in runs.values())
    assert result["captions"]["oracle"]["overall"] == 1.0
    pairs = result["pairs"]
    assert pairs["pairs"] == 4 and set(pairs["per_attribute"]) == set(ATTRIBUTES)
    json.dumps(result)
    table = markdown_report(result)
    assert "| diffusion-4 |" in table and "Joint samples" in table


def test_edit_part_on_the_embedded_model(faces):
    import fastface

    pipe = fastface.load()
    result = evaluate(pipe, None, faces=faces, num_faces=4, steps=2, parts=["edit"], batch_size=4)
    edit = result["edit"]
    assert edit["outside_region_unchanged"] == 1.0
    assert 0 <= edit["new_colour_shown"] <= 1 and edit["faces"] >= 1
    assert "Hair-colour edits" in markdown_report(result)
