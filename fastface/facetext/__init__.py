"""Face-text contrastive learning: ``fastface.facetext.model`` (the model), ``fastface.facetext.train``."""
