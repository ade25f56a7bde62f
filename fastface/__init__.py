"""fastface: a fast runtime for unified face models (describe faces, draw faces from fine-grained text).

    import fastface
    pipe = fastface.load()                                   # embedded default model, offline
    images = pipe.generate(["a smiling woman with red hair"], steps=16, guidance=2.0, seed=0)
    answers = pipe.answer(images, ["what colour is her hair?"])

Importing the package only defines names. The transformers integration (the C++ experts kernel as
``experts_implementation="fastface"``) registers when ``fastface.hf`` is imported.
"""

from fastface import ops
from fastface.config import PRESETS, FaceConfig

__version__ = "0.1.0"


def load(path=None, *, backend="auto", dtype="float32", weights="float"):
    """Load a checkpoint directory (default: the embedded face model) as a ``Pipeline``; ``weights="int8"``
    quantises its attention and expert weights (opt-in: ``fastface.quantization``)."""
    from fastface.pipeline import load as _load

    return _load(path, backend=backend, dtype=dtype, weights=weights)


def load_perception(path=None, *, dtype=None):
    """Load the face perception model (default: the shipped face-s Faceptor) as a ``Perceptor``: ``perceive(images)``
    -> landmarks, parsing, age, expression, attributes, identity per face; ``verify(a, b)``."""
    import torch

    from fastface.perception.perceptor import load_perception as _load_perception

    return _load_perception(path, dtype=torch.float32 if dtype is None else dtype)


def load_facetext(path=None):
    """Load the face-text contrastive model (default: the shipped face-s one) as a ``FaceTextModel``:
    ``similarity(images, texts)``, ``embed_images``, ``embed_texts``, ``understanding_embeddings``."""
    from fastface.facetext.model import load_facetext as _load_facetext

    return _load_facetext(path)


__all__ = ["FaceConfig", "PRESETS", "load", "load_facetext", "load_perception", "ops", "__version__"]
