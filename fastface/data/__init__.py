"""Face world: procedural faces with fine-grained ground truth, captions and VQA.

    from fastface.data import make_dataset, caption, vqa_pairs
    data = make_dataset(1000, seed=0)     # images, parsing masks, landmarks, identities, labels, captions

One module per job, each name resolved lazily from its module: ``attributes`` (the schema and its sampling),
``renderer`` (attributes -> image, parsing mask, landmarks), ``text`` (captions, VQA), ``dataset`` (samples,
stacked datasets and the ``python -m fastface.data.dataset`` CLI); ``training`` feeds them to the trainer.
"""

import importlib

_EXPORTS = {
    "attributes": ("ATTRIBUTES", "IDENTITY_ATTRIBUTES", "MAKEUP_ATTRIBUTES", "FaceAttributes", "sample_attributes",
                   "sample_identity"),
    "renderer": ("LANDMARKS", "PARSING_CLASSES", "FaceSample", "render"),
    "dataset": ("make_dataset", "make_sample"),
    "text": ("answer_text", "caption", "parse_caption", "prompt", "split_words", "vocabulary", "vqa_pairs"),
}
_MODULE = {name: f"fastface.data.{module}" for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE)


def __getattr__(name):
    if name in _MODULE:
        return getattr(importlib.import_module(_MODULE[name]), name)
    raise AttributeError(f"module 'fastface.data' has no attribute {name!r}")
