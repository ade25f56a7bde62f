"""The embedded default model: it ships with the package, loads offline, and both tasks run on it."""

import json

import numpy as np
import pytest
import torch

import fastface
from fastface.pipeline import DEFAULT_MODEL

MAX_BYTES = 30 * 2**20  # the repository's budget for the embedded checkpoint


def test_embedded_checkpoint_is_complete_and_small():
    files = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "image_tokenizer.safetensors"} <= files
    assert (DEFAULT_MODEL / "MODEL_CARD.md").is_file(), "the model card documents how the weights were made"
    total = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir())
    assert total <= MAX_BYTES, f"embedded model is {total / 2**20:.1f} MiB"
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["model"]["image_size"] == 64 and config["model"]["codebook_size"] >= 512


def test_embedded_model_generates_and_answers():
    pipe = fastface.load()  # no path: the embedded model
    assert pipe.config.name == "face-s"
    images = pipe.generate(["an old man with a grey beard, round glasses and blue eyes"], steps=4, seed=0)
    assert len(images) == 1 and images[0].size == (64, 64) and images[0].mode == "RGB"
    pixels = np.asarray(images[0])
    assert pixels.std() > 5, "a face, not a flat colour"
    answers = pipe.answer(images, ["is he wearing glasses?"])
    assert len(answers) == 1 and answers[0].strip() != ""


def test_embedded_engine_matches_reference():
    """The default (engine) path and the reference loop draw the same tokens from the trained weights."""
    ref = fastface.load(backend="reference")
    fast = fastface.load(backend="auto")
    prompts = ["a smiling woman with red hair and green eyes", "a young man with a black hat"]
    expected = ref.generate_tokens(prompts, steps=4, guidance=2.0, seed=7)
    got = fast.generate_tokens(prompts, steps=4, guidance=2.0, seed=7)
    assert torch.equal(got, expected)


def test_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(fastface.pipeline, "DEFAULT_MODEL", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="embedded default model"):
        fastface.load()
