"""Parallel masked-token decoding (MaskGIT / Show-o) and autoregressive decoding: the reference sampler.

Legend: B sequences, R logits rows (B, or 2B with guidance: rows 0..B-1 cond, B..2B-1 uncond),
N image tokens per sequence, V codebook size.

One step (``masked_decode_step_reference``), given logits of the current masked state:
  1. l = (1 + w) * cond - w * uncond                     (w = guidance; l = cond when w = 0)
  2. z = l / tau_sample;  e = exp(z - max z);  c = cumsum(e)
     sample j = smallest index with c[j] > u1 * c[V-1]     (inverse CDF; a token with e = 0 is never drawn)
     log p(j) = z[j] - max z - log c[V-1]
  3. ratio = (step + 1) / steps;  mask_ratio = cos(pi/2 * ratio)  (or 1 - ratio for "linear")
     mask_len = min(n_unknown - 1, max(1, floor(N * mask_ratio)))  clipped at 0; 0 at the last step
  4. conf = log p(j) + tau_conf * (1 - ratio) * g,  g = -log(-log u2);  known positions conf = +inf
  5. the mask_len lowest-confidence positions (ties: lower position first) stay masked; the rest are known

Noise contract: the only randomness of a step is u = [u1, u2] of shape [2, B, N]; row b is drawn from a
torch generator seeded by (seed_b, step) (``step_noise``), so a request's tokens do not depend on what
else is in the batch, and every backend given the same logits and u returns the same tokens.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear")
_SEED_STRIDE = 1_000_003  # (seed, step) -> generator seed; a prime larger than any step count


def mask_schedule(ratio: float, schedule: str = "cosine") -> float:
    """Fraction of the N image tokens still masked after progress ``ratio``."""
    if schedule == "cosine":
        return math.cos(math.pi / 2 * ratio)
    if schedule == "linear":
        return 1.0 - ratio
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def scheduled_mask_len(num_tokens: int, n_unknown: torch.Tensor, step: int, steps: int, schedule: str = "cosine"):
    """How many positions of each sequence stay masked after ``step`` (int64 [B])."""
    if step == steps - 1:
        return torch.zeros_like(n_unknown)
    ratio = (step + 1) / steps
    target = max(1, math.floor(num_tokens * mask_schedule(ratio, schedule)))
    return torch.clamp(torch.clamp(n_unknown - 1, max=target), min=0)


def step_noise(seeds: list[int], step: int, num_tokens: int, device="cpu") -> torch.Tensor:
    """u = [u1, u2] of shape [2, B, N], float32 in (0, 1); row b from a generator seeded by (seeds[b], step)."""
    rows = []
    tiny = torch.finfo(torch.float32).tiny
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * _SEED_STRIDE + step)
        rows.append(torch.rand(2, num_tokens, generator=gen, dtype=torch.float32).clamp_(min=tiny))
    return torch.stack(rows, dim=1).to(device)  # [2, B, N]


def guided_logits(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """[R, N, V] -> [B, N, V] float32: (1 + w) * cond - w * uncond, or cond when w = 0."""
    logits = logits.float()
    if guidance == 0:
        return logits
    B = logits.shape[0] // 2
    return (1 + guidance) * logits[:B] - guidance * logits[B:]


def masked_decode_step_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    masked: torch.Tensor,
    u: torch.Tensor,
    *,
    step: int,
    steps: int,
    guidance: float = 0.0,
    sample_temperature: float = 1.0,
    confidence_temperature: float = 1.0,
    schedule: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One parallel decoding step in plain PyTorch (see the module docstring for the algorithm)."""
    B, N = tokens.shape
    z = guided_logits(logits, guidance) / sample_temperature  # [B, N, V]
    z_max = z.max(dim=-1, keepdim=True).values
    e = torch.exp(z - z_max)
    c = torch.cumsum(e, dim=-1)  # [B, N, V]
    total = c[..., -1:]
    threshold = u[0].float().unsqueeze(-1) * total  # [B, N, 1]
    sampled = (c <= threshold).sum(dim=-1).clamp(max=z.shape[-1] - 1)  # smallest j with c[j] > u1 * total
    log_p = (z.gather(-1, sampled[..., None]) - z_max - total.log()).squeeze(-1)  # [B, N]

    ratio = (step + 1) / steps
    gumbel = -torch.log(-torch.log(u[1].float()))
    conf = log_p + confidence_temperature * (1.0 - ratio) * gumbel
    conf = torch.where(masked, conf, torch.full_like(conf, math.inf))

    mask_len = scheduled_mask_len(N, masked.sum(dim=-1), step, steps, schedule)  # [B]
    order = torch.sort(conf, dim=-1, stable=True).indices  # ascending confidence, ties by position
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    new_masked = rank < mask_len[:, None]
    new_tokens = torch.where(masked, sampled, tokens)
    return new_tokens, new_masked


# ------------------------------------------------------------------------------------ the decoding loops


@torch.no_grad()
def generate_image_tokens(
    model,
    prompt_ids: torch.Tensor,
    *,
    steps: int = 16,
    guidance: float = 2.0,
    seeds: list[int],
    sample_temperature: float = 1.0,
    confidence_temperature: float = 4.5,
    schedule: str = "cosine",
    backend: str = "auto",
    e_sem: torch.Tensor | None = None,
    e_id: torch.Tensor | None = None,
    callback=None,
) -> torch.Tensor:
    """Reference t2i sampler (Show-o ``t2i_generate``): a full forward over prompt and image every step.

    prompt_ids [B, P] left-padded t2i prompts (``fastface.prompts.t2i_prompt_ids``); returns codebook ids
    [B, N]. With guidance, the unconditional rows use the empty prompt and run in the same batch.
    """
    from fastface import ops
    from fastface.config import GROUP_GENERATION
    from fastface.prompts import t2i_prompt_ids, t2i_sequence

    cfg = model.config
    B, N, device = prompt_ids.shape[0], cfg.image_tokens, prompt_ids.device
    offset, K, P = cfg.image_token_offset, cfg.codebook_size, prompt_ids.shape[1]
    if guidance != 0:
        uncond = t2i_prompt_ids([[]], cfg).to(device).expand(B, -1)
        prompt_ids = torch.cat([prompt_ids, uncond])
        if e_sem is not None:
            e_sem = torch.cat([e_sem, torch.zeros_like(e_sem)])
        if e_id is not None:
            e_id = torch.cat([e_id, torch.zeros_like(e_id)])
    task = torch.full((prompt_ids.shape[0],), GROUP_GENERATION, dtype=torch.long, device=device)
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    masked = torch.ones(B, N, dtype=torch.bool, device=device)
    image_cols = slice(P + 1, P + 1 + N)
    for step in range(steps):
        image_ids = torch.where(masked, torch.full_like(tokens, cfg.mask_token_id), tokens + offset)
        if guidance != 0:
            image_ids = torch.cat([image_ids, image_ids])
        out = model(t2i_sequence(prompt_ids, image_ids), task, e_sem=e_sem, e_id=e_id)
        logits = out.logits[:, image_cols, offset : offset + K]  # [R, N, K] codebook columns only
        u = step_noise(seeds, step, N, device)
        tokens, masked = ops.masked_decode_step(
            logits, tokens, masked, u, step=step, steps=steps, guidance=guidance,
            sample_temperature=sample_temperature, confidence_temperature=confidence_temperature,
            schedule=schedule, backend=backend,
        )
        if callback is not None:
            callback(step, tokens, masked)
    return tokens


def sample_next_token(logits: torch.Tensor, *, top_p: float | None, temperature: float, generators) -> torch.Tensor:
    """logits [B, V] -> [B] ids: greedy when top_p is None, else nucleus sampling per row's generator."""
    if top_p is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the most likely token
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    out = []
    for b in range(logits.shape[0]):
        j = torch.multinomial(sorted_p[b], 1, generator=generators[b])
        out.append(order[b, j])
    return torch.cat(out)


@torch.no_grad()
def generate_answer_ids(
    model,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    top_p: float | None = None,
    temperature: float = 1.0,
    seeds: list[int] | None = None,
    use_cache: bool = True,
    e_sem: torch.Tensor | None = None,
    e_id: torch.Tensor | None = None,
    allowed_vocab: int | None = None,
) -> list[list[int]]:
    """Autoregressive understanding: greedy (top_p=None) or nucleus decoding after an mmu prompt.

    prompt_ids [B, L] left-padded (``fastface.prompts.mmu_prompt_ids``). With ``use_cache`` the prompt is
    prefilled once and each new token attends to the KV cache; without, the whole sequence is recomputed
    each step (the reference the cache is tested against). Generation of a row stops at <eos>.
    ``allowed_vocab`` restricts sampling to ids below it (text tokens). Returns the new ids per row,
    without the <eos>.
    """
    from fastface.config import EOS_ID, GROUP_UNDERSTANDING, PAD_ID
    from fastface.model import KVCache

    B, device = prompt_ids.shape[0], prompt_ids.device
    task = torch.full((B,), GROUP_UNDERSTANDING, dtype=torch.long, device=device)
    cond_mask = prompt_ids != PAD_ID
    generators = None
    if top_p is not None:
        seeds = list(range(B)) if seeds is None else seeds
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    answers: list[list[int]] = [[] for _ in range(B)]
    cache = KVCache() if use_cache else None
    seq = prompt_ids
    out = model(prompt_ids, task, cond_mask=cond_mask, cache=cache, e_sem=e_sem, e_id=e_id)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1]
        if allowed_vocab is not None:
            logits = logits[:, :allowed_vocab]
        nxt = sample_next_token(logits, top_p=top_p, temperature=temperature, generators=generators)
        nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
        for b in range(B):
            if not done[b] and int(nxt[b]) != EOS_ID:
                answers[b].append(int(nxt[b]))
        done |= nxt == EOS_ID
        if bool(done.all()):
            break
        if use_cache:
            out = model(nxt[:, None], task, cache=cache, e_sem=e_sem, e_id=e_id)
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            cond = torch.cat([cond_mask, torch.zeros(B, seq.shape[1] - cond_mask.shape[1], dtype=torch.bool,
                                                      device=device)], dim=1)
            out = model(seq, task, cond_mask=cond, e_sem=e_sem, e_id=e_id)
    return answers
