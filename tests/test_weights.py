"""fastface.weights: round trip, every way a weights file can be wrong, the dtype policy, and atomic writes."""

import json
import pickle
import re

import pytest
import torch
from torch import nn

import fastface.weights as weights
from fastface.weights import CONFIG_KEY, CheckpointError, atomic_write, load_weights, save_weights, stored_config


def state(seed=0):
    """Odd shapes, a scalar, an integer buffer and a bool mask: what real state dicts hold."""
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(5, 3, 3, 3, generator=g), "norm.bias": torch.randn(123, generator=g),
            "scale": torch.randn((), generator=g), "bn.num_batches_tracked": torch.tensor(7),
            "mask": torch.rand(1, 13, generator=g) < 0.5}


@pytest.fixture
def saved(tmp_path):
    file = tmp_path / "w.safetensors"
    save_weights(file, state(), config={"name": "tiny", "channels": [5, 7]})
    return file


def meta_like(tensors, **changes):
    out = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    out.update(changes)
    return out


def test_round_trip_bit_exact_with_config_in_metadata(saved):
    got = load_weights(saved, meta_like(state()))
    want = state()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert stored_config(saved) == {"name": "tiny", "channels": [5, 7]}
    assert CONFIG_KEY in weights.read_metadata(saved)


def test_expected_may_be_a_module(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5))
    file = save_weights(tmp_path / "m.safetensors", module.state_dict(), config=None)
    other = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5))
    other.load_state_dict(load_weights(file, other))
    for (k, a), b in zip(module.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert stored_config(file) is None


def test_save_dtype_casts_floating_tensors_only(tmp_path):
    file = save_weights(tmp_path / "b.safetensors", state(), config=None, dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state().items()}
    got = load_weights(file, expected)
    assert got["conv.weight"].dtype == torch.bfloat16
    assert got["bn.num_batches_tracked"].dtype == torch.int64 and got["mask"].dtype == torch.bool


def test_missing_key(saved):
    with pytest.raises(CheckpointError, match=r"w\.safetensors: missing tensor\(s\) extra\.weight"):
        load_weights(saved, meta_like(state(), **{"extra.weight": torch.empty(2)}))


def test_unexpected_key(saved):
    expected = meta_like(state())
    del expected["norm.bias"]
    with pytest.raises(CheckpointError, match=r"w\.safetensors: unexpected tensor\(s\) norm\.bias"):
        load_weights(saved, expected)


def test_missing_and_unexpected_in_one_message(saved):
    expected = meta_like(state(), other=torch.empty(1))
    del expected["scale"]
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) other; unexpected tensor\(s\) scale"):
        load_weights(saved, expected)


@pytest.mark.parametrize("shape", [(5, 3, 3, 2), (3, 5, 3, 3), (135,), (1, 5, 3, 3, 3)])
def test_wrong_shape(saved, shape):
    message = f"w.safetensors: tensor 'conv.weight' has shape (5, 3, 3, 3), expected {shape}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_weights(saved, meta_like(state(), **{"conv.weight": torch.empty(shape)}))


@pytest.mark.parametrize("key, want", [("conv.weight", torch.float64), ("conv.weight", torch.bfloat16),
                                       ("bn.num_batches_tracked", torch.int32), ("mask", torch.uint8)])
def test_dtype_mismatch_without_a_requested_dtype(saved, key, want):
    """With dtype=None the file must hold exactly the expected dtypes."""
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has dtype .*, expected {want}"):
        load_weights(saved, meta_like(state(), **{key: torch.empty(state()[key].shape, dtype=want)}))


@pytest.mark.parametrize("requested", [torch.float32, torch.bfloat16, torch.float16])
def test_requested_dtype_casts_floating_tensors(tmp_path, requested):
    file = save_weights(tmp_path / "h.safetensors", state(), config=None, dtype=torch.float16)
    got = load_weights(file, meta_like(state()), dtype=requested)
    assert got["conv.weight"].dtype == requested and got["scale"].dtype == requested
    assert torch.equal(got["conv.weight"], state()["conv.weight"].half().to(requested))
    assert got["bn.num_batches_tracked"].dtype == torch.int64 and got["mask"].dtype == torch.bool


@pytest.mark.parametrize("key, want", [("conv.weight", torch.int64), ("bn.num_batches_tracked", torch.float32),
                                       ("bn.num_batches_tracked", torch.int32), ("mask", torch.float32)])
def test_wrong_dtype_class_is_an_error_even_with_a_requested_dtype(saved, key, want):
    """Integer and bool tensors never cast; a floating tensor stored where an integer one is expected (or the
    reverse) is refused."""
    with pytest.raises(CheckpointError, match=rf"w\.safetensors: tensor '{key}' has dtype"):
        load_weights(saved, meta_like(state(), **{key: torch.empty(state()[key].shape, dtype=want)}),
                     dtype=torch.float32)


def test_requested_dtype_must_be_floating(saved):
    with pytest.raises(ValueError, match="floating"):
        load_weights(saved, meta_like(state()), dtype=torch.int64)


@pytest.mark.parametrize("damage", ["truncate", "junk", "pickle", "empty"])
def test_corrupt_or_foreign_file_is_a_clear_error(saved, damage):
    data = saved.read_bytes()
    if damage == "truncate":
        saved.write_bytes(data[: len(data) // 2])
    elif damage == "junk":
        saved.write_bytes(b"\x00\xff not safetensors " * 7)
    elif damage == "pickle":
        saved.write_bytes(pickle.dumps({"conv.weight": [1.0, 2.0]}))
    else:
        saved.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"w\.safetensors: not a readable safetensors file"):
        load_weights(saved, meta_like(state()))
    with pytest.raises(CheckpointError, match=r"w\.safetensors"):
        stored_config(saved)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: missing"):
        load_weights(tmp_path / "nope.safetensors", meta_like(state()))


def test_config_lookup_order_and_bad_json(tmp_path):
    file = tmp_path / "legacy.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(file), metadata={"old_key": json.dumps({"a": 1})})
    assert stored_config(file) is None
    assert stored_config(file, legacy_keys=("old_key",)) == {"a": 1}
    file.with_suffix(".json").write_text(json.dumps({"b": 2}))
    assert stored_config(file) == {"b": 2}  # the side-car, when the metadata has no config
    assert stored_config(file, sidecar=False) is None
    save_file({"x": torch.zeros(1)}, str(file), metadata={CONFIG_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=rf"legacy\.safetensors: metadata '{CONFIG_KEY}': not valid JSON"):
        stored_config(file)
    save_file({"x": torch.zeros(1)}, str(file), metadata={CONFIG_KEY: "[1, 2]"})
    with pytest.raises(CheckpointError, match="JSON object"):
        stored_config(file)


def test_atomic_write_leaves_the_old_file_on_failure(saved, monkeypatch):
    before = saved.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_weights(saved, state(1), config={"name": "new"})
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name], "temporary file left behind"
    assert stored_config(saved) == {"name": "tiny", "channels": [5, 7]}


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new"

    def fail(p):
        p.write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_shipped_weight_files_pass_the_checks():
    """The embedded model's three weight files load through this module as they are on disk."""
    from fastface.perception import DEFAULT_PATH, AttributeClassifier, PerceptionConfig
    from fastface.vq import VQModel

    folder = DEFAULT_PATH.parent
    vq = VQModel.from_config_dict(stored_config(folder / "image_tokenizer.safetensors"))
    assert set(load_weights(folder / "image_tokenizer.safetensors", vq)) == set(vq.state_dict())
    clf = AttributeClassifier(PerceptionConfig.from_dict(
        stored_config(DEFAULT_PATH, legacy_keys=("fastface_perception_config",))))
    got = load_weights(DEFAULT_PATH, clf, dtype=torch.float32)  # stored in bf16 (the package budget), read as fp32
    assert set(got) == set(clf.state_dict()) and {t.dtype for t in got.values() if t.is_floating_point()} == {
        torch.float32}
    from fastface.config import FaceConfig
    from fastface.model import FaceTransformer

    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        skeleton = FaceTransformer(FaceConfig.from_dict(config["model"]))
    got = load_weights(folder / "model.safetensors", skeleton, dtype=torch.float32)  # stored bf16, read as fp32
    assert set(got) == set(skeleton.state_dict()) and {t.dtype for t in got.values()} == {torch.float32}
    with pytest.raises(CheckpointError, match="dtype torch.bfloat16, expected torch.float32"):
        load_weights(folder / "model.safetensors", skeleton)  # no requested dtype: the stored one must match


def test_save_module_stores_a_dtype_and_load_module_reads_it_back_in_the_modules(tmp_path):
    """``save_module(dtype=bf16)`` halves the file; ``load_module`` returns the module's own float dtype, values
    rounded once, and integer buffers (BatchNorm's counter) untouched."""
    from fastface.weights import load_module, save_module

    torch.manual_seed(0)

    def build():
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256))

    module = build()
    module[1].num_batches_tracked.fill_(7)
    size_full = save_module(tmp_path / "m.safetensors", module, {"kind": "test"}).stat().st_size
    half = save_module(tmp_path / "h.safetensors", module, {"kind": "test"}, dtype=torch.bfloat16)
    assert half.stat().st_size < 0.6 * size_full
    back = load_module(half, build)
    for (k, a), b in zip(module.state_dict().items(), back.state_dict().values()):
        assert b.dtype == a.dtype, k
        if a.is_floating_point():
            assert torch.equal(b, a.to(torch.bfloat16).float()), k
        else:
            assert torch.equal(b, a), k
