"""Face world: procedural faces with fine-grained ground truth, captions and VQA.

    from fastface.data import make_dataset, caption, vqa_pairs
    data = make_dataset(1000, seed=0)     # images, parsing masks, landmarks, identities, labels, captions

Names resolve lazily from ``fastface.data.faceworld`` (rendering) and ``fastface.data.text`` (captions, VQA), so
``python -m fastface.data.faceworld`` runs the module once.
"""

import importlib

_FACEWORLD = ("ATTRIBUTES", "IDENTITY_ATTRIBUTES", "LANDMARKS", "MAKEUP_ATTRIBUTES", "PARSING_CLASSES",
              "FaceAttributes", "FaceSample", "make_dataset", "make_sample", "render", "sample_attributes",
              "sample_identity")
_TEXT = ("answer_text", "caption", "parse_caption", "prompt", "split_words", "vocabulary", "vqa_pairs")

__all__ = [*_FACEWORLD, *_TEXT]


def __getattr__(name):
    if name in _FACEWORLD:
        return getattr(importlib.import_module("fastface.data.faceworld"), name)
    if name in _TEXT:
        return getattr(importlib.import_module("fastface.data.text"), name)
    raise AttributeError(f"module 'fastface.data' has no attribute {name!r}")
