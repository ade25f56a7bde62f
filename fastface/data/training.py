"""Face-world training data for the transformer: image tokens, captions, question-answer pairs.

Faces are rendered once and encoded by the image tokenizer once; captions and questions are drawn fresh
for every use from the example's own generator (so a face is described in many ways over training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastface.config import FaceConfig
from fastface.tokenizer import encode_text

DEFAULT_IMAGE_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "face-s"
QA_PER_EXAMPLE = 3  # question-answer turns per understanding example (more supervised tokens per image)


def _np_rng(gen: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))


def load_image_tokenizer(path=None):
    """The image tokenizer at ``path`` (a .safetensors file, or a directory holding image_tokenizer.safetensors)."""
    from fastface.vq import VQModel

    path = Path(DEFAULT_IMAGE_TOKENIZER if path is None else path)
    if path.is_dir():
        path = path / "image_tokenizer.safetensors"
    return VQModel.load(path)


@torch.no_grad()
def encode_images(image_tokenizer, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """uint8 [n, 64, 64, 3] -> codebook ids [n, N]."""
    out = [image_tokenizer.encode(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out)


CANONICAL_SEED = 0  # the seed of every canonical caption (``FaceWorldData.canonical_caption``)


@dataclass
class FaceWorldData:
    """Training examples over a fixed set of rendered, tokenized faces."""

    config: FaceConfig
    attrs: list
    image_tokens: torch.Tensor  # [n, N] int64
    tokenizer: object
    image_tokenizer: object
    qa_per_example: int = QA_PER_EXAMPLE
    caption_rate: float = 0.0  # share of understanding examples whose first turn asks for the whole caption
    embedder: object = None  # a FaceTextModel: e_sem and e_id of each face for the understanding experts
    e_sem: torch.Tensor | None = None  # [n, sem_dim] float32, from the rendered pixels (not the tokens)
    e_id: torch.Tensor | None = None  # [n, id_dim]
    # caption answers and text diffusion blocks hold each face's one canonical caption (``canonical_caption``)
    # rather than a fresh random wording: p(text | image) is then the face's attributes, not the templates' dice
    canonical_captions: bool = False

    def __len__(self):
        return len(self.attrs)

    @classmethod
    def build(cls, config: FaceConfig, *, faces: int, seed: int = 0, image_tokenizer=None, progress=True,
              qa_per_example: int = QA_PER_EXAMPLE, caption_rate: float = 0.0, embedder=None,
              canonical_captions: bool = False):
        """Render ``faces`` faces of dataset ``seed`` and tokenize them; with ``embedder`` (a ``FaceTextModel`` or
        the path of one) also compute their understanding embeddings (``e_sem``, ``e_id``) from the pixels."""
        from fastface.data.dataset import make_dataset
        from fastface.tokenizer import default_text_tokenizer

        if not isinstance(qa_per_example, int) or qa_per_example < 1:
            raise ValueError(f"qa_per_example must be a positive int, got {qa_per_example!r}")
        if isinstance(caption_rate, bool) or not isinstance(caption_rate, (int, float)) or not 0 <= caption_rate <= 1:
            raise ValueError(f"caption_rate must lie in [0, 1], got {caption_rate!r}")
        if image_tokenizer is None or isinstance(image_tokenizer, (str, Path)):
            image_tokenizer = load_image_tokenizer(image_tokenizer)
        data = make_dataset(faces, seed=seed, captions=False)
        tokens = encode_images(image_tokenizer, data["images"])
        e_sem = e_id = None
        if embedder is not None:
            if isinstance(embedder, (str, Path)):
                from fastface.facetext.model import FaceTextModel

                embedder = FaceTextModel.load(embedder)
            e_sem, e_id = embedder.understanding_embeddings(data["images"])
        if not isinstance(canonical_captions, bool):
            raise TypeError(f"canonical_captions must be True or False, got {type(canonical_captions).__name__}")
        return cls(config, data["attrs"], tokens, default_text_tokenizer(config.text_vocab_size),
                   image_tokenizer, qa_per_example, float(caption_rate), embedder, e_sem, e_id, canonical_captions)

    def embeddings(self, index: int):
        """(e_sem [sem_dim], e_id [id_dim]) of face ``index``, or None without an embedder."""
        return None if self.e_sem is None else (self.e_sem[index], self.e_id[index])

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def t2i_example(self, index: int, gen: torch.Generator):
        from fastface.data.text import caption

        text = caption(self.attrs[index], _np_rng(gen), max_tokens=self.config.max_text_len - 3)
        return self.encode(text), self.image_tokens[index]

    def canonical_caption(self, index: int) -> str:
        """Face ``index``'s one canonical caption: the face world's caption drawn with a fixed seed (the same wording
        for the same attributes)."""
        from fastface.data.text import caption

        rng = np.random.default_rng(CANONICAL_SEED)
        return caption(self.attrs[index], rng, max_tokens=self.config.max_text_len - 3)

    def block_example(self, index: int, gen: torch.Generator):
        """(caption ids, image tokens) of a text diffusion row: the canonical caption with ``canonical_captions``,
        else a fresh one (``t2i_example``)."""
        if not self.canonical_captions:
            return self.t2i_example(index, gen)
        return self.encode(self.canonical_caption(index)), self.image_tokens[index]

    def mmu_example(self, index: int, gen: torch.Generator):
        from fastface.data.text import CAPTION_QUESTION, caption, vqa_pairs

        rng = _np_rng(gen)
        pairs = []
        if self.caption_rate and rng.random() < self.caption_rate:  # no draw at rate 0: older runs replay exactly
            text = (self.canonical_caption(index) if self.canonical_captions else
                    caption(self.attrs[index], rng, max_tokens=self.config.max_text_len - 3))
            pairs.append((CAPTION_QUESTION, text))
        pairs += vqa_pairs(self.attrs[index], rng, self.qa_per_example)
        return self.image_tokens[index], [(self.encode(q), self.encode(a)) for q, a in pairs]
