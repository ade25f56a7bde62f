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
from fastface.prompts import describe_sequence, joint_sequence, t2i_prompt_ids, t2i_sequence, text_block_length

_SEED_STRIDE = 1_000_003  # (seed, step) -> generator seed; a prime larger than any step count
IMAGE_STREAM, TEXT_STREAM = 0, 1  # noise streams: a text block's draws are independent of its image's
_STREAM_OFFSET = 1 << 62


def step_noise(seeds: list[int], step: int, num_tokens: int, device="cpu", stream: int = IMAGE_STREAM) -> torch.Tensor:
    """u = [u1, u2] of shape [2, B, N], float32 in (0, 1); row b from a generator seeded by (seeds[b], step,
    stream)."""
    rows = []
    tiny = torch.finfo(torch.float32).tiny
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * _SEED_STRIDE + step + stream * _STREAM_OFFSET)
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


def decode_step(logits, tokens, masked, u, *, region=None, backend="auto", **options):
    """``ops.masked_decode_step`` over every position, or, with ``region`` [B, N] bool, over each row's region only
    (an edit: the schedule counts the region's positions, not all N; positions outside it are never touched).
    Each row's region is its own problem, so a row decodes the same alone or in a batch."""
    if region is None:
        return ops.masked_decode_step(logits, tokens, masked, u, backend=backend, **options)
    B = tokens.shape[0]
    guided = logits.shape[0] == 2 * B and options.get("guidance", 0.0) != 0
    tokens, masked = tokens.clone(), masked.clone()
    for b in range(B):
        idx = torch.nonzero(region[b]).squeeze(1)
        if not len(idx) or not bool(masked[b, idx].any()):
            continue
        rows = torch.tensor([b, B + b] if guided else [b], device=logits.device)
        t, m = ops.masked_decode_step(logits[rows][:, idx], tokens[b : b + 1, idx], masked[b : b + 1, idx],
                                      u[:, b : b + 1, idx], backend=backend, **options)
        tokens[b, idx], masked[b, idx] = t[0], m[0]
    return tokens, masked


BANNED_LOGIT = -1e30  # finite: under guidance, (1 + w) * -inf - w * -inf would be NaN; this stays hugely negative


def text_logit_bias(config, device="cpu") -> torch.Tensor:
    """[text_vocab_size] float32: 0, or ``BANNED_LOGIT`` at the special tokens a caption block never holds (all but
    <eos> and <pad>), added to a block's logits before sampling (probability exactly 0, with or without guidance)."""
    bias = torch.zeros(config.text_vocab_size, dtype=torch.float32, device=device)
    banned = [t for t in config.special_token_ids if t not in (config.eos_id, config.pad_id)]
    bias[torch.tensor(banned, dtype=torch.long)] = BANNED_LOGIT
    return bias


def image_region(region, batch: int, num_tokens: int) -> torch.Tensor | None:
    """A region to re-decode: None, or bool [N] / [B, N] -> [B, N] (checked)."""
    if region is None:
        return None
    if not isinstance(region, torch.Tensor) or region.dtype != torch.bool:
        raise TypeError(f"region must be a BoolTensor [B, {num_tokens}] or [{num_tokens}], got "
                        f"{type(region).__name__} {getattr(region, 'dtype', '')}")
    if region.dim() == 1:
        region = region[None].expand(batch, -1)
    if tuple(region.shape) != (batch, num_tokens):
        raise ValueError(f"region must have shape [{batch}, {num_tokens}] or [{num_tokens}], got {tuple(region.shape)}")
    return region


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
    tokens: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    guidance_steps: int | None = None,
    uncond_refresh: int | None = None,
) -> torch.Tensor:
    """Reference t2i sampler (Show-o ``t2i_generate``): a full forward over prompt and image every step.

    Editing: with ``tokens`` [B, N] (an image's codebook ids) and ``region`` [B, N] bool, only the region starts
    masked and is decoded (its schedule over the region's size, ``decode_step``); every token outside it is kept.

    prompt_ids [B, P] left-padded t2i prompts (``fastface.prompts.t2i_prompt_ids``); returns codebook ids
    [B, N]. With guidance, the unconditional rows use the empty prompt and run in the same batch; the guided
    logits are Show-o's ``(1 + w) * cond - w * uncond``. ``threshold`` (opt-in) is the op's confidence-threshold
    decoding; the loop then ends once nothing is masked. ``confidence_compounding``: Show-o's compounding
    confidence temperature (``step_confidence_temperature``), off by default.

    Opt-in, faster than exact: ``guidance_steps`` -- guidance on the first that many steps only; later steps run
    the cond rows alone, unguided. ``uncond_refresh`` -- the unconditional rows run on every ``uncond_refresh``-th
    guided step only (steps 0, r, 2r, ...); the guided steps in between reuse their last logits.
    """
    check_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                   confidence_temperature=confidence_temperature, schedule=schedule, threshold=threshold,
                   confidence_compounding=confidence_compounding, guidance_steps=guidance_steps,
                   uncond_refresh=uncond_refresh)
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
    tokens, masked, region = initial_image_state(cfg, B, device, tokens, region)
    image_cols = slice(P + 1, P + 1 + N)
    for step in range(steps):
        if not bool(masked.any()):
            break  # threshold decoding finished early
        image_ids = torch.where(masked, torch.full_like(tokens, cfg.mask_token_id), tokens + offset)
        w = guidance if guidance_steps is None or step < guidance_steps else 0.0
        run_uncond = w != 0 and (uncond_refresh is None or step % uncond_refresh == 0)
        rows = 2 * B if run_uncond else B
        if run_uncond:
            image_ids = torch.cat([image_ids, image_ids])
        out = model(t2i_sequence(prompt_ids[:rows], image_ids, model.config), task[:rows],
                    e_sem=None if e_sem is None else e_sem[:rows], e_id=None if e_id is None else e_id[:rows])
        logits = out.logits[:, image_cols, offset : offset + K]  # [R, N, K] codebook columns only
        if run_uncond:
            uncond_logits = logits[B:]
        elif w != 0:
            logits = torch.cat([logits, uncond_logits])  # the uncond rows' logits of their last step
        u = step_noise(seeds, step, N, device)
        tokens, masked = decode_step(
            logits, tokens, masked, u, region=region, step=step, steps=steps, guidance=w,
            sample_temperature=sample_temperature,
            confidence_temperature=step_confidence_temperature(confidence_temperature, step, steps,
                                                               compounding=confidence_compounding),
            schedule=schedule, threshold=threshold, backend=backend,
        )
        if callback is not None:
            callback(step, tokens, masked)
    return tokens


def initial_image_state(config, batch: int, device, tokens=None, region=None):
    """(tokens, masked, region) at the start of image decoding: everything masked, or for an edit the given
    ``tokens`` with only ``region`` masked."""
    N = config.image_tokens
    if tokens is None:
        if region is not None:
            raise ValueError("region needs the image's tokens")
        return (torch.zeros(batch, N, dtype=torch.long, device=device),
                torch.ones(batch, N, dtype=torch.bool, device=device), None)
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tuple(tokens.shape) != (batch, N):
        raise ValueError(f"tokens must be a LongTensor [{batch}, {N}], got {type(tokens).__name__} "
                         f"{tuple(getattr(tokens, 'shape', ()))}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= config.codebook_size):
        raise ValueError(f"tokens must lie in [0, {config.codebook_size})")
    region = image_region(region, batch, N)
    if region is None:
        raise ValueError("tokens need a region to re-decode")
    region = region.to(device)
    return tokens.to(device).clone(), region.clone(), region


# --------------------------------------------------------------------------- text diffusion (UniDiffuser)


@torch.no_grad()
def describe_ids(
    model,
    image_tokens: torch.Tensor,
    *,
    steps: int = 16,
    guidance: float = 0.0,
    seeds: list[int],
    sample_temperature: float = 1.0,
    confidence_temperature: float = 1.0,
    schedule: str = "cosine",
    e_sem: torch.Tensor | None = None,
    e_id: torch.Tensor | None = None,
    backend: str = "auto",
    callback=None,
) -> torch.Tensor:
    """Reference image-to-text by masked diffusion: the caption block (``fastface.prompts``) of each image decoded
    in parallel over ``steps``, a full forward of ``<mmu> <soi> img <eoi> <bos> [block]`` every step.

    image_tokens [B, N] codebook ids -> block ids [B, T] (``fastface.prompts.block_text`` reads the caption).
    Guidance: the unconditional rows hold a fully masked image and no embeddings (UniDiffuser: the other modality
    at its highest noise level). The block's noise is the text stream of each seed (``step_noise``).
    """
    check_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                   confidence_temperature=confidence_temperature, schedule=schedule)
    cfg = model.config
    B, N, device = image_tokens.shape[0], cfg.image_tokens, image_tokens.device
    T, V = text_block_length(cfg), cfg.text_vocab_size
    image_ids = image_tokens + cfg.image_token_offset
    if guidance != 0:
        image_ids = torch.cat([image_ids, torch.full_like(image_ids, cfg.mask_token_id)])
        e_sem = None if e_sem is None else torch.cat([e_sem, torch.zeros_like(e_sem)])
        e_id = None if e_id is None else torch.cat([e_id, torch.zeros_like(e_id)])
    task = torch.full((image_ids.shape[0],), GROUP_UNDERSTANDING, dtype=torch.long, device=device)
    bias = text_logit_bias(cfg, device)
    block = torch.zeros(B, T, dtype=torch.long, device=device)
    masked = torch.ones(B, T, dtype=torch.bool, device=device)
    for step in range(steps):
        block_ids = torch.where(masked, torch.full_like(block, cfg.mask_token_id), block)
        if guidance != 0:
            block_ids = torch.cat([block_ids, block_ids])
        ids, in_block = describe_sequence(image_ids, block_ids, cfg)
        out = model(ids, task, text_block=in_block, e_sem=e_sem, e_id=e_id)
        logits = out.logits[:, N + 4 :, :V].float() + bias  # [R, T, V] text columns
        u = step_noise(seeds, step, T, device, stream=TEXT_STREAM)
        block, masked = ops.masked_decode_step(logits, block, masked, u, step=step, steps=steps, guidance=guidance,
                                               sample_temperature=sample_temperature,
                                               confidence_temperature=confidence_temperature, schedule=schedule,
                                               backend=backend)
        if callback is not None:
            callback(step, block, masked)
    return block


@torch.no_grad()
def generate_pair_ids(
    model,
    *,
    seeds: list[int],
    steps: int = 16,
    guidance: float = 0.0,
    sample_temperature: float = 1.0,
    confidence_temperature: float = 4.5,
    text_sample_temperature: float = 1.0,
    text_confidence_temperature: float = 1.0,
    schedule: str = "cosine",
    text: torch.Tensor | None = None,
    decode_text: bool = True,
    backend: str = "auto",
    callback=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference joint sampler (UniDiffuser): caption block and image of ``<t2i> <bos> [block] <soi> img <eoi>``
    decoded together, a full forward every step -> (block ids [B, T], image codebook ids [B, N]).

    The block never attends to the image, so its chain is the text marginal p(text) and each image step conditions
    on the current block: the pair is a sample of p(text) p(image | text). ``decode_text=False`` leaves the block
    fully masked: an unconditional image, p(image) (the block returned is all <mask>). ``text`` [B, T] (a clean
    block, ``caption_block``) fixes the caption: text-to-image in this layout. Guidance acts on the image only; its
    unconditional rows hold a fully masked block.
    """
    check_pair_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                        confidence_temperature=confidence_temperature, text_sample_temperature=text_sample_temperature,
                        text_confidence_temperature=text_confidence_temperature, schedule=schedule)
    cfg = model.config
    B, N, T, V = len(seeds), cfg.image_tokens, text_block_length(cfg), cfg.text_vocab_size
    device = model.device
    mask_id, off, K = cfg.mask_token_id, cfg.image_token_offset, cfg.codebook_size
    block, block_masked = pair_text_state(cfg, B, device, text, decode_text)
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    masked = torch.ones(B, N, dtype=torch.bool, device=device)
    guided = guidance != 0
    task = torch.full((2 * B if guided else B,), GROUP_GENERATION, dtype=torch.long, device=device)
    bias = text_logit_bias(cfg, device)
    text_cols, image_cols = slice(2, 2 + T), slice(T + 3, T + 3 + N)
    for step in range(steps):
        block_ids = torch.where(block_masked, torch.full_like(block, mask_id), block)
        image_ids = torch.where(masked, torch.full_like(tokens, mask_id), tokens + off)
        if guided:
            block_ids = torch.cat([block_ids, torch.full_like(block_ids, mask_id)])
            image_ids = torch.cat([image_ids, image_ids])
        ids, in_block = joint_sequence(block_ids, image_ids, cfg)
        logits = model(ids, task, text_block=in_block).logits
        if decode_text and bool(block_masked.any()):
            u_text = step_noise(seeds, step, T, device, stream=TEXT_STREAM)
            block, block_masked = ops.masked_decode_step(
                logits[:B, text_cols, :V].float() + bias, block, block_masked, u_text, step=step, steps=steps,
                sample_temperature=text_sample_temperature, confidence_temperature=text_confidence_temperature,
                schedule=schedule, backend=backend)
        u = step_noise(seeds, step, N, device)
        tokens, masked = ops.masked_decode_step(
            logits[:, image_cols, off : off + K], tokens, masked, u, step=step, steps=steps, guidance=guidance,
            sample_temperature=sample_temperature, confidence_temperature=confidence_temperature, schedule=schedule,
            backend=backend)
        if callback is not None:
            callback(step, block, tokens)
    return torch.where(block_masked, torch.full_like(block, mask_id), block), tokens


def check_pair_decoding(*, steps, guidance, sample_temperature, confidence_temperature, text_sample_temperature,
                        text_confidence_temperature, schedule) -> None:
    """The options of a joint run: the image's (with guidance) and the caption's (guidance acts on the image only)."""
    check_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                   confidence_temperature=confidence_temperature, schedule=schedule)
    check_decoding(steps=steps, guidance=0.0, sample_temperature=text_sample_temperature,
                   confidence_temperature=text_confidence_temperature, schedule=schedule)


def pair_text_state(config, batch: int, device, text=None, decode_text: bool = True):
    """(block [B, T], block_masked [B, T]) at the start of joint decoding."""
    T = text_block_length(config)
    if not isinstance(decode_text, bool):
        raise TypeError(f"decode_text must be True or False, got {type(decode_text).__name__}")
    if text is None:
        return (torch.zeros(batch, T, dtype=torch.long, device=device),
                torch.ones(batch, T, dtype=torch.bool, device=device))
    if not isinstance(text, torch.Tensor) or text.dtype != torch.long or tuple(text.shape) != (batch, T):
        raise ValueError(f"text must be a LongTensor [{batch}, {T}] of caption blocks, got {type(text).__name__} "
                         f"{tuple(getattr(text, 'shape', ()))}")
    if text.numel() and (int(text.min()) < 0 or int(text.max()) >= config.text_vocab_size):
        raise ValueError(f"text must hold text ids in [0, {config.text_vocab_size})")
    return text.to(device).clone(), torch.zeros(batch, T, dtype=torch.bool, device=device)


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
