"""Faceptor (the perception generalist): model contract, losses and metrics against hand-computed values, training
resume, the Perceptor API and its bad-input errors, the CLI, and the shipped weights on fresh held-out faces."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastface.data.renderer import LANDMARKS, PARSING_CLASSES
from fastface.perception.faceptor import TASKS, Faceptor, FaceptorConfig, soft_argmax
from fastface.perception.faceptor_train import (
    FaceptorTrainSettings,
    evaluate,
    export_run,
    held_out_pairs,
    landmark_loss,
    landmark_nme,
    mirror_permutation,
    parsing_iou,
    parsing_loss,
    sparse_labels,
    splat,
    train_faceptor,
    verification,
)
from fastface.perception.model import IGNORE
from fastface.perception.perceptor import DEFAULT_PATH, Perceptor, load_perception
from fastface.perception.train import identity_pairs


@pytest.fixture(scope="module")
def pairs():
    return identity_pairs(12, seed=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Faceptor.from_name("tiny").eval()


# ------------------------------------------------------------------------------------------ config, model

@pytest.mark.parametrize("field,value", [("channels", (8, 8)), ("depth", (1, 0, 1)), ("dim", 0), ("heads", 3),
                                         ("memory_grid", 3), ("verify_threshold", 2.0), ("landmarks", ()),
                                         ("num_values", (3,)), ("image_size", 60)])
def test_config_rejects_bad_fields(field, value):
    kw = {"dim": 16, "heads": 2} if field != "dim" else {}
    with pytest.raises(ValueError):
        FaceptorConfig(**{**kw, field: value})


def test_config_round_trip_and_unknown_field():
    cfg = FaceptorConfig(dim=32, heads=4)
    assert FaceptorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown FaceptorConfig field"):
        FaceptorConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_shapes_and_task_subsets(tiny, pairs, batch):
    x = tiny.to_input(torch.from_numpy(pairs["images"][:batch]))
    out = tiny(x)
    cfg = tiny.config
    assert out["parsing"].shape == (batch, len(PARSING_CLASSES), 64, 64)
    assert out["heatmaps"].shape == (batch, len(LANDMARKS), 64, 64) and out["landmarks"].shape == (batch, 5, 2)
    assert [a.shape for a in out["attributes"]] == [(batch, n) for n in cfg.num_values]
    assert out["identity"].shape == (batch, cfg.id_dim)
    torch.testing.assert_close(out["identity"].norm(dim=1), torch.ones(batch))
    only = tiny(x, tasks=("identity",))
    assert set(only) == {"identity"}
    torch.testing.assert_close(only["identity"], out["identity"])  # a task's output does not depend on the others
    with pytest.raises(ValueError, match="unknown Faceptor task"):
        tiny(x, tasks=("age",))


def test_batch_independent(tiny, pairs):
    x = tiny.to_input(torch.from_numpy(pairs["images"][:4]))
    full, one = tiny(x), tiny(x[2:3])
    for key in ("parsing", "landmarks", "identity"):
        torch.testing.assert_close(full[key][2:3], one[key], atol=1e-5, rtol=1e-4)


def test_layer_attention_is_a_distribution_and_learns(tiny, pairs):
    w = tiny.layer_weights()
    assert set(w) == {*TASKS, "pixel"}
    for v in w.values():
        assert v.shape == (tiny.config.n_layers,) and float(v.detach().sum()) == pytest.approx(1.0)
    model = Faceptor.from_name("tiny").train()
    out = model(model.to_input(torch.from_numpy(pairs["images"][:4])), tasks=("identity",))
    out["identity"].sum().backward()
    g = model.layer_attention.grad
    assert g[TASKS.index("identity")].abs().sum() > 0 and g[TASKS.index("parsing")].abs().sum() == 0


def test_soft_argmax_matches_explicit_expectation():
    S = 7
    grid = torch.stack(torch.meshgrid(torch.arange(S.__float__()), torch.arange(S.__float__()), indexing="xy"),
                       -1).view(-1, 2)
    logits = torch.randn(2, 3, S, S)
    got = soft_argmax(logits, grid)
    p = torch.softmax(logits.flatten(2), 2).view(2, 3, S, S)
    for b in range(2):
        for k in range(3):
            ex = sum(float(p[b, k, y, x]) * x for y in range(S) for x in range(S))
            ey = sum(float(p[b, k, y, x]) * y for y in range(S) for x in range(S))
            assert got[b, k].tolist() == pytest.approx([ex, ey], abs=1e-5)
    peaked = torch.full((1, 1, S, S), -1e4)
    peaked[0, 0, 5, 2] = 0  # row 5, column 2 -> (x=2, y=5)
    assert soft_argmax(peaked, grid)[0, 0].tolist() == pytest.approx([2.0, 5.0])


def test_splat_mean_is_the_point_and_loss_minimum():
    pts = torch.tensor([[[3.25, 4.5], [0.0, 6.0], [6.0, 0.7]]])
    w = splat(pts, 7)
    torch.testing.assert_close(w.sum(2), torch.ones(1, 3))
    S = 7
    grid = torch.stack(torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="xy"), -1).view(-1, 2)
    torch.testing.assert_close(w @ grid, pts)
    # the heatmap term is smallest at log(splat), and the L1 term is zero at the truth
    logits = torch.log(w.clamp_min(1e-12)).view(1, 3, S, S)
    best = landmark_loss(pts, logits, pts)
    worse = landmark_loss(pts, logits + 0.5 * torch.randn_like(logits), pts)
    assert float(best) < float(worse)


def test_mirror_permutation_swaps_sides():
    perm = mirror_permutation(LANDMARKS)
    assert [LANDMARKS[i] for i in perm] == ["right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left"]


def test_parsing_loss_prefers_the_truth():
    target = torch.randint(0, 4, (2, 5, 5))
    good = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 10
    assert float(parsing_loss(good, target)) < float(parsing_loss(torch.zeros_like(good), target))


# ------------------------------------------------------------------------------------------ metrics

def test_parsing_iou_by_hand():
    pred = np.array([[0, 1], [1, 2]])
    target = np.array([[0, 1], [2, 2]])
    iou = parsing_iou(pred, target, 4)
    assert iou[0] == 1.0 and iou[1] == pytest.approx(1 / 2) and iou[2] == pytest.approx(1 / 2) and np.isnan(iou[3])


def test_landmark_nme_by_hand():
    target = np.array([[[0, 0], [10, 0], [5, 5], [2, 8], [8, 8]]], dtype=np.float32)
    pred = target.copy()
    pred[0, 2] += (3, 4)  # one point 5 px off: mean error 1 px over 5 points, inter-ocular 10 px
    assert landmark_nme(pred, target, LANDMARKS) == pytest.approx(0.1)


def test_verification_threshold_and_tar():
    rng = np.random.default_rng(0)
    identity = np.repeat(np.arange(50), 2)
    base = rng.standard_normal((50, 16))
    e = np.repeat(base, 2, axis=0) + 0.05 * rng.standard_normal((100, 16))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    v = verification(e, identity)
    assert v["genuine_pairs"] == 50 and v["impostor_pairs"] == 100 * 99 // 2 - 50
    assert v["tar"] == 1.0 and v["genuine_mean"] > 0.9
    shuffled = verification(e, rng.permutation(identity))  # labels that mean nothing: TAR near the FAR
    assert shuffled["tar"] < 0.2
    with pytest.raises(ValueError):
        verification(e[:2], np.array([0, 1]))


# ------------------------------------------------------------------------------------------ training

def test_sparse_labels():
    labels = np.zeros((2000, 20), np.int64)
    out = sparse_labels(labels, {"age": 0.05}, seed=0)
    kept = (out[:, 1] != IGNORE).mean()
    assert 0.03 < kept < 0.07 and (out[:, 0] == 0).all()
    assert np.array_equal(out, sparse_labels(labels, {"age": 0.05}, seed=0))  # a fixed subset
    alone = sparse_labels(labels, {"age": 0.05}, seed=0, keep_attributes=("age",))
    assert (alone[:, 0] == IGNORE).all() and np.array_equal(alone[:, 1], out[:, 1])
    with pytest.raises(ValueError):
        FaceptorTrainSettings(label_fraction={"age": 0.0})
    with pytest.raises(ValueError):
        FaceptorTrainSettings(tasks=("parsing", "ears"))


def test_training_resumes_exactly(tmp_path, pairs):
    data = {k: pairs[k] for k in ("images", "parsing", "landmarks", "labels", "identity")}
    settings = FaceptorTrainSettings(preset="tiny", steps=4, batch_size=8, save_every=2, log_every=0, warmup=1)
    quiet = dict(data=data, log=lambda *_: None)
    straight = train_faceptor(settings, tmp_path / "a", **quiet)
    train_faceptor(settings, tmp_path / "b", stop_at=2, **quiet)  # interrupted after two steps
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 2
    resumed = train_faceptor(settings, tmp_path / "b", **quiet)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    for (k, u), v in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(u, v, atol=0, rtol=0, msg=k)
    with pytest.raises(ValueError, match="other settings"):
        train_faceptor(FaceptorTrainSettings(**{**settings.__dict__, "lr": 1e-3}), tmp_path / "b", **quiet)


def test_evaluate_and_export(tmp_path, pairs):
    data = {k: pairs[k] for k in ("images", "parsing", "landmarks", "labels", "identity")}
    run = tmp_path / "run"
    train_faceptor(FaceptorTrainSettings(preset="tiny", steps=2, batch_size=8, log_every=0), run, data=data,
                   log=lambda *_: None)
    held = held_out_pairs(8)
    metrics = evaluate(Faceptor.from_name("tiny"), held)
    assert metrics["faces"] == 8 and 0 <= metrics["parsing_miou"] <= 1 and metrics["landmark_nme"] > 0
    assert set(metrics["attribute_accuracy"]) == set(FaceptorConfig().attributes)
    assert int(held["identity"].min()) >= 90_000  # held-out people only
    perceptor = export_run(run, tmp_path / "f.safetensors", faces=8, log=lambda *_: None)
    loaded = Perceptor.load(tmp_path / "f.safetensors")
    assert loaded.threshold == perceptor.threshold and "parsing_miou" in loaded.config.metrics
    a, b = perceptor.run(held["images"]), loaded.run(held["images"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ Perceptor API

@pytest.fixture(scope="module")
def perceptor(tiny):
    return Perceptor(tiny)


def test_perceive_outputs(perceptor, pairs):
    faces = perceptor.perceive(pairs["images"][:3])
    assert len(faces) == 3
    f = faces[0]
    assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
    assert f.parsing.shape == (64, 64) and f.parsing.dtype == np.uint8 and f.parsing.max() < len(PARSING_CLASSES)
    assert f.age in ("young", "middle-aged", "old") and f.expression in ("smiling", "neutral", "open", "frowning")
    assert f.attributes["age"] == f.age and len(f.attributes) == 20
    assert f.identity.shape == (perceptor.config.id_dim,) and abs(float(np.linalg.norm(f.identity)) - 1) < 1e-5
    json.dumps(f.to_dict(perceptor.landmark_names))
    # the same face alone, as a PIL image, and in a batch
    alone = perceptor.perceive([Image.fromarray(pairs["images"][1])])[0]
    assert np.array_equal(alone.parsing, faces[1].parsing) and alone.attributes == faces[1].attributes
    np.testing.assert_allclose(alone.landmarks, faces[1].landmarks, atol=1e-4)


def test_verify(perceptor, pairs):
    img = pairs["images"][0]
    v = perceptor.verify(img, img)
    assert v.score == pytest.approx(1.0, abs=1e-5) and v.same
    many = perceptor.verify(pairs["images"][:4], pairs["images"][4:8])
    assert len(many) == 4 and all(-1 <= r.score <= 1 for r in many)
    assert perceptor.verify(img, img, threshold=1.5).same is False
    with pytest.raises(ValueError, match="faces"):
        perceptor.verify(pairs["images"][:2], pairs["images"][:3])


@pytest.mark.parametrize("bad,err,match", [
    ([], ValueError, "empty"),
    (np.zeros((0, 64, 64, 3), np.uint8), ValueError, "empty"),
    (np.zeros((2, 32, 32, 3), np.uint8), ValueError, "shape"),
    ([np.zeros((64, 64), np.uint8)], ValueError, "grayscale"),
    ([np.zeros((64, 64, 1), np.uint8)], ValueError, "grayscale"),
    ([Image.new("L", (64, 64))], ValueError, "'L'"),
    ([np.zeros((48, 64, 3), np.uint8)], ValueError, "64x48"),
    (np.zeros((1, 64, 64, 3), np.float32), TypeError, "uint8"),
    (np.zeros((64, 64, 3), np.uint8), ValueError, "batch"),
    ("face.png", TypeError, "images must be"),
    (["face.png"], TypeError, "must be an image"),
])
def test_bad_input(perceptor, bad, err, match):
    with pytest.raises(err, match=match):
        perceptor.perceive(bad)


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Faceptor weights"):
        load_perception(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError):
        load_perception(junk)
    with pytest.raises(ValueError, match="dtype"):
        Perceptor(Faceptor.from_name("tiny"), dtype=torch.float16)


def test_bfloat16_runs_close_to_float32(tiny, pairs):
    a = Perceptor(tiny).run(pairs["images"][:4])
    b = Perceptor(tiny, dtype=torch.bfloat16).run(pairs["images"][:4])
    assert (a["parsing"] == b["parsing"]).float().mean() > 0.9
    torch.testing.assert_close(a["identity"], b["identity"], atol=0.05, rtol=0)


# ------------------------------------------------------------------------------------------ CLI

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastface.cli", "perceive", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("faceptor") / "tiny.safetensors"
    Perceptor(tiny).save(path)
    return path


def test_cli_json_and_overlay(tmp_path, pairs, tiny_file):
    paths = []
    for i in range(2):
        p = tmp_path / f"face{i}.png"
        Image.fromarray(pairs["images"][i]).save(p)
        paths.append(str(p))
    r = _cli(*paths, "--model", str(tiny_file), "--json", "--overlay", str(tmp_path / "ov.png"))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout[: r.stdout.rindex("]") + 1])
    assert [row["image"] for row in rows] == paths and set(rows[0]["landmarks"]) == set(LANDMARKS)
    assert sum(rows[0]["parsing_pixels"].values()) == 64 * 64
    for i in range(2):
        assert Image.open(tmp_path / f"ov-{i}.png").size == (512, 256)  # the face and its overlay, 4x


def test_cli_errors_without_traceback(tmp_path, tiny_file):
    Image.new("L", (64, 64)).save(tmp_path / "gray.png")
    Image.new("RGB", (50, 64)).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("hello")
    for name, match in (("gray.png", "'L'"), ("small.png", "50x64"), ("text.png", "not an image"),
                        ("none.png", "no such file")):
        r = _cli(str(tmp_path / name), "--model", str(tiny_file))
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    r = _cli(str(tmp_path / "ok.png"), "--model", str(tiny_file), "--overlay", str(tmp_path / "nodir" / "o.png"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ shipped weights

shipped = pytest.mark.skipif(not DEFAULT_PATH.is_file(), reason="no shipped Faceptor weights")


@shipped
def test_shipped_model_on_fresh_held_out_faces():
    """The shipped model on 200 held-out faces it was not exported on (another seed): near its model card."""
    perceptor = load_perception()
    card = perceptor.config.metrics
    m = evaluate(perceptor.model, held_out_pairs(200, seed=31_337))
    assert m["landmark_nme"] <= card["landmark_nme"] + 0.01
    assert m["parsing_miou"] >= card["parsing_miou"] - 0.03
    assert m["attribute_mean"] >= card["attribute_mean"] - 0.02
    assert m["verification"]["tar"] >= card["verification"]["tar"] - 0.05


# ------------------------------------------------------------------------------------------ the judge

def test_judge_takes_each_attribute_from_its_source(perceptor, pairs):
    from fastface.data.attributes import ATTRIBUTES
    from fastface.perception.judge import Judge
    from fastface.perception.model import AttributeClassifier

    torch.manual_seed(1)
    clf = AttributeClassifier.from_name("tiny").eval()
    images = pairs["images"][:6]
    theirs = clf.predict_labels(images)
    mine = perceptor.run(images, tasks=("attributes",))["attributes"].numpy()
    judge = Judge(clf, perceptor, ("age", "expression"))
    got = judge.predict_labels(images)
    names = list(ATTRIBUTES)
    for k, name in enumerate(names):
        expected = mine[:, k] if name in ("age", "expression") else theirs[:, k]
        assert np.array_equal(got[:, k], expected), name
    assert judge.sources["age"] == "faceptor" and judge.sources["gender"] == "classifier"
    assert np.array_equal(Judge(clf).predict_labels(images), theirs)
    with pytest.raises(ValueError, match="unknown attribute"):
        Judge(clf, perceptor, ("ears",))
    with pytest.raises(ValueError, match="without a perceptor"):
        Judge(clf, None, ("age",))


def test_inference_copy_matches_the_model(pairs):
    """Perceptor runs a BatchNorm-folded channels-last copy: the same outputs as the model itself."""
    from fastface.perception.faceptor import fused_for_inference

    torch.manual_seed(2)
    model = Faceptor.from_name("tiny").eval()
    for mod in model.modules():  # running statistics far from the identity, so the folding matters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.3)
            mod.running_var.uniform_(0.3, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.2)
    x = model.to_input(torch.from_numpy(pairs["images"][:5]))
    fast = fused_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    with torch.no_grad():
        ref, got = model(x), fast(x.contiguous(memory_format=torch.channels_last))
    for key in ("parsing", "heatmaps", "landmarks", "identity"):
        torch.testing.assert_close(got[key], ref[key], atol=2e-4, rtol=1e-4, msg=key)
    for u, v in zip(got["attributes"], ref["attributes"]):
        torch.testing.assert_close(u, v, atol=2e-4, rtol=1e-4)


@shipped
def test_shipped_judge_uses_the_faceptor_where_its_card_says():
    from fastface.perception.judge import Judge

    judge = Judge.default()
    card = judge.perceptor.config.metrics
    for name, source in judge.sources.items():
        assert source == ("faceptor" if name in card["judge_attributes"] else "classifier")
        if source == "faceptor":  # chosen only where it is at least as accurate on the same faces
            assert card["attribute_accuracy"][name] >= card["classifier_attribute_accuracy"][name]


def test_training_with_batches_without_labels(tmp_path, pairs):
    """One attribute, labels on few faces: batches that hold none still train (the others' heads see nothing)."""
    data = {k: pairs[k] for k in ("images", "parsing", "landmarks", "labels", "identity")}
    settings = FaceptorTrainSettings(preset="tiny", steps=3, batch_size=4, log_every=0, tasks=("attributes",),
                                     train_attributes=("age",), label_fraction={"age": 0.05})
    model = train_faceptor(settings, tmp_path / "run", data=data, log=lambda *_: None)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
