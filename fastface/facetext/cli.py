"""``fastface search DIR "query" [--top K] [--json]``: rank the face images in a folder by how well a text
describes them (cosine of the face-text model's embeddings; the shipped face-s model unless ``--model FILE``).

Images are read as RGB (any mode Pillow reads; alpha over white) and resized to the model's 64x64; files that are
not images are skipped with a note on stderr. Several queries rank the folder once each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_IMAGES = 100_000


def add_arguments(p):
    p.add_argument("folder", metavar="DIR", help="folder of face images (searched recursively)")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="text describing the faces to find")
    p.add_argument("--top", type=int, default=5, metavar="K", help="images to list per query (default 5)")
    p.add_argument("--model", default=None, help="face-text model file (default: the shipped face-s one)")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def run(args) -> int:
    import torch

    from fastface.cli import CLIError
    from fastface.facetext.model import FaceTextModel
    from fastface.images import ImageError, open_image

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CLIError(f"{folder}: not a folder")
    if args.top < 1:
        raise CLIError(f"--top must be at least 1, got {args.top}")
    queries = [q.strip() for q in args.queries]
    if not all(queries):
        raise CLIError("a query is empty")
    try:
        model = FaceTextModel.load(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    files = image_files(folder)
    if len(files) > MAX_IMAGES:
        raise CLIError(f"{folder}: {len(files)} images; search at most {MAX_IMAGES} at a time")
    size = model.image_size
    names, arrays = [], []
    for f in files:
        try:
            img = open_image(f)
        except ImageError as exc:
            print(f"fastface search: skipped {exc}", file=sys.stderr)
            continue
        arrays.append(np.asarray(img.resize((size, size)) if img.size != (size, size) else img))
        names.append(str(f))
    if not arrays:
        raise CLIError(f"{folder}: no images to search ({', '.join(sorted(SUFFIXES))})")
    with torch.no_grad():
        scores = model.similarity(np.stack(arrays), queries)  # [I, Q]
    k = min(args.top, len(names))
    result = []
    for q, query in enumerate(queries):
        top = torch.topk(scores[:, q], k)
        result.append({"query": query, "results": [{"image": names[i], "score": round(float(s), 4)}
                                                   for s, i in zip(top.values.tolist(), top.indices.tolist())]})
    if args.json:
        print(json.dumps(result if len(queries) > 1 else result[0], indent=2))
    else:
        for r in result:
            if len(queries) > 1:
                print(f"# {r['query']}")
            for row in r["results"]:
                print(f"{row['score']:.4f}  {row['image']}")
    return 0
