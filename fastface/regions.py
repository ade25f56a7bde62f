"""Image regions for editing: a named part of the face, a pixel mask, or a token mask -> the image tokens to re-draw.

    region_names()                                  # "face", "hair", "eyes", "mouth", "background", ...
    token_region(pixel_mask, grid=16)               # bool [S, S] pixels -> bool [grid * grid] tokens
    resolve_region("hair", parsing, grid=16)        # a name, read from a parsing map (``Perceptor.perceive``)

A name covers one or more classes of the parsing map (the face world's ``PARSING_CLASSES``; the perception model
predicts the same classes). A token is in a region when any pixel of its patch is (an image token covers
``S / grid`` x ``S / grid`` pixels), so a region is never thinner than its pixels; ``grow`` adds that many tokens
around it (a softer seam: the image tokenizer's decoder blends neighbouring tokens).
"""

from __future__ import annotations

import numpy as np
import torch

from fastface.data.renderer import PARSING_CLASSES

# name -> parsing classes it covers
REGIONS: dict[str, tuple[str, ...]] = {
    "face": ("skin", "brows", "eyes", "nose", "lips", "glasses"),
    "hair": ("hair",),
    "eyes": ("eyes", "brows"),
    "brows": ("brows",),
    "nose": ("nose",),
    "mouth": ("lips",),
    "skin": ("skin",),
    "glasses": ("glasses",),
    "accessories": ("accessories",),
    "clothes": ("clothes",),
    "background": ("background",),
}
MAX_GROW = 64


def region_names() -> list[str]:
    return list(REGIONS)


def pixel_region(parsing: np.ndarray, name: str, classes=PARSING_CLASSES) -> np.ndarray:
    """bool [S, S]: the pixels of a parsing map (uint8 [S, S], indices into ``classes``) inside region ``name``."""
    if name not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {name!r}")
    wanted = [classes.index(c) for c in REGIONS[name] if c in classes]
    return np.isin(np.asarray(parsing), wanted)


def token_region(pixel_mask, grid: int, grow: int = 0) -> torch.Tensor:
    """bool [S, S] pixel mask -> bool [grid * grid]: the tokens whose patch holds a pixel of the mask, grown by
    ``grow`` tokens (8-neighbourhood)."""
    mask = np.asarray(pixel_mask)
    if mask.dtype != np.bool_ or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"a pixel region must be a square bool array [S, S], got {mask.dtype} {mask.shape}")
    S = mask.shape[0]
    if S % grid:
        raise ValueError(f"a pixel region of {S}x{S} does not split into {grid}x{grid} image tokens")
    p = S // grid
    tokens = torch.from_numpy(mask.reshape(grid, p, grid, p).any(axis=(1, 3)).copy())
    return grow_tokens(tokens, grow).reshape(-1)


def grow_tokens(tokens: torch.Tensor, grow: int) -> torch.Tensor:
    """bool [g, g] -> the same grown by ``grow`` tokens in every direction (a max-pool)."""
    if isinstance(grow, bool) or not isinstance(grow, int) or not 0 <= grow <= MAX_GROW:
        raise ValueError(f"grow must be an int in [0, {MAX_GROW}], got {grow!r}")
    if grow == 0:
        return tokens
    x = tokens.float()[None, None]
    return torch.nn.functional.max_pool2d(x, 2 * grow + 1, stride=1, padding=grow)[0, 0] > 0


def resolve_region(region, grid: int, *, parsing=None, classes=PARSING_CLASSES, grow: int = 0) -> torch.Tensor:
    """A region as a user gives it -> bool [grid * grid] token mask.

    region : a name in ``REGIONS`` (needs ``parsing``, uint8 [S, S]); a bool pixel mask [S, S] (S > grid); or a bool
        token mask [grid * grid] or [grid, grid] (numpy or torch)
    """
    N = grid * grid
    if isinstance(region, str):
        if parsing is None:
            raise ValueError(f"region {region!r} is a name: it needs the image's parsing map")
        return token_region(pixel_region(parsing, region, classes), grid, grow)
    if isinstance(region, torch.Tensor):
        region = region.detach().cpu().numpy()
    if not isinstance(region, np.ndarray):
        raise TypeError(f"region must be a name ({', '.join(REGIONS)}), or a bool mask of pixels [S, S] or tokens "
                        f"[{N}] / [{grid}, {grid}], got {type(region).__name__}")
    if region.dtype != np.bool_:
        raise TypeError(f"a region mask must be bool, got {region.dtype}")
    if region.shape in ((N,), (grid, grid)):
        return grow_tokens(torch.from_numpy(region.reshape(grid, grid).copy()), grow).reshape(-1)
    if region.ndim == 2 and region.shape[0] == region.shape[1] and region.shape[0] > grid:
        return token_region(region, grid, grow)
    raise ValueError(f"a region mask must have shape [{N}] or [{grid}, {grid}] (tokens) or [S, S] (pixels), got "
                     f"{region.shape}")


__all__ = ["REGIONS", "region_names", "pixel_region", "token_region", "grow_tokens", "resolve_region"]
