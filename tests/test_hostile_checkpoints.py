"""Crafted checkpoints: a config that asks for absurd work or memory, non-finite numbers in a config or the
weights, and a fuzz over config.json and safetensors headers. Every one is a clean ``CheckpointError`` naming
what is wrong, raised before the model is built, or a successful load; never a hang, a huge allocation or
another exception."""

import copy
import json
import math
import random
import resource
import shutil
import struct
import time

import pytest
from safetensors.torch import load_file, save_file

import fastface.weights
from fastface.checkpoint import CheckpointError, load_checkpoint
from fastface.config import MAX_LAYERS, FaceConfig
from fastface.pipeline import DEFAULT_MODEL
from fastface.vq.model import VQConfig


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def embedded(tmp_path):
    """A copy of the embedded model (it has an image tokenizer)."""
    dst = tmp_path / "face-s"
    shutil.copytree(DEFAULT_MODEL, dst)
    return dst


def _fails_fast(path, match, seconds=2.0):
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    assert time.monotonic() - start < seconds


@pytest.mark.parametrize("field,value,match", [
    ("num_layers", 10_000_000, r"'num_layers'=10000000 out of range \[1, 512\]"),
    ("hidden_size", 2**40, "'hidden_size'"),
    ("text_vocab_size", 2**31, "'text_vocab_size'"),
    ("expert_ffn_size", 10**9, "'expert_ffn_size'"),
    ("max_text_len", 10**8, "'max_text_len'"),
    ("num_experts", -3, "'num_experts'"),
    ("num_heads", True, "'num_heads' must be an int"),
    ("image_grid", 4.0, "'image_grid' must be an int"),
    ("rope_theta", math.nan, "'rope_theta' must be a finite number"),
    ("rope_theta", math.inf, "'rope_theta' must be a finite number"),
    ("layer_norm_eps", -1.0, "'layer_norm_eps'"),
    ("cond_dropout", 3.0, "'cond_dropout'"),
    ("name", 7, "'name' must be a string"),
])
def test_transformer_config_bounds_fail_fast(tiny_checkpoint, field, value, match):
    """``num_layers: 10000000`` was still building after 20 s; now each bad field is named before allocation."""
    edit_config(tiny_checkpoint, lambda c: c["model"].update({field: value}))
    _fails_fast(tiny_checkpoint, match)


def test_an_int_past_pythons_digit_limit_is_a_clean_error(tiny_checkpoint):
    text = (tiny_checkpoint / "config.json").read_text()
    (tiny_checkpoint / "config.json").write_text(text.replace('"num_layers": 2', '"num_layers": ' + "9" * 5000))
    _fails_fast(tiny_checkpoint, "not valid JSON")


def test_image_tokenizer_config_bounds_fail_fast(embedded):
    """``channels: [32, 64, 60000]`` asked for 129.6 GB of convolutions."""
    edit_config(embedded, lambda c: c["image_tokenizer"].update(channels=[32, 64, 60000]))
    _fails_fast(embedded, r"image_tokenizer.*'channels\[2\]'=60000 out of range")
    edit_config(embedded, lambda c: c["image_tokenizer"].update(channels=[32, 64, 128], enc_blocks=[1, 10**6, 1]))
    _fails_fast(embedded, "enc_blocks")


def test_a_config_within_bounds_that_does_not_fit_memory_fails_before_allocation(tiny_checkpoint):
    """Hidden 65536 and 512 layers is within the field bounds but needs terabytes: the memory estimate refuses it
    against this machine's MemAvailable, before anything is built."""
    if fastface.weights.available_memory() is None:
        pytest.skip("no MemAvailable on this machine")
    edit_config(tiny_checkpoint, lambda c: c["model"].update(hidden_size=65536, num_heads=64,
                                                             num_layers=MAX_LAYERS, expert_ffn_size=65536))
    _fails_fast(tiny_checkpoint, "loading needs about .* GiB")


def test_memory_estimate_counts_the_model(tiny_checkpoint, monkeypatch):
    cfg = FaceConfig.from_dict(json.loads((tiny_checkpoint / "config.json").read_text())["model"])
    need = cfg.num_parameters() * 4 * 2  # stored fp32 tensors + the fp32 model
    monkeypatch.setattr(fastface.weights, "available_memory", lambda: need - 1)
    _fails_fast(tiny_checkpoint, "loading needs about")
    monkeypatch.setattr(fastface.weights, "available_memory", lambda: need)
    load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_at_load(tiny_checkpoint, value):
    """A NaN weight made every generated token 0 without a word."""
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    tensors["ln_f.weight"][3] = value
    save_file(tensors, str(tiny_checkpoint / "model.safetensors"))
    _fails_fast(tiny_checkpoint, r"'ln_f.weight' has 1 non-finite value\(s\) .*index \(3,\)")


def test_non_finite_image_tokenizer_weights_are_refused(embedded):
    file = embedded / "image_tokenizer.safetensors"
    tensors = load_file(str(file))
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[key].view(-1)[0] = math.nan
    save_file(tensors, str(file), metadata={"config": json.dumps(json.loads(
        (embedded / "config.json").read_text())["image_tokenizer"])})
    _fails_fast(embedded, f"{key!r} has 1 non-finite")


# ---------------------------------------------------------------------------------------------------- fuzz
WEIRD = [-1, 0, 1, 2, 3, 7, 64, 10**7, 2**63, -(2**63), 1e308, -1e-308, math.nan, math.inf, 0.5, "", "x", None,
         True, False, [], [1, 2], {}, {"a": 1}]


def _mutate_config(cfg: dict, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        sections = [s for s in (cfg, cfg.get("model"), cfg.get("model"), cfg.get("image_tokenizer"))
                    if isinstance(s, dict) and s]
        section = rng.choice(sections)
        if rng.random() < 0.1:
            section.pop(rng.choice(sorted(section)))
        else:
            section[rng.choice(sorted(section))] = copy.deepcopy(rng.choice(WEIRD))


def _mutate_header(data: bytearray, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    choice = rng.randrange(5)
    if choice == 0:  # a wrong header length
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**40, 2**64 - 1])) + bytes(data[8:])
    if choice == 1:  # flipped bytes inside the header
        for _ in range(rng.randint(1, 4)):
            data[8 + rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(data)
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[key]
    if choice == 2:
        entry["dtype"] = rng.choice(["F64", "I8", "BOOL", "F8_E4M3", "Q9", 3])
    elif choice == 3:
        entry["shape"] = rng.choice([[], [0], [2**40], [-1], [1, 2, 3, 4, 5, 6, 7, 8, 9], "x"])
    else:
        lo, hi = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[hi, lo], [lo, hi + 4], [0, 2**50], [lo, lo], [-4, hi]])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :])


def test_fuzz_configs_and_headers(embedded, tmp_path):
    """80 random mutations of config.json and of the tensor files' headers: each loads or raises
    ``CheckpointError``, within 10 s and 512 MiB of extra peak memory; nothing else escapes."""
    rng = random.Random(20261202)
    clean_config = (embedded / "config.json").read_text()
    files = {name: (embedded / name).read_bytes() for name in ("model.safetensors", "image_tokenizer.safetensors")}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(80):
        work = tmp_path / f"case-{case}"
        shutil.copytree(embedded, work)
        if case % 2 == 0:
            cfg = json.loads(clean_config)
            _mutate_config(cfg, rng)
            (work / "config.json").write_text(json.dumps(cfg))
        else:
            name = rng.choice(sorted(files))
            (work / name).write_bytes(_mutate_header(bytearray(files[name]), rng))
        start = time.monotonic()
        try:
            load_checkpoint(work)
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert str(exc), case
            outcomes["refused"] += 1
        assert time.monotonic() - start < 10.0, case
        shutil.rmtree(work)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert grown < 512 * 2**20, grown
    assert outcomes["refused"] >= 40, outcomes  # the mutations mostly break something


def test_vq_config_from_dict_rejects_wrong_types():
    with pytest.raises(TypeError, match="image tokenizer config"):
        VQConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="'channels' must be a list"):
        VQConfig(channels="abc")
