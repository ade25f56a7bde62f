"""Face-world datasets: samples and stacked arrays, deterministic per (seed, index); the face-world CLI.

    data = make_dataset(1000, seed=0)              # stacked arrays, deterministic per seed
    face = make_sample(0, 7)                       # sample 7 of dataset 0 alone (the same face)

    python -m fastface.data.dataset --grid grid.png --seed 0   # a 4x4 sample grid, captions printed
    python -m fastface.data.dataset --bench                    # generator throughput
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from fastface.data.attributes import ATTRIBUTES, N_IDENTITIES, sample_attributes
from fastface.data.renderer import IMAGE_SIZE, LANDMARKS, FaceSample, render
from fastface.data.text import caption


def sample_seed(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of dataset ``seed`` (samples are independent of each other)."""
    return np.random.default_rng([int(seed), int(index)])


def make_sample(seed: int, index: int, *, n_identities: int = N_IDENTITIES, identity_offset: int = 0,
                makeup: bool = True) -> FaceSample:
    """Sample ``index`` of the dataset ``seed``: attributes, pose and lighting all follow (seed, index)."""
    rng = sample_seed(seed, index)
    attrs = sample_attributes(rng, n_identities=n_identities, identity_offset=identity_offset)
    return render(attrs, makeup=makeup, seed=int(rng.integers(2**31)))


def make_dataset(n: int, seed: int = 0, *, n_identities: int = N_IDENTITIES, identity_offset: int = 0,
                 captions: bool = True, start: int = 0) -> dict:
    """Render ``n`` faces (samples ``start`` … ``start + n - 1`` of dataset ``seed``) as stacked arrays.

    Returns a dict: ``images`` uint8 [n, 64, 64, 3], ``parsing`` uint8 [n, 64, 64], ``landmarks`` float32
    [n, 5, 2], ``identity`` int64 [n], ``labels`` int64 [n, len(ATTRIBUTES)] (value indices in ``ATTRIBUTES``
    order), ``attrs`` (list of FaceAttributes) and, with ``captions=True``, ``captions`` (list of str; each
    caption drawn from the sample's own generator after rendering).

    Speed: about 550 faces/s per core in CPU time (1.8 ms per face with its caption; PIL 13, this 2-core box;
    ``python -m fastface.data.dataset --bench`` measures it).
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    parsing = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    landmarks = np.empty((n, len(LANDMARKS), 2), np.float32)
    labels = np.empty((n, len(ATTRIBUTES)), np.int64)
    identity = np.empty((n,), np.int64)
    attrs_list, caps = [], []
    for i in range(n):
        rng = sample_seed(seed, start + i)
        attrs = sample_attributes(rng, n_identities=n_identities, identity_offset=identity_offset)
        face = render(attrs, seed=int(rng.integers(2**31)))
        images[i], parsing[i], landmarks[i] = face.image, face.parsing, face.landmarks
        labels[i] = attrs.labels()
        identity[i] = attrs.identity
        attrs_list.append(attrs)
        if captions:
            caps.append(caption(attrs, rng))
    out = {"images": images, "parsing": parsing, "landmarks": landmarks, "identity": identity, "labels": labels,
           "attrs": attrs_list}
    if captions:
        out["captions"] = caps
    return out


def save_grid(path, n: int = 16, seed: int = 0, *, cols: int = 4, upscale: int = 4, captions: bool = False):
    """Write a grid of ``n`` faces from dataset ``seed`` (nearest-upscaled) as a PNG; returns the dataset."""
    data = make_dataset(n, seed)
    rows = math.ceil(n / cols)
    cell = IMAGE_SIZE * upscale
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i in range(n):
        tile = Image.fromarray(data["images"][i]).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    grid.save(path)
    if captions:
        for i, text in enumerate(data["captions"]):
            print(f"[{i // cols},{i % cols}] {text}")
    return data


def _main(argv=None):
    import argparse
    import time

    parser = argparse.ArgumentParser(description="face world: sample grid and generator throughput")
    parser.add_argument("--grid", help="write a 4x4 sample grid PNG here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench", action="store_true", help="measure faces/s on one core")
    args = parser.parse_args(argv)
    if args.grid:
        save_grid(args.grid, 16, args.seed, captions=True)
    if args.bench:
        make_dataset(50, seed=1)
        n = 1000
        t0, c0 = time.perf_counter(), time.process_time()
        make_dataset(n, seed=2)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        print(f"make_dataset: {n / dc:.0f} faces/s per core (CPU time), {n / dt:.0f} faces/s wall "
              f"({1e3 * dc / n:.2f} ms CPU per face, with captions)")


if __name__ == "__main__":
    _main()
