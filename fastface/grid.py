"""Image grids and output file names."""

from __future__ import annotations

import math
from pathlib import Path


def image_grid(images, columns: int | None = None, pad: int = 2):
    """Tile PIL images (all the same size) into one image, row-major."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def output_paths(path: Path, count: int) -> list[Path]:
    """``face.png`` for one image; ``face-1.png``, ``face-2.png``, … for several."""
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]
