"""``fastface perceive IMAGE... [--json] [--overlay OUT.png]``: landmarks, parsing, age, expression, attributes and
identity of 64x64 RGB face images, read by the shipped Faceptor (or ``--model FILE``).

Without ``--json`` each image gets a short summary line; with it, one JSON object per image (a list) on stdout.
``--overlay`` writes each face upscaled with its parsing classes tinted and its landmarks marked (one image:
OUT.png; several: OUT-0.png, OUT-1.png, ...) beside the face as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# a colour per parsing class (background untinted)
PALETTE = np.array([(0, 0, 0), (255, 200, 150), (150, 80, 30), (90, 50, 20), (40, 140, 255), (255, 140, 60),
                    (230, 30, 90), (40, 40, 40), (250, 210, 40), (60, 200, 120)], dtype=np.float32)


def add_arguments(p):
    p.add_argument("images", nargs="+", metavar="IMAGE", help="64x64 RGB face images (PNG, JPEG, ...)")
    p.add_argument("--model", default=None, help="Faceptor file (.safetensors; default: the shipped face-s one)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--overlay", default=None, metavar="OUT.png",
                   help="write each face with its parsing and landmarks drawn over it")
    p.add_argument("--scale", type=int, default=4, choices=range(1, 17), metavar="N",
                   help="overlay upscaling factor (default 4)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def overlay(image: np.ndarray, parsing: np.ndarray, landmarks: np.ndarray, scale: int = 4, alpha: float = 0.6):
    """RGB uint8 [S*scale, 2*S*scale, 3]: the face upscaled beside a copy with each parsing class tinted (background
    left as it is) and the landmarks as crosses."""
    from PIL import Image, ImageDraw

    img = np.asarray(image, dtype=np.float32)
    colours = PALETTE[np.minimum(parsing, len(PALETTE) - 1)]
    tint = (parsing > 0)[..., None]
    mixed = np.where(tint, (1 - alpha) * img + alpha * colours, img).clip(0, 255).astype(np.uint8)
    S = image.shape[0]
    out = Image.fromarray(mixed).resize((S * scale, S * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    r = max(2, scale)
    for x, y in landmarks:
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        draw.line([(cx - r, cy), (cx + r, cy)], fill=(255, 0, 0), width=max(1, scale // 3))
        draw.line([(cx, cy - r), (cx, cy + r)], fill=(255, 0, 0), width=max(1, scale // 3))
    plain = np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((S * scale, S * scale), Image.NEAREST))
    return np.concatenate([plain, np.asarray(out)], axis=1)


def _read(path: str, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from fastface.cli import CLIError

    try:
        with Image.open(path) as img:
            img.load()
            mode, (w, h) = img.mode, img.size
            if mode not in ("RGB", "RGBA", "P"):
                raise CLIError(f"{path}: a {mode!r} image; an RGB face is needed")
            if (w, h) != (size, size):
                raise CLIError(f"{path}: {w}x{h}; the model reads {size}x{size} faces")
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise CLIError(f"{path}: not an image") from None
    except IsADirectoryError:
        raise CLIError(f"{path}: a directory, not an image") from None


def run(args) -> int:
    import torch

    from fastface.cli import CLIError, _check_writable, _output_path, _write
    from fastface.perception.perceptor import load_perception

    try:
        perceptor = load_perception(args.model, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    images = [_read(p, perceptor.image_size) for p in args.images]
    targets = []
    if args.overlay:
        base = _output_path(args.overlay, "overlay.png", "overlay")
        if base.suffix.lower() != ".png":
            raise CLIError(f"--overlay {args.overlay!r}: write a .png")
        targets = [base] if len(images) == 1 else [base.with_name(f"{base.stem}-{i}{base.suffix}")
                                                   for i in range(len(images))]
        _check_writable(targets[0], "overlay")
    faces = perceptor.perceive(images)
    if args.json:
        rows = [{"image": p, **f.to_dict(perceptor.landmark_names),
                 "parsing_pixels": {c: int(n) for c, n in zip(perceptor.parsing_classes,
                                                               np.bincount(f.parsing.ravel(),
                                                                           minlength=len(perceptor.parsing_classes)))}}
                for p, f in zip(args.images, faces)]
        print(json.dumps(rows, indent=2))
    else:
        for p, f in zip(args.images, faces):
            shown = ", ".join(f"{k}={v}" for k, v in f.attributes.items() if k not in ("age", "expression"))
            print(f"{p}: {f.age}, {f.expression}; {shown}")
    for target, img, f in zip(targets, images, faces):
        from PIL import Image

        pic = overlay(img, f.parsing, f.landmarks, scale=args.scale)
        _write(Path(target), lambda tmp, pic=pic: Image.fromarray(pic).save(tmp, format="PNG"), "overlay")
    return 0
