"""Perception: the attribute classifier that reads face-world attributes and identity from 64x64 faces.

``fastface.perception.model`` holds the model and its inference helpers (re-exported here);
``fastface.perception.train`` holds its data, losses, accuracy tables, trainer and command line
(``python -m fastface.perception.train --train``) and is not imported by ``import fastface.perception``.
"""

from fastface.perception.model import DEFAULT_PATH, IGNORE, PRESETS, AttributeClassifier, PerceptionConfig

__all__ = ["DEFAULT_PATH", "IGNORE", "PRESETS", "AttributeClassifier", "PerceptionConfig"]
