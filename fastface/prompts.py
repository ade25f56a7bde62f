"""Sequence layouts (Show-o): build the id tensors the transformer reads.

    t2i: <pad>… <t2i> <bos> text <eos> <soi> img_1 … img_N <eoi>     prompt left-padded to max_text_len
    mmu: <pad>… <mmu> <soi> img_1 … img_N <eoi> <bos> question       left-padded to the longest in the batch

Text diffusion (UniDiffuser, discrete): the text is a fixed-length block of T = max_text_len - 2 positions, a
caption then <eos> then <pad>s, whose tokens may be <mask>ed and decoded in parallel like image tokens. Inside the
block attention is bidirectional and its <pad>s are ordinary tokens (``fastface.model.omni_attention_mask`` with
``text_block``):

    joint:    <t2i> <bos> [block] <soi> img_1 … img_N <eoi>    p(text), p(image | text), p(image, text): the block
                                                              never sees the image (its keys/values are a prefix)
    describe: <mmu> <soi> img_1 … img_N <eoi> <bos> [block]    p(text | image): the image is a prefix of the block

Both are max_text_len + N + 2 long, as a t2i sequence.

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


def text_block_length(config: FaceConfig) -> int:
    """Positions of a text diffusion block: the t2i prompt's length less <t2i> and <bos>."""
    return config.max_text_len - 2


def caption_block(ids: list[int], config: FaceConfig) -> list[int]:
    """A caption's text ids -> the block ``caption <eos> <pad>…`` of ``text_block_length`` ids."""
    T = text_block_length(config)
    if len(ids) > T - 1:
        warnings.warn(f"fastface: caption of {len(ids)} tokens truncated to {T - 1} "
                      f"(max_text_len={config.max_text_len})", stacklevel=3)
        ids = ids[: T - 1]
    return [*ids, config.eos_id] + [config.pad_id] * (T - 1 - len(ids))


def block_text(block: list[int], config: FaceConfig) -> list[int]:
    """A decoded block -> its caption's text ids: the ids before the first <eos>, special tokens dropped."""
    specials = set(config.special_token_ids)
    out = []
    for t in block:
        if t == config.eos_id:
            break
        if t not in specials:
            out.append(int(t))
    return out


def joint_sequence(block_ids: torch.Tensor, image_ids: torch.Tensor, config: FaceConfig):
    """[B, T] block + [B, N] image ids (unified vocabulary) -> (ids [B, T + N + 4], text_block [B, T + N + 4])."""
    B, T = block_ids.shape
    dev = block_ids.device
    head = torch.tensor([config.t2i_id, config.bos_id], device=dev).expand(B, 2)
    ids = t2i_sequence(torch.cat([head, block_ids], dim=1), image_ids, config)
    block = torch.zeros_like(ids, dtype=torch.bool)
    block[:, 2 : 2 + T] = True
    return ids, block


def describe_sequence(image_ids: torch.Tensor, block_ids: torch.Tensor, config: FaceConfig):
    """[B, N] image ids (unified vocabulary) + [B, T] block -> (ids [B, N + T + 4], text_block [B, N + T + 4])."""
    B, N = image_ids.shape
    dev = image_ids.device

    def column(token):
        return torch.full((B, 1), token, dtype=torch.long, device=dev)

    ids = torch.cat([column(config.mmu_id), column(config.soi_id), image_ids, column(config.eoi_id),
                     column(config.bos_id), block_ids], dim=1)
    block = torch.zeros_like(ids, dtype=torch.bool)
    block[:, N + 4 :] = True
    return ids, block


__all__ = ["t2i_prompt_ids", "t2i_sequence", "mmu_prompt_ids", "text_block_length", "caption_block", "block_text",
           "joint_sequence", "describe_sequence"]
