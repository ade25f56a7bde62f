"""Training: t2i with the D3Diff loss and mmu with the next-token loss, in mixed batches.

    fastface train --preset face-s --steps 3000 --batch-size 32 --out runs/face-s
    torchrun --nproc-per-node 2 -m fastface.train --preset tiny --steps 10 --out runs/tiny   # data parallel

Determinism: the global batch of step s (which examples, their captions and questions, mask ratios and
masked positions, cond dropout, the Noise expert's draws) is a function of (seed, s) only. Each rank takes
a fixed slice of the global batch, losses are sums divided by global counts, and gradients are summed
across ranks, so P processes follow the same loss curve as one process on the same global batch, and a run
resumed from a checkpoint continues exactly as the uninterrupted run.

Checkpoints: ``<out>/step-XXXXXXX/`` holds a loadable model checkpoint (fastface.checkpoint) plus
``optimizer.safetensors`` and ``trainer.json``; directories are written under a temporary name and renamed,
and ``<out>/latest`` names the newest complete one. No pickle anywhere. A kill at any moment leaves every
renamed step folder complete: ``latest`` is updated after the rename and old folders are pruned after that, a
failed write removes its own temporary folder, a resume takes the newest complete step folder (saying so when
``latest`` is missing, damaged or behind), pruning never touches a folder newer than the one just written, and a
fresh start (``resume=False``) refuses a directory that holds checkpoints unless told to delete them first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastface import ops
from fastface.checkpoint import load_checkpoint, read_config, save_checkpoint
from fastface.checks import (
    arg_finite_float,
    arg_nonnegative_float,
    arg_nonnegative_int,
    arg_positive_float,
    arg_positive_int,
    check_bounded,
    check_int,
)
from fastface.config import SPECIAL_TOKENS, FaceConfig
from fastface.data.training import QA_PER_EXAMPLE
from fastface.loss import mask_ratio_schedule, next_token_loss
from fastface.lr_schedule import lr_at
from fastface.model import FaceTransformer, default_cond_mask
from fastface.prompts import (
    caption_block,
    describe_sequence,
    joint_sequence,
    t2i_prompt_ids,
    t2i_sequence,
    text_block_length,
)
from fastface.weights import CheckpointError, atomic_write, write_json

DEFAULT_EMBEDDER = Path(__file__).parent / "assets" / "face-s" / "facetext.safetensors"

# ------------------------------------------------------------------------------------------------ data


class SyntheticData:
    """Random image tokens with random captions and QA pairs: a data source for tests and smoke runs."""

    def __init__(self, config: FaceConfig, size: int = 64, seed: int = 0, embeddings: bool = False):
        gen = torch.Generator().manual_seed(seed)
        self.config = config
        self.images = torch.randint(0, config.codebook_size, (size, config.image_tokens), generator=gen)
        lo, hi = 8, config.text_vocab_size
        self.captions = [torch.randint(lo, hi, (int(torch.randint(2, 8, (1,), generator=gen)),),
                                       generator=gen).tolist() for _ in range(size)]
        self.qa = [[(torch.randint(lo, hi, (3,), generator=gen).tolist(), [int(self.images[i, 0]) % (hi - lo) + lo])]
                   for i in range(size)]
        self.e_sem = self.e_id = None
        if embeddings:
            self.e_sem = torch.nn.functional.normalize(torch.randn(size, config.sem_dim, generator=gen), dim=1)
            self.e_id = torch.nn.functional.normalize(torch.randn(size, config.id_dim, generator=gen), dim=1)

    def __len__(self):
        return len(self.images)

    def t2i_example(self, index: int, gen: torch.Generator):
        return self.captions[index], self.images[index]

    def mmu_example(self, index: int, gen: torch.Generator):
        return self.images[index], self.qa[index]

    def embeddings(self, index: int):
        """Random unit (e_sem, e_id) per example when built with ``embeddings=True`` (tests), else None."""
        return None if self.e_sem is None else (self.e_sem[index], self.e_id[index])


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    task: torch.Tensor  # [B]
    cond_mask: torch.Tensor  # [B, L]
    # rows with an image loss: t2i rows, then joint rows (both end with <soi> img <eoi>)
    t2i_rows: torch.Tensor  # [Bt] row indices
    image_start: int  # column of img_1 in a t2i row
    masked: torch.Tensor  # [Bt, N] bool
    targets: torch.Tensor  # [Bt, N] codebook ids
    mask_ratio: torch.Tensor  # [Bt]
    # mmu
    mmu_rows: torch.Tensor  # [Bm]
    next_targets: torch.Tensor  # [Bm, L] next-token targets
    answer_mask: torch.Tensor  # [Bm, L] positions whose next token is an answer token or its <eos>
    # understanding embeddings (data with an embedder): [B, sem_dim] / [B, id_dim], zero rows for t2i rows (the
    # generation group's experts read neither)
    e_sem: torch.Tensor | None = None
    e_id: torch.Tensor | None = None
    t2i_text: list | None = None  # [Bt] the caption ids of each t2i row ([] when dropped for guidance, or masked)
    # text diffusion rows (joint and describe; ``fastface.prompts``): the block's place, mask and clean ids
    text_block: torch.Tensor | None = None  # [B, L] bool, None when no row has a block
    text_rows: torch.Tensor | None = None  # [Bx]
    text_start: torch.Tensor | None = None  # [Bx] column of the block's first position
    text_masked: torch.Tensor | None = None  # [Bx, T] bool
    text_targets: torch.Tensor | None = None  # [Bx, T] text ids
    text_ratio: torch.Tensor | None = None  # [Bx] mask ratio of the block


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + salt)


def mmu_sequence(image_tokens, qa, config: FaceConfig):
    """``<mmu> <soi> img <eoi>`` then ``<bos> q a <eos>`` per pair -> (ids, is_answer, is_cond) lists."""
    ids = [config.mmu_id, config.soi_id, *[int(t) + config.image_token_offset for t in image_tokens], config.eoi_id]
    is_answer = [False] * len(ids)
    is_cond = [True] * len(ids)
    for q, a in qa:
        ids += [config.bos_id, *q]
        is_answer += [False] * (len(q) + 1)
        is_cond += [True] * (len(q) + 1)
        ids += [*a, config.eos_id]
        is_answer += [True] * (len(a) + 1)
        is_cond += [False] * (len(a) + 1)
    return ids, is_answer, is_cond


def random_mask(n: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """[n] bool with max(1, round(n * ratio)) True positions drawn at random."""
    masked = torch.zeros(n, dtype=torch.bool)
    masked[torch.randperm(n, generator=gen)[: max(1, round(n * ratio))]] = True
    return masked


def _masked_image(image, config: FaceConfig, gen: torch.Generator):
    """(clean codebook ids [N], mask [N], ratio) of an image at a D3Diff mask level drawn from ``gen``."""
    N = config.image_tokens
    m = float(mask_ratio_schedule(torch.rand(1, generator=gen), N))
    return torch.as_tensor(image, dtype=torch.long), random_mask(N, m, gen), m


def _masked_block(caption: list[int], config: FaceConfig, gen: torch.Generator, drop: float):
    """(clean block [T], mask [T], ratio) of a caption's text block at its own mask level: with probability
    ``drop`` every position is masked (the text's "fully noised" level: the unconditional of the other modality)."""
    T = text_block_length(config)
    block = torch.tensor(caption_block(caption, config), dtype=torch.long)
    if float(torch.rand(1, generator=gen)) < drop:
        return block, torch.ones(T, dtype=torch.bool), 1.0
    m = float(mask_ratio_schedule(torch.rand(1, generator=gen), T))
    return block, random_mask(T, m, gen), m


def make_batch(data, config: FaceConfig, *, seed: int, step: int, batch_size: int, mmu_fraction: float,
               rank: int = 0, world: int = 1, text_diffusion: float = 0.0) -> Batch:
    """This rank's slice of the global batch of ``step``: rows rank, rank + world, … of the global batch.

    A share ``text_diffusion`` of the rows are text diffusion rows (UniDiffuser): half joint rows -- text block and
    image each masked at its own level (the block fully masked with probability ``cond_dropout``), loss on both --
    and half describe rows -- a clean image (fully masked with probability ``cond_dropout``, its embeddings then
    absent) and a masked block, loss on the block. The other rows are t2i and mmu rows as before (``mmu_fraction``).
    """
    gen = step_generator(seed, step)
    index = torch.randint(0, len(data), (batch_size,), generator=gen).tolist()
    is_mmu = (torch.rand(batch_size, generator=gen) < mmu_fraction).tolist()
    kind = ["mmu" if m else "t2i" for m in is_mmu]
    if text_diffusion > 0:  # its own generator: at 0 nothing is drawn and older runs replay exactly
        g_kind = step_generator(seed + 7_919, step, salt=7)
        draws = torch.rand(2, batch_size, generator=g_kind).tolist()
        kind = [("describe" if d < 0.5 else "joint") if x < text_diffusion else k
                for k, x, d in zip(kind, *draws)]
    N, off, mask_id = config.image_tokens, config.image_token_offset, config.mask_token_id
    block_example = getattr(data, "block_example", data.t2i_example)  # the caption a text block holds
    rows_t2i, rows_mmu, rows_joint, rows_describe = [], [], [], []
    for row in range(rank, batch_size, world):
        g = step_generator(seed, step, salt=1 + row)  # per-example randomness, independent of the rank
        if kind[row] == "mmu":
            image, qa = data.mmu_example(index[row], g)
            rows_mmu.append((*mmu_sequence(image, qa, config), index[row]))
        elif kind[row] == "t2i":
            caption, image = data.t2i_example(index[row], g)
            if float(torch.rand(1, generator=g)) < config.cond_dropout:
                caption = []
            rows_t2i.append((caption, *_masked_image(image, config, g)))
        elif kind[row] == "joint":
            caption, image = block_example(index[row], g)
            rows_joint.append((_masked_block(caption, config, g, config.cond_dropout), _masked_image(image, config, g)))
        else:
            caption, image = block_example(index[row], g)
            blank = float(torch.rand(1, generator=g)) < config.cond_dropout
            rows_describe.append((_masked_block(caption, config, g, 0.0), torch.as_tensor(image, dtype=torch.long),
                                  blank, index[row]))
    seqs, tasks, conds, blocks = [], [], [], []
    masked_t, targets_t, ratio_t = [], [], []
    prompts = t2i_prompt_ids([c for c, *_ in rows_t2i], config) if rows_t2i else None
    for i, (_, image, masked, m) in enumerate(rows_t2i):
        img_ids = torch.where(masked, torch.full_like(image, mask_id), image + off)
        seq = t2i_sequence(prompts[i : i + 1], img_ids[None], config)[0]
        seqs.append(seq.tolist())
        tasks.append(1)
        conds.append((torch.arange(seq.shape[0]) < config.max_text_len) & (seq != config.pad_id))
        blocks.append(None)
        masked_t.append(masked)
        targets_t.append(image)
        ratio_t.append(m)
    text_t = []  # (block, mask, ratio) of every text diffusion row, in row order
    for (block, bmask, bm), (image, masked, m) in rows_joint:
        img_ids = torch.where(masked, torch.full_like(image, mask_id), image + off)
        seq, in_block = joint_sequence(torch.where(bmask, mask_id, block)[None], img_ids[None], config)
        seqs.append(seq[0].tolist())
        tasks.append(1)
        conds.append(default_cond_mask(seq, torch.ones(1, dtype=torch.long), pad_id=config.pad_id,
                                       soi_id=config.soi_id, text_block=in_block)[0])
        blocks.append(in_block[0])
        masked_t.append(masked)
        targets_t.append(image)
        ratio_t.append(m)
        text_t.append((block, bmask, bm))
    answer_rows = []
    for ids, is_answer, is_cond, _ in rows_mmu:
        seqs.append(ids)
        tasks.append(0)
        conds.append(torch.tensor(is_cond))
        blocks.append(None)
        answer_rows.append(torch.tensor(is_answer))
    for (block, bmask, bm), image, blank, _ in rows_describe:
        img_ids = torch.full_like(image, mask_id) if blank else image + off
        seq, in_block = describe_sequence(img_ids[None], torch.where(bmask, mask_id, block)[None], config)
        seqs.append(seq[0].tolist())
        tasks.append(0)
        conds.append(default_cond_mask(seq, torch.zeros(1, dtype=torch.long), pad_id=config.pad_id,
                                       soi_id=config.soi_id, text_block=in_block)[0])
        blocks.append(in_block[0])
        text_t.append((block, bmask, bm))
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), config.pad_id, dtype=torch.long)
    cond_mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    text_block = torch.zeros(len(seqs), L, dtype=torch.bool) if text_t else None
    for r, (s, c, blk) in enumerate(zip(seqs, conds, blocks)):
        input_ids[r, L - len(s):] = torch.tensor(s)
        cond_mask[r, L - len(s):] = c
        if blk is not None:
            text_block[r, L - len(s):] = blk
    Bt, Bj, Bm = len(rows_t2i), len(rows_joint), len(rows_mmu)
    image_rows = Bt + Bj
    mmu_rows = torch.arange(image_rows, image_rows + Bm)
    next_targets = torch.full((Bm, L), config.pad_id, dtype=torch.long)
    answer_mask = torch.zeros(Bm, L, dtype=torch.bool)
    for j, is_answer in enumerate(answer_rows):
        ids = input_ids[image_rows + j]
        next_targets[j, :-1] = ids[1:]
        full = torch.zeros(L, dtype=torch.bool)
        full[L - len(is_answer):] = is_answer
        answer_mask[j, :-1] = full[1:]  # position p predicts token p + 1
    e_sem = e_id = None
    faces = [(image_rows + j, face, False) for j, (*_, face) in enumerate(rows_mmu)]
    faces += [(image_rows + Bm + j, face, blank) for j, (_, _, blank, face) in enumerate(rows_describe)]
    if faces and getattr(data, "embeddings", None) is not None and data.embeddings(faces[0][1]) is not None:
        e_sem = torch.zeros(len(seqs), config.sem_dim)
        e_id = torch.zeros(len(seqs), config.id_dim)
        for r, face, blank in faces:
            if not blank:  # a fully masked image has no embeddings: its sequence experts act as Copy
                e_sem[r], e_id[r] = data.embeddings(face)
    text_fields = {}
    if text_t:
        text_rows = torch.cat([torch.arange(Bt, image_rows), torch.arange(image_rows + Bm, len(seqs))])
        text_fields = dict(
            text_block=text_block, text_rows=text_rows,
            text_start=text_block[text_rows].float().argmax(dim=1),
            text_masked=torch.stack([m for _, m, _ in text_t]), text_targets=torch.stack([b for b, _, _ in text_t]),
            text_ratio=torch.tensor([r for *_, r in text_t], dtype=torch.float32))
    return Batch(
        e_sem=e_sem, e_id=e_id, t2i_text=[list(c) for c, *_ in rows_t2i] + [[] for _ in rows_joint],
        input_ids=input_ids, task=torch.tensor(tasks, dtype=torch.long), cond_mask=cond_mask,
        t2i_rows=torch.arange(image_rows), image_start=L - N - 1,
        masked=torch.stack(masked_t) if image_rows else torch.zeros(0, N, dtype=torch.bool),
        targets=torch.stack(targets_t) if image_rows else torch.zeros(0, N, dtype=torch.long),
        mask_ratio=torch.tensor(ratio_t, dtype=torch.float32), mmu_rows=mmu_rows, next_targets=next_targets,
        answer_mask=answer_mask, **text_fields,
    )


# ------------------------------------------------------------------------------------------------ loss


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


class SemanticConsistency:
    """UniDiff's reciprocal semantic consistency (RSC) for text-to-image rows: the face-text embedding of the image
    the model predicts is pulled toward its prompt's, so that fine-tuning on few pairs keeps images faithful to
    their text. Training only: inference never runs it (the model has no extra parameter).

    The predicted image is differentiable: each masked position's softmax over the codebook mixes the code vectors
    (known positions keep their own code), the mix is l2-normalised (codes are unit vectors) and decoded by the
    frozen image tokenizer; the frozen face-text model embeds the pixels. Loss: the mean of 1 - cos(image, prompt)
    over rows with a prompt (rows whose caption was dropped for guidance have none).
    """

    def __init__(self, image_tokenizer, embedder, config: FaceConfig):
        import copy

        if image_tokenizer is None or not hasattr(image_tokenizer, "decode_latents"):
            raise ValueError("rsc needs the run's image tokenizer (a fastface VQ model)")
        if embedder is None:
            raise ValueError("rsc needs a face-text model (--embedder)")
        if image_tokenizer.config.codebook_size != config.codebook_size:
            raise ValueError(f"rsc: the image tokenizer has {image_tokenizer.config.codebook_size} codes, the model "
                             f"{config.codebook_size}")
        if embedder.config.vocab_size != config.text_vocab_size:
            raise ValueError(f"rsc: the face-text model reads {embedder.config.vocab_size} text ids, the model "
                             f"{config.text_vocab_size}")
        self.vq = copy.deepcopy(image_tokenizer).eval().requires_grad_(False)
        self.tower = copy.deepcopy(embedder._fast).eval().requires_grad_(False)
        self.head = copy.deepcopy(embedder.model).eval().requires_grad_(False)
        self.max_text_len = embedder.config.max_text_len
        self.grid = image_tokenizer.config.grid

    def __call__(self, image_logits: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """image logits [Bt, N, K] of the t2i rows -> the RSC loss (None when no row has a prompt)."""
        from fastface.facetext.model import pad_ids, tower_features

        rows = [i for i, t in enumerate(batch.t2i_text or []) if t]
        if not rows:
            return None
        rows_t = torch.tensor(rows)
        probs = torch.softmax(image_logits[rows_t].float(), dim=-1)  # [R, N, K]
        known = F.one_hot(batch.targets[rows_t], probs.shape[-1]).float()
        probs = torch.where(batch.masked[rows_t, :, None], probs, known)
        codes = F.normalize(probs @ self.vq.quantizer.codebook.float(), dim=-1)  # [R, N, D]
        pixels = self.vq.decode_latents(codes.view(len(rows), self.grid, self.grid, -1))  # [-1, 1]
        x = ((pixels.clamp(-1, 1) + 1) / 2 - self.tower.pixel_mean) / self.tower.pixel_std
        image = self.head.embed_features(tower_features(self.tower, x))
        with torch.no_grad():
            text = self.head.text(*pad_ids([batch.t2i_text[i] for i in rows], self.max_text_len))
        return (1 - (image * text).sum(-1)).mean()


def batch_loss(model, batch: Batch, config: FaceConfig, *, loss_backend="reference", autocast=False, rsc=None,
               rsc_weight: float = 0.0):
    """(loss to backpropagate, dict of float32 statistics). Sums divided by global (all-rank) counts. ``rsc`` (a
    ``SemanticConsistency``) adds ``rsc_weight`` x its loss on the t2i rows."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(batch.input_ids, batch.task, cond_mask=batch.cond_mask, e_sem=batch.e_sem, e_id=batch.e_id,
                    text_block=batch.text_block)
    logits = out.logits
    K, off, N = config.codebook_size, config.image_token_offset, config.image_tokens
    text_masked = batch.text_masked if batch.text_masked is not None else torch.zeros(0, 1, dtype=torch.bool)
    counts = all_reduce_sum(torch.tensor([float(batch.masked.sum()), float(batch.answer_mask.sum()),
                                          float(batch.input_ids.shape[0]), float(text_masked.sum())]))
    n_masked, n_answer, n_rows, n_text = counts.clamp(min=1).tolist()
    loss = logits.new_zeros((), dtype=torch.float32)
    stats = {}
    if len(batch.t2i_rows):
        img_logits = logits[batch.t2i_rows, batch.image_start : batch.image_start + N, off : off + K]  # [Bt, N, K]
        sel = batch.masked
        ratio = batch.mask_ratio[:, None].expand(-1, N)[sel]
        per_row = ops.d3diff_loss(img_logits[sel].float(), batch.targets[sel], ratio, alpha=config.d3diff_alpha,
                                  reduction="none", r_max=config.d3diff_r_max, backend=loss_backend)
        t2i_loss = per_row.sum() / n_masked
        loss = loss + t2i_loss
        stats["t2i"] = float(t2i_loss.detach())
        if rsc is not None and rsc_weight > 0:
            rsc_loss = rsc(img_logits, batch)
            if rsc_loss is not None:
                loss = loss + rsc_weight * rsc_loss
                stats["rsc"] = float(rsc_loss.detach())
    if batch.text_rows is not None and len(batch.text_rows):
        # the D3Diff loss over the text vocabulary at the blocks' masked positions, each row at its own level. The
        # text logits enter it normalised (log-softmax over the text vocabulary), so its score term is r * CE, a
        # time weighting: unnormalised, the score term's pull toward self-normalised logits fights the scale the
        # autoregressive head already has (a face-s fine-tune measured the text loss at 172 and the understanding
        # loss rising from 0.35 to 15 within 10 steps). Sampling normalises anyway, so nothing else changes.
        T = batch.text_masked.shape[1]
        columns = batch.text_start[:, None] + torch.arange(T)  # [Bx, T]
        text_logits = logits[batch.text_rows[:, None], columns, : config.text_vocab_size]  # [Bx, T, V_text]
        sel = batch.text_masked
        ratio = batch.text_ratio[:, None].expand(-1, T)[sel]
        per_pos = ops.d3diff_loss(torch.log_softmax(text_logits[sel].float(), dim=-1), batch.text_targets[sel], ratio,
                                  alpha=config.d3diff_alpha, reduction="none", r_max=config.d3diff_r_max,
                                  backend=loss_backend)
        text_loss = per_pos.sum() / n_text
        loss = loss + text_loss
        stats["text"] = float(text_loss.detach())
    if len(batch.mmu_rows):
        mmu_logits = logits[batch.mmu_rows]
        # next_token_loss is a mean over this rank's answer tokens; rescale to the global count
        local = float(batch.answer_mask.sum())
        mmu_loss = next_token_loss(mmu_logits, batch.next_targets, batch.answer_mask) * local / n_answer
        loss = loss + mmu_loss
        stats["mmu"] = float(mmu_loss.detach())
    aux = config.router_aux_loss_coef * out.aux_loss * batch.input_ids.shape[0] / n_rows
    loss = loss + aux
    stats["aux"] = float(aux.detach())
    return loss, stats


# -------------------------------------------------------------------------------------- optimiser state


EMBEDDING_PROJECTIONS = ("seq_moe.sem_proj.", "seq_moe.id_proj.")


def make_optimizer(model, lr: float, weight_decay: float, embedding_lr_scale: float = 1.0):
    """AdamW: weight decay on matrices (not embeddings); the sequence experts' projections of e_sem/e_id
    (W_s, W_id) get their own group at ``embedding_lr_scale`` x the learning rate (group key ``lr_scale``)."""
    proj = lambda n: any(k in n for k in EMBEDDING_PROJECTIONS)  # noqa: E731
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n and not proj(n)]
    other = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n) and not proj(n)]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": other, "weight_decay": 0.0, "lr_scale": 1.0}]
    projections = [p for n, p in named if proj(n)]
    if projections:
        groups.append({"params": projections, "weight_decay": weight_decay, "lr_scale": float(embedding_lr_scale)})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def optimizer_tensors(model, optimizer) -> tuple[dict, dict]:
    """AdamW state as named tensors (safetensors) plus JSON-able scalars."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, scalars = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            name = names[id(p)]
            tensors[f"{name}.exp_avg"] = state["exp_avg"].contiguous()
            tensors[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
            scalars[name] = float(state["step"])
    return tensors, scalars


def load_optimizer_tensors(model, optimizer, tensors: dict, scalars: dict):
    for name, p in model.named_parameters():
        if name not in scalars:
            continue
        optimizer.state[p] = {
            "step": torch.tensor(scalars[name]),
            "exp_avg": tensors[f"{name}.exp_avg"].clone(),
            "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].clone(),
        }


def write_run_state(out: Path, model, optimizer, step: int, settings: dict, config: dict, **extra) -> None:
    """A small model's run state: ``state.safetensors`` (weights ``model.*``, AdamW moments ``adam.*``) and
    ``state.json`` (step, settings, config, AdamW step counts, ``extra``), each written atomically."""
    from safetensors.torch import save_file

    tensors, scalars = optimizer_tensors(model, optimizer)
    tensors = {**{f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
               **{f"adam.{k}": v for k, v in tensors.items()}}
    atomic_write(out / "state.safetensors", lambda p: save_file(tensors, str(p)))
    write_json(out / "state.json", {"step": step, "adam_steps": scalars, "settings": settings, "config": config,
                                    **extra})


def read_run_state(out: Path, model, optimizer, settings: dict | None, defaults: dict | None, log=print) -> int:
    """Load the state ``write_run_state`` left in ``out`` into ``model`` (and ``optimizer`` when given) -> the
    step it reached (0 when ``out`` holds none). With ``settings``, the run's stored settings must equal them
    (a field added since the run started counts at its value in ``defaults``)."""
    from safetensors.torch import load_file

    if not (out / "state.json").is_file():
        return 0
    meta = json.loads((out / "state.json").read_text())
    if settings is not None:
        wanted = json.loads(json.dumps(settings))
        stored = {**json.loads(json.dumps(defaults or {})), **meta["settings"]}
        stored = {k: v for k, v in stored.items() if k in wanted}
        if stored != wanted:
            raise ValueError(f"{out}: its run was started with other settings: {meta['settings']}")
    tensors = load_file(str(out / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        load_optimizer_tensors(model, optimizer, {k[5:]: v for k, v in tensors.items() if k.startswith("adam.")},
                               meta["adam_steps"])
        log(f"resumed {out} at step {meta['step']}")
    return int(meta["step"])


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (checkpoints in the way, none complete, a failed write)."""


STEP_DIR = re.compile(r"step-(\d+)")
TEMPORARY = re.compile(r"\.(?:step-\d+|latest)\.tmp-(\d+)(?:-[0-9a-f]+)?")  # written by save_train_state


def step_dirs(out: Path) -> list[tuple[int, Path]]:
    """The ``step-N`` folders of ``out`` as (N, path), oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := STEP_DIR.fullmatch(p.name))
             and p.is_dir() and not p.is_symlink()]
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete training checkpoint, or None when it is (its files exist, its JSON parses)."""
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"trainer.json: {exc}"
    step = STEP_DIR.fullmatch(path.name)
    if not isinstance(meta, dict) or not isinstance(meta.get("adam_steps"), dict) or \
            step is None or meta.get("step") != int(step.group(1)):
        return "trainer.json: not this folder's trainer state"
    try:
        config = read_config(path)
    except CheckpointError as exc:
        return str(exc)
    files = ["model.safetensors", "tokenizer.json", "optimizer.safetensors"]
    if config["image_tokenizer"] is not None:
        files.append("image_tokenizer.safetensors")
    missing = [name for name in files if not (path / name).is_file()]
    return f"missing {', '.join(missing)}" if missing else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries (``.step-N.tmp-PID``, ``.latest.tmp-PID``) left in ``out`` by writers that no longer
    run, or by this process; returns them. A live writer's are left alone."""
    removed = []
    for path in out.iterdir():
        m = TEMPORARY.fullmatch(path.name)
        if m is None or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def prepare_run_dir(out: Path, *, resume: bool = True, overwrite: bool = False) -> None:
    """Make ``out`` ready for a run: create it and remove stale temporaries. ``overwrite`` then deletes its
    checkpoints (the step folders and ``latest``); otherwise a fresh start (``resume=False``) in a directory that
    holds checkpoints raises ``RunDirError``, since the new run's checkpoints would mix with the old ones."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    folders = [path for _, path in step_dirs(out)]
    pointer = out / "latest"
    if overwrite:
        if pointer.is_file() or pointer.is_symlink():
            pointer.unlink()
        for path in folders:
            shutil.rmtree(path)
    elif not resume and (folders or pointer.exists()):
        names = ", ".join(p.name for p in folders[-3:]) or "latest"
        raise RunDirError(f"{out} already holds checkpoints ({names}); resume them (without --no-resume) or "
                          "delete them and start again (--overwrite)")


def save_train_state(out: Path, step: int, model, tokenizer, optimizer, meta: dict, image_tokenizer=None, keep=2,
                     embedder=None):
    """Write ``out/step-XXXXXXX`` atomically (temp directory + rename), then point ``out/latest`` at it, then prune.

    A failed write (e.g. ``OSError`` on a full disk) removes its temporary folder and re-raises, leaving ``latest``
    and the earlier checkpoints as they were. Pruning keeps ``keep`` checkpoints up to ``step`` (this one and the
    newest older ones); a folder newer than ``step`` is never touched.
    """
    from safetensors.torch import save_file

    final = out / f"step-{step:07d}"
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_checkpoint(tmp, model, tokenizer, image_tokenizer, embedder=embedder)
        tensors, scalars = optimizer_tensors(model, optimizer)
        atomic_write(tmp / "optimizer.safetensors", lambda p: save_file(tensors, str(p)))
        text = json.dumps({**meta, "step": step, "adam_steps": scalars}, indent=1)
        atomic_write(tmp / "trainer.json", lambda p: p.write_text(text))
        if final.exists():  # a damaged folder of the same step (never the one a run resumed from: that is older)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write(out / "latest", lambda p: p.write_text(final.name + "\n"))
    older = [path for n, path in step_dirs(out) if n < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old)
    return final


def _read_latest(out: Path, folders: dict[str, str | None]) -> tuple[str | None, str | None]:
    """(the step folder ``out/latest`` names, why it cannot be used or None); ``folders`` maps each step folder
    to its ``checkpoint_problem``."""
    pointer = out / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None, "is missing"
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"is unreadable ({exc})"
    if not text:
        return None, "is empty"
    if not STEP_DIR.fullmatch(text):
        return None, f"names {text[:60]!r}, which is not a step folder of {out}"
    if text not in folders:
        return text, f"names {text}, which does not exist"
    if folders[text] is not None:
        return text, f"names {text}, which is incomplete ({folders[text]})"
    return text, None


def latest_state(out: Path, note=None) -> Path | None:
    """The checkpoint a run in ``out`` resumes from: its newest complete step folder, None when ``out`` holds no
    checkpoint at all.

    That is the folder ``out/latest`` names, unless ``latest`` is missing, unreadable, names anything but a step
    folder of ``out``, names an incomplete one, or lags behind a newer complete one (a run stopped between the
    rename and the update); then ``note`` (a callable, when given) gets one line saying which folder is used and
    why. Raises ``RunDirError`` when ``out`` holds a ``latest`` or step folders but no complete checkpoint.
    """
    out = Path(out)
    folders = {path.name: checkpoint_problem(path) for _, path in step_dirs(out)}
    complete = [name for name, problem in folders.items() if problem is None]
    pointer = out / "latest"
    name, why = _read_latest(out, folders)
    if not complete:
        if not folders and not (pointer.exists() or pointer.is_symlink()):
            return None
        broken = "; ".join(f"{n}: {p}" for n, p in folders.items())
        if why == "is missing":
            raise RunDirError(f"{out} holds no complete checkpoint ({broken}); "
                              "start again with --overwrite")
        raise RunDirError(f"{pointer} {why} and {out} holds no complete checkpoint{f' ({broken})' if broken else ''}"
                          "; start again with --overwrite")
    newest = complete[-1]
    if note is not None and name != newest:
        if why is None:
            note(f"{pointer} names {name}, but {newest} is newer and complete: resuming from {out / newest}")
        else:
            note(f"{pointer} {why}: resuming from the newest complete checkpoint, {out / newest}")
    return out / newest


# ----------------------------------------------------------------------------------------------- train


@dataclass
class TrainSettings:
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    mmu_fraction: float = 0.5
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    grad_clip: float = 1.0
    autocast: bool = False
    loss_backend: str = "auto"
    max_seconds: float | None = None  # wall-time budget: stop (and checkpoint) once exceeded
    rsc_weight: float = 0.0  # reciprocal semantic consistency (``SemanticConsistency``); 0 = off
    embedding_lr_scale: float = 1.0  # learning-rate factor of the e_sem/e_id projections (W_s, W_id)
    text_diffusion: float = 0.0  # share of text diffusion rows (joint and describe; ``make_batch``)

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every", "log_every"):
            check_int(name, getattr(self, name), 1)
        check_bounded("mmu_fraction", self.mmu_fraction, 0, 1)
        check_bounded("text_diffusion", self.text_diffusion, 0, 1)
        check_bounded("rsc_weight", self.rsc_weight, 0, 1e3)
        check_bounded("embedding_lr_scale", self.embedding_lr_scale, 0, 1e4)


def train(model, data, tokenizer, settings: TrainSettings, out: Path | None = None, *, image_tokenizer=None,
          resume: bool = True, overwrite: bool = False, progress: bool = True, stop_after: int | None = None,
          log=None) -> list[dict]:
    """Train ``model`` in place. Returns the per-step statistics of this run (global loss values).

    Data with an embedder (``FaceWorldData.build(embedder=...)``) feeds each understanding row its image's
    ``e_sem``/``e_id`` and saves the embedder with every checkpoint; ``settings.rsc_weight`` > 0 adds the
    reciprocal semantic consistency loss (``SemanticConsistency``, with that embedder and ``image_tokenizer``).

    With ``out``, the run resumes from the newest complete checkpoint there (``latest_state``) unless ``resume``
    is False, which refuses a directory holding checkpoints (``RunDirError``) unless ``overwrite`` (delete them
    first; implies a fresh start). A checkpoint that cannot be written raises ``RunDirError``, the earlier ones
    intact. ``stop_after`` ends the run after that many optimiser steps in this call (to simulate an interruption).
    """
    config = model.config
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay, settings.embedding_lr_scale)
    embedder = getattr(data, "embedder", None)
    rsc = SemanticConsistency(image_tokenizer, embedder, config) if settings.rsc_weight > 0 else None

    def note(line):
        print(f"fastface train: {line}", file=sys.stderr)
        if log:
            log(json.dumps({"event": "note", "message": line}))

    start, state = 0, None
    if out is not None:
        out = Path(out)
        if rank == 0:
            prepare_run_dir(out, resume=resume, overwrite=overwrite)
        if distributed:
            dist.barrier()
        if resume and not overwrite:
            state = latest_state(out, note=note if rank == 0 else None)
    if state is not None:
        from safetensors.torch import load_file

        loaded, _, _, _ = load_checkpoint(state)
        model.load_state_dict(loaded.state_dict())
        meta = json.loads((state / "trainer.json").read_text())
        load_optimizer_tensors(model, optimizer, load_file(str(state / "optimizer.safetensors")), meta["adam_steps"])
        start = meta["step"]
        if rank == 0 and log:
            log(json.dumps({"event": "resumed", "from": str(state), "step": start}))
    model.train()
    history = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    tokens_seen, t0 = 0, time.perf_counter()
    end = settings.steps if stop_after is None else min(settings.steps, start + stop_after)
    for step in range(start, end):
        torch.manual_seed(settings.seed * 1_000_003 + step)  # the Noise expert's draws
        batch = make_batch(data, config, seed=settings.seed, step=step, batch_size=settings.batch_size,
                           mmu_fraction=settings.mmu_fraction, rank=rank, world=world,
                           text_diffusion=settings.text_diffusion)
        for group in optimizer.param_groups:
            group["lr"] = group["lr_scale"] * lr_at(step, lr=settings.lr, warmup=settings.warmup, total=settings.steps)
        loss, stats = batch_loss(model, batch, config, loss_backend=settings.loss_backend,
                                 autocast=settings.autocast, rsc=rsc, rsc_weight=settings.rsc_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        global_loss = float(all_reduce_sum(loss.detach().float()))
        tokens_seen += int((batch.input_ids != config.pad_id).sum()) * world
        record = {"step": step + 1, "loss": global_loss, "grad_norm": float(grad_norm), **stats}
        history.append(record)
        if bar is not None:
            rate = tokens_seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{global_loss:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
        if log and rank == 0 and ((step + 1) % settings.log_every == 0 or step + 1 == end):
            log(json.dumps({**record, "tokens_per_s": round(tokens_seen / (time.perf_counter() - t0))}))
        out_of_time = settings.max_seconds is not None and time.perf_counter() - t0 > settings.max_seconds
        if world > 1:  # every rank stops at the same step
            out_of_time = bool(all_reduce_sum(torch.tensor(float(out_of_time))) > 0)
        last = step + 1 == settings.steps or out_of_time
        if out is not None and rank == 0 and ((step + 1) % settings.save_every == 0 or last):
            try:
                save_train_state(out, step + 1, model, tokenizer, optimizer, {"seed": settings.seed, "world": world},
                                 image_tokenizer, embedder=embedder)
            except OSError as exc:
                if bar is not None:
                    bar.close()
                raise RunDirError(f"cannot write checkpoint step-{step + 1:07d} in {out} ({exc}); "
                                  "the earlier checkpoints are intact") from exc
        if world > 1:
            dist.barrier()
        if out_of_time:
            if log and rank == 0:
                log(json.dumps({"event": "time budget reached", "step": step + 1}))
            break
    if bar is not None:
        bar.close()
    model.eval()
    return history


# ------------------------------------------------------------------------------------------------- cli


def arg_fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = arg_finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def arg_run_dir(text: str) -> str:
    """argparse type: a directory, or a path where one can be created (not a file, not under a file)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty")
    path = Path(text)
    for above in (path, *path.parents):
        if above.exists():
            if not above.is_dir():
                where = "is a file" if above == path else f"lies under the file {str(above)!r}"
                raise argparse.ArgumentTypeError(f"{text!r} {where}, not a directory")
            break
    return text


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--preset", default="face-s", help="model preset (fastface.config.PRESETS; default: face-s)")
    p.add_argument("--data", default="faceworld", choices=["faceworld", "synthetic"],
                   help="training data: the procedural face world (default) or random tokens (smoke runs)")
    p.add_argument("--faces", type=arg_positive_int, default=20000, help="face-world images in the training set")
    p.add_argument("--image-tokenizer", default=None,
                   help="directory or file of the trained image tokenizer (default: the embedded one)")
    p.add_argument("--steps", type=arg_positive_int, default=3000, help="optimiser steps")
    p.add_argument("--batch-size", type=arg_positive_int, default=32, help="global batch size (all processes together)")
    p.add_argument("--lr", type=arg_nonnegative_float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=arg_nonnegative_int, default=100, help="linear warm-up steps")
    p.add_argument("--mmu-fraction", type=arg_fraction, default=0.5,
                   help="fraction of understanding examples, in [0, 1]")
    p.add_argument("--qa-per-example", type=arg_positive_int, default=QA_PER_EXAMPLE,
                   help=f"question-answer turns per understanding example (face world; default: {QA_PER_EXAMPLE})")
    p.add_argument("--caption-rate", type=arg_fraction, default=0.0,
                   help="share of understanding examples that first ask for the whole caption (face world; "
                        "'what does this person look like?'; default: 0)")
    p.add_argument("--text-diffusion", type=arg_fraction, default=0.0, metavar="SHARE",
                   help="share of text diffusion rows (UniDiffuser: joint rows mask the caption block and the image "
                        "each at its own level, describe rows mask the caption after a clean image; default: 0)")
    p.add_argument("--canonical-captions", action="store_true",
                   help="caption answers and text diffusion blocks hold each face's one canonical caption (the face "
                        "world's caption at a fixed seed) instead of a fresh random wording (face world)")
    p.add_argument("--seed", type=arg_nonnegative_int, default=0, help="seed of the whole run")
    p.add_argument("--save-every", type=arg_positive_int, default=200, help="checkpoint every N steps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU bf16 matrix units)")
    p.add_argument("--max-minutes", type=arg_positive_float, default=None,
                   help="wall-time budget; the run checkpoints and stops once it is spent (resume continues it)")
    p.add_argument("--threads", type=arg_positive_int, default=None, help="torch threads per process")
    p.add_argument("--out", required=True, type=arg_run_dir,
                   help="run directory (checkpoints, log); resumes from its newest complete checkpoint if present")
    p.add_argument("--no-resume", action="store_true",
                   help="start from step 0; refused when --out already holds checkpoints (see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints in --out (its step-* folders and latest) before training, then start "
                        "from step 0 (implies --no-resume; train.log is kept and appended to)")
    p.add_argument("--embedder", nargs="?", const=str(DEFAULT_EMBEDDER), default=None, metavar="FACETEXT",
                   help="feed understanding rows the e_sem/e_id of their image from this face-text model (default "
                        "when given without a file: the shipped one); it is saved with every checkpoint")
    p.add_argument("--rsc", type=arg_nonnegative_float, default=0.0, metavar="WEIGHT",
                   help="weight of the reciprocal semantic consistency loss on t2i rows (needs --embedder; 0 = off)")
    p.add_argument("--embedding-lr-scale", type=arg_nonnegative_float, default=1.0, metavar="X",
                   help="learning-rate factor of the e_sem/e_id projections (they start from their random init: "
                        "a fine-tune that adds --embedder needs them to move faster than the rest; default 1)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint directory's weights (e.g. fastface/assets/face-s) with a fresh "
                        "optimiser and schedule; a resumable state in --out takes precedence")


def build_data(args, config: FaceConfig):
    """(data source, text tokenizer, image tokenizer or None) for the run."""
    if args.data == "synthetic":
        if args.embedder or args.rsc:
            raise ValueError("--embedder and --rsc need face-world data (--data faceworld)")
        from fastface.tokenizer import build_text_tokenizer

        words = [f"w{i}" for i in range(config.text_vocab_size - len(SPECIAL_TOKENS))]
        return SyntheticData(config, seed=args.seed), build_text_tokenizer(words), None
    from fastface.data.training import FaceWorldData

    data = FaceWorldData.build(config, faces=args.faces, seed=args.seed, image_tokenizer=args.image_tokenizer,
                               qa_per_example=args.qa_per_example, caption_rate=args.caption_rate,
                               embedder=args.embedder, canonical_captions=args.canonical_captions)
    return data, data.tokenizer, data.image_tokenizer


def init_weights(model, path) -> None:
    """Copy the transformer weights of checkpoint ``path`` into ``model`` (float32); the configs must match."""
    source, _, _, _ = load_checkpoint(path, dtype=torch.float32)
    want, got = model.config.to_dict(), source.config.to_dict()
    diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if diff:
        raise ValueError(f"--init {path}: its config differs from the run's in {', '.join(diff)} "
                         f"(run: {[want.get(k) for k in diff]}, checkpoint: {[got.get(k) for k in diff]})")
    model.load_state_dict(source.state_dict())


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    out = Path(args.out)
    resume = not args.no_resume
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:  # before any work: a run directory that cannot be used as asked fails at once
        try:
            prepare_run_dir(out, resume=resume, overwrite=args.overwrite)
        except OSError as exc:
            raise RunDirError(f"--out {out}: {exc}") from None
        if resume and not args.overwrite:
            latest_state(out)
    config = FaceConfig.from_name(args.preset)
    data, tokenizer, image_tokenizer = build_data(args, config)
    if tokenizer.get_vocab_size() != config.text_vocab_size:
        config = FaceConfig.from_name(args.preset, text_vocab_size=tokenizer.get_vocab_size())
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    model = FaceTransformer(config)
    model.reset_parameters(args.seed)
    if args.init:
        init_weights(model, args.init)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             mmu_fraction=args.mmu_fraction, seed=args.seed, save_every=args.save_every,
                             autocast=args.bf16, rsc_weight=args.rsc,
                             embedding_lr_scale=args.embedding_lr_scale, text_diffusion=args.text_diffusion,
                             max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    log_file = out / "train.log"

    def log(line):
        with open(log_file, "a") as f:
            f.write(line + "\n")

    if rank == 0:
        log(json.dumps({"event": "start", "preset": args.preset, "world": world, "args": vars(args),
                        "parameters": sum(p.numel() for p in model.parameters())}, default=str))
    t0 = time.perf_counter()
    try:
        history = train(model, data, tokenizer, settings, out, image_tokenizer=image_tokenizer, resume=resume,
                        overwrite=args.overwrite, log=log)
    except OSError as exc:  # the log or the run directory (checkpoint writes raise RunDirError themselves)
        raise RunDirError(f"{out}: {exc}") from exc
    if rank == 0:
        log(json.dumps({"event": "end", "wall_s": round(time.perf_counter() - t0, 1),
                        "final": history[-1] if history else None}))
        print(f"checkpoint: {latest_state(out)}")
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastface train", description="Train a fastface model.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (RunDirError, ValueError, TypeError, OSError) as exc:
        print(f"fastface train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
