"""The reference decoding loops: parallel masked-token decoding of images (Show-o ``t2i_generate``) and
autoregressive answering, a full forward of the model every step. The engine (``fastface.engine``) returns the same
tokens faster; these loops are what it is tested against.

Noise contract: the only randomness of a masked-decoding step is u = [u1, u2] of shape [2, B, N]; row b is drawn
from a torch generator seeded by (seed_b, step) (``step_noise``), so a request's tokens do not depend on what else
is in the batch, and every backend given the same logits and u returns the same tokens. The step itself is the op
``fastface.ops.masked_decode_step`` (algorithm and reference in ``fastface/ops/masked_decode.py``).
"""

from __future__ import annotations

import torch

from fastface import ops
from fastface.checks import check_decoding
from fastface.config import GROUP_GENERATION, GROUP_UNDERSTANDING
from fastface.model import KVCache
from fastface.prompts import t2i_prompt_ids, t2i_sequence

_SEED_STRIDE = 1_000_003  # (seed, step) -> generator seed; a prime larger than any step count


def step_noise(seeds: list[int], step: int, num_tokens: int, device="cpu") -> torch.Tensor:
    """u = [u1, u2] of shape [2, B, N], float32 in (0, 1); row b from a generator seeded by (seeds[b], step)."""
    rows = []
    tiny = torch.finfo(torch.float32).tiny
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * _SEED_STRIDE + step)
        rows.append(torch.rand(2, num_tokens, generator=gen, dtype=torch.float32).clamp_(min=tiny))
    return torch.stack(rows, dim=1).to(device)  # [2, B, N]


# ------------------------------------------------------------------------------------ the decoding loops


def step_confidence_temperature(base: float, step: int, steps: int, *, compounding: bool = False) -> float:
    """The confidence temperature handed to ``ops.masked_decode_step`` at ``step`` (the op scales it by 1 - ratio).

    ``compounding=True`` reproduces a quirk of Show-o's ``t2i_generate``: it reassigns ``temperature *= 1 - ratio``
    every step, so the Gumbel noise at step s is ``base * prod_{k<=s} (1 - (k + 1) / steps)`` rather than
    ``base * (1 - (s + 1) / steps)``, which decays much faster. Off by default; on in the Show-o decoding presets
    (``DECODING_PRESETS``), for parity with checkpoints tuned under it. Computed in Python floats, the same for the
    reference loop and the engine.
    """
    if not compounding:
        return base
    t = base
    for k in range(step):
        t *= 1.0 - (k + 1) / steps
    return t


# Show-o's own decoding settings, by image size (its released configs): pass as keyword arguments to
# Pipeline.generate / generate_tokens, e.g. ``pipe.generate(prompts, **DECODING_PRESETS["showo-256"])``
DECODING_PRESETS: dict[str, dict] = {
    "showo-256": dict(steps=16, guidance=1.75, sample_temperature=1.0, confidence_temperature=1.0, schedule="cosine",
                      confidence_compounding=True),
    "showo-512": dict(steps=50, guidance=5.0, sample_temperature=1.0, confidence_temperature=1.0, schedule="cosine",
                      confidence_compounding=True),
}


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
    threshold: float | None = None,
    confidence_compounding: bool = False,
    backend: str = "auto",
    e_sem: torch.Tensor | None = None,
    e_id: torch.Tensor | None = None,
    callback=None,
) -> torch.Tensor:
    """Reference t2i sampler (Show-o ``t2i_generate``): a full forward over prompt and image every step.

    prompt_ids [B, P] left-padded t2i prompts (``fastface.prompts.t2i_prompt_ids``); returns codebook ids
    [B, N]. With guidance, the unconditional rows use the empty prompt and run in the same batch; the guided
    logits are Show-o's ``(1 + w) * cond - w * uncond``. ``threshold`` (opt-in) is the op's confidence-threshold
    decoding; the loop then ends once nothing is masked. ``confidence_compounding``: Show-o's compounding
    confidence temperature (``step_confidence_temperature``), off by default.
    """
    check_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                   confidence_temperature=confidence_temperature, schedule=schedule, threshold=threshold,
                   confidence_compounding=confidence_compounding)
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
        if not bool(masked.any()):
            break  # threshold decoding finished early
        image_ids = torch.where(masked, torch.full_like(tokens, cfg.mask_token_id), tokens + offset)
        if guidance != 0:
            image_ids = torch.cat([image_ids, image_ids])
        out = model(t2i_sequence(prompt_ids, image_ids, model.config), task, e_sem=e_sem, e_id=e_id)
        logits = out.logits[:, image_cols, offset : offset + K]  # [R, N, K] codebook columns only
        u = step_noise(seeds, step, N, device)
        tokens, masked = ops.masked_decode_step(
            logits, tokens, masked, u, step=step, steps=steps, guidance=guidance,
            sample_temperature=sample_temperature,
            confidence_temperature=step_confidence_temperature(confidence_temperature, step, steps,
                                                               compounding=confidence_compounding),
            schedule=schedule, threshold=threshold, backend=backend,
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
    B, device = prompt_ids.shape[0], prompt_ids.device
    task = torch.full((B,), GROUP_UNDERSTANDING, dtype=torch.long, device=device)
    pad_id, eos_id = model.config.pad_id, model.config.eos_id
    cond_mask = prompt_ids != pad_id
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
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        for b in range(B):
            if not done[b] and int(nxt[b]) != eos_id:
                answers[b].append(int(nxt[b]))
        done |= nxt == eos_id
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
