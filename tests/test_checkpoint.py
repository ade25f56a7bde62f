"""Checkpoint round trip and every way a checkpoint directory can be wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastface.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_bit_exact(tiny_checkpoint, tmp_path):
    model, tok, vq, cfg = load_checkpoint(tiny_checkpoint)
    again = save_checkpoint(tmp_path / "again", model, tok)
    model2, _, _, _ = load_checkpoint(again)
    s1, s2 = model.state_dict(), model2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    for k in stored:
        assert torch.equal(stored[k], s1[k]), k
    assert vq is None and cfg["format_version"] == 1


def test_bf16_load(tiny_checkpoint):
    model, *_ = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_wrong_format_version(tiny_checkpoint):
    edit_config(tiny_checkpoint, lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tiny_checkpoint)


def test_unknown_config_fields(tiny_checkpoint):
    edit_config(tiny_checkpoint, lambda c: c["model"].update(num_wings=2))
    with pytest.raises(CheckpointError, match="num_wings"):
        load_checkpoint(tiny_checkpoint)
    edit_config(tiny_checkpoint, lambda c: (c["model"].pop("num_wings"), c.update(extra=1)))
    with pytest.raises(CheckpointError, match="'extra'"):
        load_checkpoint(tiny_checkpoint)


def test_invalid_json(tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tiny_checkpoint)


def test_missing_files(tiny_checkpoint):
    (tiny_checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_checkpoint(tiny_checkpoint)


def test_truncated_safetensors(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tiny_checkpoint)


def test_not_safetensors(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").write_bytes(b"\x80\x04pickle? no." * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tiny_checkpoint)


def rewrite_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_key(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensor.*lm_head.weight"):
        load_checkpoint(tiny_checkpoint)


def test_unexpected_key(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.update(bogus=torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor.*bogus"):
        load_checkpoint(tiny_checkpoint)


def test_shape_mismatch(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.update({"embed.weight": t["embed.weight"][:-1].clone()}))
    with pytest.raises(CheckpointError, match="embed.weight.*shape"):
        load_checkpoint(tiny_checkpoint)


def test_dtype_mismatch(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.update({"ln_f.weight": t["ln_f.weight"].double()}))
    with pytest.raises(CheckpointError, match="ln_f.weight.*dtype"):
        load_checkpoint(tiny_checkpoint)


def test_tokenizer_vocab_mismatch(tiny_checkpoint, tmp_path):
    from conftest import word_tokenizer

    word_tokenizer(40).save(str(tiny_checkpoint / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="text_vocab_size"):
        load_checkpoint(tiny_checkpoint)


def test_no_pickle_anywhere(tiny_checkpoint):
    for f in tiny_checkpoint.iterdir():
        assert f.suffix in (".json", ".safetensors"), f


def test_save_is_atomic_on_failure(tiny_checkpoint, tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous files intact under their names."""
    import fastface.weights as ck  # the checkpoint's tensor files are written by fastface.weights

    dst = tmp_path / "dst"
    shutil.copytree(tiny_checkpoint, dst)
    before = (dst / "model.safetensors").read_bytes()
    model, tok, _, _ = load_checkpoint(dst)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(dst, model, tok)
    assert (dst / "model.safetensors").read_bytes() == before
    assert not [p for p in dst.iterdir() if p.name.startswith(".")], "temporary files left behind"
