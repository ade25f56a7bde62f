"""Sequence layouts (Show-o): build the id tensors the transformer reads.

    t2i: <pad>… <t2i> <bos> text <eos> <soi> img_1 … img_N <eoi>     prompt left-padded to max_text_len
    mmu: <pad>… <mmu> <soi> img_1 … img_N <eoi> <bos> question       left-padded to the longest in the batch

Prompts are padded to a fixed length (t2i) or on the left (mmu), and rotary positions count only non-pad
tokens, so a request computes the same values alone or in a batch. The special ids are the config's
(``FaceConfig.special_token_ids``): fastface's 0..7, or a converted checkpoint's own (Show-o's).
"""

from __future__ import annotations

import warnings

import torch

from fastface.config import FaceConfig


def t2i_prompt_ids(texts_ids: list[list[int]], config: FaceConfig) -> torch.Tensor:
    """Token ids of each prompt's text -> [B, max_text_len] left-padded ``<t2i> <bos> text <eos>``."""
    P = config.max_text_len
    rows = []
    for ids in texts_ids:
        if len(ids) > P - 3:
            warnings.warn(f"fastface: prompt of {len(ids)} tokens truncated to {P - 3} (max_text_len={P})",
                          stacklevel=3)
            ids = ids[: P - 3]
        body = [config.t2i_id, config.bos_id, *ids, config.eos_id]
        rows.append([config.pad_id] * (P - len(body)) + body)
    return torch.tensor(rows, dtype=torch.long)


def t2i_sequence(prompt_ids: torch.Tensor, image_ids: torch.Tensor, config: FaceConfig) -> torch.Tensor:
    """[B, P] prompt + [B, N] image ids (unified vocabulary) -> [B, P + N + 2] with <soi>/<eoi>."""
    B = prompt_ids.shape[0]
    soi = torch.full((B, 1), config.soi_id, dtype=torch.long, device=prompt_ids.device)
    eoi = torch.full((B, 1), config.eoi_id, dtype=torch.long, device=prompt_ids.device)
    return torch.cat([prompt_ids, soi, image_ids, eoi], dim=1)


def mmu_prompt_ids(image_tokens: torch.Tensor, questions_ids: list[list[int]], config: FaceConfig) -> torch.Tensor:
    """Codebook ids [B, N] + question ids -> [B, L] left-padded ``<mmu> <soi> img <eoi> <bos> question``."""
    offset = config.image_token_offset
    rows = []
    for img, q in zip(image_tokens.tolist(), questions_ids):
        rows.append([config.mmu_id, config.soi_id, *[t + offset for t in img], config.eoi_id, config.bos_id, *q])
    L = max(len(r) for r in rows)
    return torch.tensor([[config.pad_id] * (L - len(r)) + r for r in rows], dtype=torch.long)


__all__ = ["t2i_prompt_ids", "t2i_sequence", "mmu_prompt_ids"]
