"""Image input: any picture Pillow can open -> an RGB image, the one conversion the CLI and the pipeline share.

    img = open_image("face.png")        # bounded, decoded, RGB (an ``ImageError`` for anything else)
    img = to_rgb(pil_image)             # what ``Pipeline.encode_images`` does to every PIL image

Conversion to 8-bit RGB, per Pillow mode:

- ``RGB``, ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's own ``convert("RGB")``;
- ``I;16`` (``I;16L``, ``I;16B``, ``I;16N``: 16-bit gray PNG and TIFF) and ``I`` (32-bit int, which Pillow uses for
  16-bit PGM): 16-bit values, scaled by ``value >> 8`` (``I`` clipped to [0, 65535] first). Pillow's own rule clips
  them at 255, so any value above 255 -- every mid-gray -- would read as white;
- ``F`` (32-bit float): Pillow's rule, values on the 0..255 scale, clipped;
- with transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, a ``P`` image with a transparent index or an RGBA palette,
  an ``L``/``RGB``/16-bit image with a transparent colour): composited over ``BACKGROUND`` (white), so a transparent
  pixel reads as white and a half-transparent one as the blend, never as whatever colour hides under alpha 0.

Files are bounded before they are decoded: Pillow reads only the header in ``Image.open``, and ``open_image`` checks
that size against ``MAX_SIDE`` before it decodes a pixel. Pillow's own decompression-bomb check
(``Image.MAX_IMAGE_PIXELS``) fires earlier for a far larger header and becomes the same ``ImageError``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

MAX_SIDE = 8192  # pixels per side of an image file (an 8192 x 8192 RGBA image decodes to 256 MiB)
BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """A picture that cannot be used as it is: unreadable, too large, or of a mode that cannot become RGB."""


def check_size(img, max_side: int = MAX_SIDE) -> None:
    """Raise ``ImageError`` unless both sides of ``img`` (read from the header; nothing is decoded) lie in
    [1, ``max_side``]."""
    width, height = img.size
    if not (1 <= width <= max_side and 1 <= height <= max_side):
        raise ImageError(f"image is {width}x{height} pixels; at most {max_side}x{max_side} is accepted "
                         f"(resize it first)")


def to_rgb(img, *, background: tuple[int, int, int] = BACKGROUND):
    """A PIL image of any mode -> a new PIL image in mode ``RGB`` (uint8), by the rules in the module docstring.

    The size is checked (``check_size``) before the pixels are touched, so a lazily opened file is bounded before
    it is decoded. Raises ``ImageError``.
    """
    from PIL import Image

    check_size(img)
    transparency = img.info.get("transparency")
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64)  # [H, W]; I;16B arrives big-endian, astype reads it right
        gray = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
        if isinstance(transparency, int):  # a transparent 16-bit value (PNG tRNS)
            alpha = Image.fromarray(np.where(values == transparency, 0, 255).astype(np.uint8), "L")
            gray = Image.merge("LA", (gray, alpha))
        img, transparency = gray, None
    elif img.mode == "F":
        img, transparency = img.convert("L"), None
    try:
        palette_alpha = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
        if img.mode in _ALPHA_MODES or transparency is not None or palette_alpha:
            rgba = img.convert("RGBA")
            under = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(under, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot convert (e.g. premultiplied "La")
        raise ImageError(f"cannot convert an image of mode {img.mode!r} to RGB ({exc})") from None


def open_image(path, *, background: tuple[int, int, int] = BACKGROUND, name: str | None = None):
    """Read an image file (a path, or the file's bytes) as an RGB PIL image (``to_rgb``), its size checked before
    it is decoded. ``name`` is what messages call it (default: the path; ``"image"`` for bytes).

    Raises ``ImageError`` naming the file for a missing, unreadable, truncated, non-image or too large file.
    Pillow's ``DecompressionBombWarning`` (a header above ``Image.MAX_IMAGE_PIXELS``, below twice that) becomes an
    error only where the caller's warning filters make it one (the CLI does); the size bound refuses such a file
    either way.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, (bytes, bytearray, memoryview)):
        source, name = io.BytesIO(path), name or "image"
    else:
        source = Path(path)
        name = name or str(source)
    try:
        with Image.open(source) as img:  # reads the header only
            return to_rgb(img, background=background)
    except ImageError as exc:
        raise ImageError(f"cannot read image {name!r}: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"cannot read image {name!r}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name!r}: not an image file Pillow can identify") from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:  # missing, unreadable, truncated, corrupt
        raise ImageError(f"cannot read image {name!r}: {exc}") from None
