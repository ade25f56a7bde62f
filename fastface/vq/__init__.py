"""The image tokenizers: a VQ autoencoder (64x64 RGB faces <-> 16x16 codebook ids) and Show-o's MAGVIT-v2.

``fastface.vq.model`` holds the VQ model and ``fastface.vq.magvit`` the MAGVIT-v2 tokenizer (both re-exported here).
``fastface.vq.train`` trains the VQ model (``train_vq``, ``face_images``, ``save_reconstruction_grid``;
``python -m fastface.vq.train --train``) and is not imported by ``import fastface.vq``.
"""

from fastface.vq.magvit import LFQ, MagvitConfig, MagvitTokenizer
from fastface.vq.model import PRESETS, VQConfig, VQModel, psnr

__all__ = ["LFQ", "PRESETS", "MagvitConfig", "MagvitTokenizer", "VQConfig", "VQModel", "psnr"]
