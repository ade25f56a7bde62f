"""The image tokenizer: a VQ autoencoder, 64x64 RGB faces <-> 16x16 codebook ids.

``fastface.vq.model`` holds the model (re-exported here); ``fastface.vq.train`` trains it (``train_vq``,
``face_images``, ``save_reconstruction_grid``; ``python -m fastface.vq.train --train``) and is not imported by
``import fastface.vq``.
"""

from fastface.vq.model import PRESETS, VQConfig, VQModel, psnr

__all__ = ["PRESETS", "VQConfig", "VQModel", "psnr"]
