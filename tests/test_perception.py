"""Attribute classifier: shapes, valid predictions, training lowers the loss, bit-exact save/load, input checks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastface.data.attributes import ATTRIBUTES
from fastface.data.dataset import make_dataset
from fastface.perception import IGNORE, AttributeClassifier, PerceptionConfig
from fastface.perception.train import (
    accuracy_table,
    attribute_loss,
    attribute_losses,
    augment,
    balanced_weights,
    identity_loss,
    identity_pairs,
    mean_accuracy,
    train_classifier,
    visible_labels,
)


def tiny(seed=0):
    torch.manual_seed(seed)
    return AttributeClassifier.from_name("tiny").eval()


@pytest.fixture(scope="module")
def pairs():
    return identity_pairs(8, seed=1)


def test_config_defaults_and_validation():
    cfg = PerceptionConfig()
    assert cfg.sem_dim == 64 and cfg.id_dim == 64 and cfg.grid == 4
    assert cfg.attributes == tuple(ATTRIBUTES) and cfg.num_values == tuple(len(v) for v in ATTRIBUTES.values())
    assert PerceptionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        PerceptionConfig.from_dict({"colours": 3})
    with pytest.raises(ValueError, match="divisible"):
        PerceptionConfig(image_size=60)
    with pytest.raises(ValueError, match="sem_dim"):
        PerceptionConfig(sem_dim=0)
    with pytest.raises(ValueError, match="preset"):
        AttributeClassifier.from_name("huge")


def test_default_model_is_small():
    n = sum(p.numel() for p in AttributeClassifier().parameters())
    assert 4 * n < 3e6, f"{n} parameters do not fit a 3 MB float32 file"


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(batch, pairs):
    clf = tiny()
    images = pairs["images"][:batch]
    x = clf.to_input(torch.from_numpy(images))
    logits, e_id = clf(x)
    assert [tuple(lg.shape) for lg in logits] == [(batch, len(v)) for v in ATTRIBUTES.values()]
    assert e_id.shape == (batch, 8)
    e_sem, e_id2 = clf.embed(images)
    assert e_sem.shape == (batch, 16) and e_id2.shape == (batch, 8)
    torch.testing.assert_close(e_sem.norm(dim=1), torch.ones(batch))
    torch.testing.assert_close(e_id2.norm(dim=1), torch.ones(batch))
    torch.testing.assert_close(e_id2, e_id)
    labels = clf.predict_labels(images)
    assert labels.shape == (batch, len(ATTRIBUTES)) and labels.dtype == np.int64
    probs = clf.predict_proba(images)
    for p in probs:
        torch.testing.assert_close(p.sum(1), torch.ones(batch))


def test_predict_returns_valid_values(pairs):
    clf = tiny()
    out = clf.predict(pairs["images"][:5])
    assert list(out) == list(ATTRIBUTES)
    for name, values in out.items():
        assert len(values) == 5 and all(v in ATTRIBUTES[name] for v in values)
    # one row's prediction does not depend on the rest of the batch (eval-mode BatchNorm)
    assert clf.predict_labels(pairs["images"][:1]).tolist() == clf.predict_labels(pairs["images"][:5])[:1].tolist()
    # a list of PIL images (any size) is accepted
    pil = [Image.fromarray(img).resize((128, 128)) for img in pairs["images"][:2]]
    assert clf.predict_labels(pil).shape == (2, len(ATTRIBUTES))


def test_bad_inputs_raise_clear_errors(tmp_path):
    clf = tiny()
    with pytest.raises(TypeError, match="uint8"):
        clf.predict(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        clf.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        clf.predict(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(TypeError, match="images must be"):
        clf.predict("face.png")
    with pytest.raises(ValueError, match="empty"):
        clf.predict([])
    with pytest.raises(FileNotFoundError, match="train one"):
        AttributeClassifier.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        AttributeClassifier.load(tmp_path / "junk.safetensors")


def test_training_steps_lower_the_loss(pairs):
    torch.manual_seed(0)
    clf = AttributeClassifier.from_name("tiny").train()
    x = clf.to_input(torch.from_numpy(pairs["images"]))
    y = torch.from_numpy(pairs["labels"])
    ident = torch.from_numpy(pairs["identity"])
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits, e_id = clf(x)
        loss = attribute_loss(logits, y) + 0.2 * identity_loss(e_id, ident, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_train_entry_point_and_bit_exact_round_trip(tmp_path, pairs):
    held = make_dataset(6, seed=10_001, captions=False)
    cfg = PerceptionConfig(channels=(4, 8, 8), sem_dim=16, id_dim=8, id_hidden=16)
    out = tmp_path / "perception.safetensors"
    model, metrics = train_classifier(cfg, steps=4, batch_size=8, train_data=pairs, eval_data=held, out=out,
                                      threads=None, log=lambda *_: None)
    assert metrics["steps"] == 4 and 0 <= metrics["held_out_mean_accuracy"] <= 1
    assert set(metrics["held_out_accuracy"]) == set(ATTRIBUTES)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["sem_dim"] == 16
    loaded = AttributeClassifier.load(out)
    assert loaded.config == model.config and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert np.array_equal(model.predict_labels(held["images"]), loaded.predict_labels(held["images"]))
    for u, v in zip(model.embed(held["images"]), loaded.embed(held["images"])):
        assert torch.equal(u, v)
    # a file whose tensors do not match its config is refused
    other = AttributeClassifier(PerceptionConfig(channels=(4, 8, 8), sem_dim=32, id_dim=8, id_hidden=16))
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(bad),
              metadata={"fastface_perception_config": json.dumps(cfg.to_dict())})
    with pytest.raises(ValueError, match="expected"):
        AttributeClassifier.load(bad)


def test_identity_pairs_share_identity_and_hide_eyes_behind_sunglasses(pairs):
    assert pairs["images"].shape == (16, 64, 64, 3) and pairs["labels"].shape == (16, len(ATTRIBUTES))
    names = list(ATTRIBUTES)
    for k in range(8):
        a, b = pairs["attrs"][2 * k], pairs["attrs"][2 * k + 1]
        assert a.identity == b.identity and a.gender == b.gender and a.eye_colour == b.eye_colour
    again = identity_pairs(8, seed=1)
    assert np.array_equal(again["images"], pairs["images"])
    labels = visible_labels(pairs["attrs"])
    for a, row in zip(pairs["attrs"], labels):
        eye = row[names.index("eye_colour")]
        assert (eye == IGNORE) == (a.glasses == "sunglasses")
        assert row[names.index("gender")] == ATTRIBUTES["gender"].index(a.gender)


def test_identity_loss_prefers_matching_embeddings():
    ident = torch.tensor([0, 0, 1, 1, 2, 2])
    base = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    good = base[ident]
    bad = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    assert identity_loss(good, ident, 0.1) < identity_loss(bad, ident, 0.1)
    assert float(identity_loss(good, torch.arange(6), 0.1)) == 0.0  # no positives: nothing to learn


def test_augment_keeps_range_and_shape():
    x = torch.rand(4, 3, 64, 64)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    same = augment(x, torch.Generator().manual_seed(0), shift=0, flip=False, jitter=0, noise=0)
    assert torch.equal(same, x)


def test_accuracy_table_scoring():
    labels = np.array([[0, 1], [1, IGNORE], [2, 0]])
    pred = np.array([[0, 1], [0, 1], [2, 1]])
    table = accuracy_table(pred, labels, names=["a", "b"])
    assert table["a"] == {"accuracy": pytest.approx(2 / 3), "count": 3}
    assert table["b"] == {"accuracy": 0.5, "count": 2}
    assert mean_accuracy(table) == pytest.approx((2 / 3 + 0.5) / 2)
    assert accuracy_table(labels.clip(0), labels, names=["a", "b"])["b"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="must both be"):
        accuracy_table(pred[:, :1], labels, names=["a", "b"])


def test_attribute_loss_weights_and_ignored_heads():
    gen = torch.Generator().manual_seed(3)
    logits = [torch.randn(5, 3, generator=gen), torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)]
    y = torch.tensor([[0, 1, IGNORE], [2, 3, IGNORE], [1, 0, IGNORE], [0, IGNORE, IGNORE], [2, 2, IGNORE]])
    per = attribute_losses(logits, y)
    ce0 = torch.nn.functional.cross_entropy(logits[0], y[:, 0])
    ce1 = torch.nn.functional.cross_entropy(logits[1][[0, 1, 2, 4]], y[[0, 1, 2, 4], 1])
    assert torch.allclose(per[:2], torch.stack([ce0, ce1])) and torch.isnan(per[2])
    assert torch.allclose(attribute_loss(logits, y), (ce0 + ce1) / 2)  # a head with no labels drops out
    w = torch.tensor([3.0, 0.5, 100.0])
    assert torch.allclose(attribute_loss(logits, y, w), (3 * ce0 + 0.5 * ce1) / 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        attribute_loss(logits, y, torch.ones(2))
    with pytest.raises(ValueError, match="every label"):
        attribute_loss(logits, torch.full_like(y, IGNORE))


def test_balanced_weights_favour_unlearned_heads():
    running = torch.tensor([1.1, 0.05, 0.05, 0.2])
    w = balanced_weights(running)
    assert w.mean() == pytest.approx(1.0) and w.argmax() == 0 and w[1] == w[2] < w[3]
    assert torch.allclose(w / w[3], running / running[3])  # proportional below the cap
    capped = balanced_weights(torch.tensor([3.0] + [0.01] * 19), cap=5.0)  # uncapped: 18.9
    assert float(capped.max()) == 5.0
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([-1.0, 1.0]), torch.ones(2, 2)):
        with pytest.raises(ValueError, match="running losses"):
            balanced_weights(bad)


def test_shared_feature_is_linear_and_old_files_keep_their_relu(pairs):
    clf = tiny()
    h = clf.features(clf.to_input(torch.from_numpy(pairs["images"])))
    assert clf.config.feature_activation == "none" and bool((h < 0).any())
    old = PerceptionConfig.from_dict({k: v for k, v in PerceptionConfig().to_dict().items()
                                      if k != "feature_activation"})
    assert old.feature_activation == "relu"
    legacy = AttributeClassifier(PerceptionConfig(channels=(4, 8, 8), sem_dim=16, id_dim=8, id_hidden=16,
                                                  feature_activation="relu")).eval()
    assert bool((legacy.features(legacy.to_input(torch.from_numpy(pairs["images"]))) >= 0).all())
    with pytest.raises(ValueError, match="feature_activation"):
        PerceptionConfig(feature_activation="gelu")
