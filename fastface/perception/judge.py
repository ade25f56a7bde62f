"""The evaluation judge of ``fastface eval``: per attribute, whichever perception model reads it more accurately.

    judge = Judge.default()                  # the shipped attribute classifier, and the Faceptor where it is better
    labels = judge.predict_labels(images)    # int64 [B, n_attributes], ``FaceAttributes.labels()`` layout
    judge.sources                            # {"age": "faceptor", "gender": "classifier", ...}

The choice is measured, not assumed: ``export_run`` scores both models on the same held-out faces and writes the
attributes where the Faceptor is at least as accurate into the Faceptor's config (``metrics["judge_attributes"]``);
everywhere else the attribute classifier keeps judging.
"""

from __future__ import annotations

import numpy as np

from fastface.data.attributes import ATTRIBUTES


class Judge:
    """Attribute labels from the classifier, with the Faceptor's on ``faceptor_attributes``."""

    def __init__(self, classifier, perceptor=None, faceptor_attributes=()):
        faceptor_attributes = tuple(faceptor_attributes)
        unknown = [a for a in faceptor_attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"faceptor_attributes: unknown attribute(s) {unknown}")
        if faceptor_attributes and perceptor is None:
            raise ValueError("faceptor_attributes given without a perceptor")
        if tuple(classifier.config.attributes) != tuple(ATTRIBUTES):
            raise ValueError("the classifier's attributes are not the face world's")
        if perceptor is not None and tuple(perceptor.config.attributes) != tuple(ATTRIBUTES):
            raise ValueError("the Faceptor's attributes are not the face world's")
        self.classifier, self.perceptor = classifier, perceptor
        self.sources = {a: ("faceptor" if a in faceptor_attributes else "classifier") for a in ATTRIBUTES}
        self._columns = [k for k, a in enumerate(ATTRIBUTES) if a in faceptor_attributes]

    @classmethod
    def default(cls, classifier_path=None, faceptor_path=None) -> Judge:
        """The shipped classifier, plus the shipped Faceptor on the attributes its model card says it reads at
        least as well (the classifier alone where no Faceptor is shipped)."""
        from fastface.perception.model import AttributeClassifier
        from fastface.perception.perceptor import DEFAULT_PATH, Perceptor

        classifier = AttributeClassifier.load(classifier_path)
        path = DEFAULT_PATH if faceptor_path is None else faceptor_path
        if faceptor_path is None and not DEFAULT_PATH.is_file():
            return cls(classifier)
        perceptor = Perceptor.load(path)
        return cls(classifier, perceptor, perceptor.config.metrics.get("judge_attributes", ()))

    def predict_labels(self, images, batch_size: int = 256) -> np.ndarray:
        labels = self.classifier.predict_labels(images, batch_size)
        if self._columns:
            mine = self.perceptor.run(images, batch_size=min(batch_size, 128), tasks=("attributes",))["attributes"]
            labels[:, self._columns] = mine.numpy()[:, self._columns]
        return labels
