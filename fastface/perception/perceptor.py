"""``Perceptor``: what a user calls to read faces — landmarks, parsing, age, expression, attributes, identity.

    import fastface
    perceptor = fastface.load_perception()                 # the shipped face-s Faceptor
    faces = perceptor.perceive(images)                     # uint8 [B, 64, 64, 3] (array, tensor or PIL images)
    faces[0].landmarks                                     # float32 [K, 2] (x, y) in pixels
    faces[0].parsing                                       # uint8 [64, 64], values index perceptor.parsing_classes
    faces[0].age, faces[0].expression, faces[0].attributes # "young", "smiling", {"gender": "woman", ...}
    faces[0].identity                                      # float32 [id_dim], unit length
    perceptor.verify(a, b)                                 # Verification(score=0.93, same=True)

A ``Perceptor`` wraps a trained ``Faceptor`` (``fastface.perception.faceptor``); files are written by
``fastface.perception.faceptor_train.export_run`` (``python -m fastface.perception.faceptor_train --export RUN
--to FILE``) and hold the model's
config — its task vocabulary, the verification threshold and the held-out metrics — in their metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fastface.checks import check_choice
from fastface.data.attributes import ATTRIBUTES
from fastface.perception.faceptor import Faceptor, FaceptorConfig, fused_for_inference
from fastface.weights import load_config, load_module, save_module

DEFAULT_PATH = Path(__file__).parents[1] / "assets" / "face-s" / "faceptor.safetensors"


@dataclass
class FacePerception:
    """What ``Perceptor.perceive`` reads from one face."""

    landmarks: np.ndarray  # float32 [K, 2], (x, y) pixel coordinates (pixel centres at integers)
    parsing: np.ndarray  # uint8 [S, S], indices into Perceptor.parsing_classes
    age: str
    expression: str
    attributes: dict[str, str]  # every attribute head, age and expression included
    identity: np.ndarray  # float32 [id_dim], unit length

    def to_dict(self, landmark_names=None) -> dict:
        """JSON-able (without the parsing mask): landmarks by name when ``landmark_names`` is given."""
        lm = self.landmarks.tolist()
        return {"landmarks": dict(zip(landmark_names, lm)) if landmark_names else lm,
                "age": self.age, "expression": self.expression, "attributes": dict(self.attributes),
                "identity": [round(float(v), 6) for v in self.identity]}


class Verification(NamedTuple):
    score: float  # cosine similarity of the two identity embeddings
    same: bool  # score >= the threshold


def image_batch(images, size: int, name: str = "images") -> torch.Tensor:
    """uint8 RGB images [B, S, S, 3] from a tensor, an array, or a list of arrays / PIL images (no resizing, no
    colour conversion: the model reads S x S RGB faces)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{name} is empty")
        arrays = []
        for i, img in enumerate(images):
            if hasattr(img, "mode") and hasattr(img, "size"):  # PIL
                if img.mode not in ("RGB", "RGBA"):
                    raise ValueError(f"{name}[{i}] is a {img.mode!r} image; an RGB face is needed")
                img = np.asarray(img.convert("RGB"))
            elif isinstance(img, torch.Tensor):
                img = img.numpy()
            if not isinstance(img, np.ndarray):
                raise TypeError(f"{name}[{i}] must be an image (PIL, numpy or torch), got {type(img).__name__}")
            arrays.append(_check_one(img, size, f"{name}[{i}]"))
        return torch.from_numpy(np.stack(arrays))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # a read-only view (PIL) is copied
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be uint8 [B, {size}, {size}, 3] (tensor, array or a list of images), "
                        f"got {type(images).__name__}")
    if images.dim() == 3:
        raise ValueError(f"{name} has shape {tuple(images.shape)}: a batch [B, {size}, {size}, 3] is needed "
                         f"(a single image goes in a list)")
    if images.dim() != 4 or images.shape[-1] != 3 or tuple(images.shape[1:3]) != (size, size):
        raise ValueError(f"{name} must have shape [B, {size}, {size}, 3] (RGB), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return images


def _check_one(img: np.ndarray, size: int, name: str) -> np.ndarray:
    if img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 1):
        raise ValueError(f"{name} is grayscale {img.shape}; an RGB face [{size}, {size}, 3] is needed")
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{name} must be [{size}, {size}, 3] RGB, got shape {img.shape}")
    if img.shape[:2] != (size, size):
        raise ValueError(f"{name} is {img.shape[1]}x{img.shape[0]}; the model reads {size}x{size} faces")
    if img.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {img.dtype}")
    return img


class Perceptor:
    """Batched face perception with a trained Faceptor.

    ``model`` is kept as given (it is what ``save`` writes); inference runs on a copy made here with BatchNorm
    folded into the convs, in channels-last memory (``fused_for_inference``), so later changes to ``model`` need a
    new ``Perceptor``.
    """

    def __init__(self, model: Faceptor, *, dtype: torch.dtype = torch.float32):
        if not isinstance(model, Faceptor):
            raise TypeError(f"model must be a Faceptor, got {type(model).__name__}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.model = model.eval()
        self._fast = fused_for_inference(model)
        self.dtype = dtype
        cfg = model.config
        self.config = cfg
        self.parsing_classes = cfg.parsing_classes
        self.landmark_names = cfg.landmarks
        self.image_size = cfg.image_size
        self.threshold = cfg.verify_threshold

    # ---------------------------------------------------------------------------------------- io
    @classmethod
    def load(cls, path=None, *, dtype: torch.dtype = torch.float32) -> Perceptor:
        """Read a file written by ``export_run`` (default: the shipped face-s Faceptor)."""
        path = Path(DEFAULT_PATH if path is None else path)
        cfg = load_config(path, FaceptorConfig.from_dict, "Faceptor", missing="train one with `python -m "
                          "fastface.perception.faceptor_train --train --out RUN`, then --export RUN")
        return cls(load_module(path, lambda: Faceptor(cfg)), dtype=dtype)

    def save(self, path, *, dtype: torch.dtype | None = None) -> Path:
        """Write the model to ``path`` (floating tensors stored in ``dtype`` when given; loaded as float32)."""
        return save_module(path, self.model, self.config.to_dict(), dtype=dtype)

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def run(self, images, batch_size: int = 64, tasks=None) -> dict[str, torch.Tensor]:
        """Raw outputs for a batch: ``landmarks`` [B, K, 2], ``parsing`` uint8 [B, S, S], ``attributes`` int64
        [B, A] (value indices), ``identity`` [B, id_dim] (float32)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        images = image_batch(images, self.image_size)
        tasks = tuple(tasks) if tasks is not None else ("parsing", "landmarks", "attributes", "identity")
        chunks: dict[str, list] = {}
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        for i in range(0, images.shape[0], batch_size):
            x = self._fast.to_input(images[i : i + batch_size]).contiguous(memory_format=torch.channels_last)
            with autocast:
                out = self._fast(x, tasks=tasks)
            if "parsing" in out:
                chunks.setdefault("parsing", []).append(out["parsing"].argmax(1).to(torch.uint8))
            if "landmarks" in out:
                chunks.setdefault("landmarks", []).append(out["landmarks"].float())
            if "attributes" in out:
                chunks.setdefault("attributes", []).append(torch.stack([a.argmax(1) for a in out["attributes"]], 1))
            if "identity" in out:
                chunks.setdefault("identity", []).append(out["identity"].float())
        return {k: torch.cat(v) for k, v in chunks.items()}

    def perceive(self, images, batch_size: int = 64) -> list[FacePerception]:
        """uint8 RGB faces [B, S, S, 3] -> one ``FacePerception`` per face."""
        out = self.run(images, batch_size)
        names = self.config.attributes
        result = []
        for b in range(out["landmarks"].shape[0]):
            attrs = {n: ATTRIBUTES[n][int(j)] if n in ATTRIBUTES else str(int(j))
                     for n, j in zip(names, out["attributes"][b])}
            result.append(FacePerception(landmarks=out["landmarks"][b].numpy(), parsing=out["parsing"][b].numpy(),
                                         age=attrs.get("age", ""), expression=attrs.get("expression", ""),
                                         attributes=attrs, identity=out["identity"][b].numpy()))
        return result

    def embed_identity(self, images, batch_size: int = 64) -> torch.Tensor:
        """uint8 RGB faces [B, S, S, 3] -> identity embeddings ``e_id`` [B, id_dim], float32, unit rows."""
        return self.run(images, batch_size, tasks=("identity",))["identity"]

    def verify(self, a, b, threshold: float | None = None) -> Verification | list[Verification]:
        """Are faces ``a`` and ``b`` one person? One image each -> a ``Verification``; batches of equal length
        -> a list. ``threshold`` defaults to the model's (false accepts at 1% on held-out people)."""
        single = (isinstance(a, np.ndarray) and a.ndim == 3) or hasattr(a, "mode") or \
            (isinstance(a, torch.Tensor) and a.dim() == 3)
        if single:
            a, b = [a], [b]
        ea, eb = self.embed_identity(a), self.embed_identity(b)
        if ea.shape[0] != eb.shape[0]:
            raise ValueError(f"verify: a has {ea.shape[0]} faces and b has {eb.shape[0]}")
        t = self.threshold if threshold is None else float(threshold)
        scores = (ea * eb).sum(1).tolist()
        out = [Verification(score=float(s), same=bool(s >= t)) for s in scores]
        return out[0] if single else out

    def region_mask(self, parsing: np.ndarray, region: str) -> np.ndarray:
        """bool [S, S] of the pixels of parsing class ``region`` (a name in ``parsing_classes``)."""
        check_choice("region", region, self.parsing_classes)
        return np.asarray(parsing) == self.parsing_classes.index(region)


def load_perception(path=None, *, dtype: torch.dtype = torch.float32) -> Perceptor:
    """The face perception model: ``Perceptor.load(path)`` (default: the shipped face-s Faceptor)."""
    return Perceptor.load(path, dtype=dtype)
