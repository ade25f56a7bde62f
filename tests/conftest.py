import pytest
import torch

from fastface.config import SPECIAL_TOKENS, FaceConfig


def word_tokenizer(size: int):
    """A word-level tokenizer with the special tokens at ids 0..7 and words w0, w1, … up to ``size`` entries."""
    from fastface.tokenizer import build_text_tokenizer

    return build_text_tokenizer([f"w{i}" for i in range(size - len(SPECIAL_TOKENS))])


@pytest.fixture
def tiny_config():
    return FaceConfig.from_name("tiny")


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_config):
    """A random-weight tiny checkpoint directory (no image tokenizer)."""
    from fastface.checkpoint import save_checkpoint
    from fastface.model import FaceTransformer

    torch.manual_seed(0)
    model = FaceTransformer(tiny_config)
    model.reset_parameters(5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # sharp logits: generations are not uniform noise
    return save_checkpoint(tmp_path / "tiny", model, word_tokenizer(tiny_config.text_vocab_size))
