"""The generation engine: the reference decoding loops, made fast without changing their tokens.

Legend: B requests, R rows of the transformer batch (B, or 2B with guidance: rows 0..B-1 cond, B..2B-1 uncond),
P prompt length (``max_text_len``), S = N + 2 image segment (<soi> img_1 … img_N <eoi>), N image tokens,
K codebook size, H hidden, nh heads, hd head dim.

The engine only schedules: prefill, the step loop, buffers, graph capture. Every layer it runs is the model's own
module (``FaceTransformer.blocks`` with a ``StaticKVCache`` and fixed sequence-level routing, then
``FaceTransformer.head``); it reads no weight tensor, so a change to a block cannot make it drift from the model.

Text to image (``Engine.generate_image_tokens``), exact with respect to
``fastface.sampling.generate_image_tokens`` (same tokens for the same (seed, prompts); every step does the same
arithmetic on the rows it keeps):

* the prompt never attends to image tokens (omni-attention), so its keys/values and the sequence-level MoE
  routing (decided from the prompt) are computed once per request (``_prefill``); each step runs only the image
  segment through the layers, its rows attending to the cached valid prompt keys and to the whole segment;
* the unconditional (empty) prompt is the same for every request: its keys/values are computed once per model
  and copied into the uncond rows; cond and uncond rows run in one batch;
* the LM head runs only at still-masked positions and only on the codebook columns; the decode step is the op
  ``ops.masked_decode_step`` (its ``torch`` backend works only at those positions);
* buffers (keys/values, attention mask) are allocated once per batch size and reused; on CUDA the segment forward
  is captured as a CUDA graph when the kernels allow it (eager otherwise).

Opt-in, not exact with respect to the schedule: ``threshold`` (the op's confidence-threshold decoding) also
accepts every masked token whose sampled probability reaches the threshold; the loop ends when nothing is masked.

Edits (``generate_image_tokens(tokens=..., region=...)``): the same loop with only the region masked at the start;
each row's region is decoded as its own problem (``sampling.decode_step``).

Image to text by masked diffusion (``Engine.describe_ids``), exact with respect to ``sampling.describe_ids``: the
same segment loop (``_decode_segment``) with the caption block as the segment: the image prefix never attends to the
block, so its keys/values and routing are computed once per request, the unconditional prefix (a fully masked
image) once per model, and the head runs at still-masked block positions on the text columns only.

Joint caption-face sampling (``Engine.generate_pair_ids``), exact with respect to ``sampling.generate_pair_ids``:
the block changes every step and the routing with it, so cond rows run the whole sequence; uncond rows (a fully
masked block, the same for every request) run only the image segment against its prefix, computed once per model.

Understanding (``Engine.generate_answer_ids``), exact with respect to ``fastface.sampling.generate_answer_ids``:
one prefill over the left-padded prompts, then one token per row per step into the static key/value cache (no
concatenation), LM head at the last position on the allowed columns only.

Threads: one engine may be called from several threads. Its reusable state (step buffers, the cached empty prompt,
captured graphs) is shared, so each decoding call holds the engine's lock for its whole run: concurrent calls run
one after another, each returning exactly what it returns alone. (On a CPU the matmuls already use every core, so
per-call buffers would buy little; batch requests together for throughput.) ``last_stats`` describes the last call
to finish.

Precision: the engine runs in the model's dtype (``Pipeline(dtype="bfloat16")`` casts the transformer); the
sampler always works in float32.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass, field

import torch

from fastface import backends, ops
from fastface.checks import check_decoding
from fastface.config import GROUP_GENERATION, GROUP_UNDERSTANDING
from fastface.model import (
    BlockContext,
    SeqMixture,
    StaticKVCache,
    default_cond_mask,
    default_positions,
    omni_attention_mask,
    token_valid,
)
from fastface.profiling import OFF, SECTIONS, Timers
from fastface.prompts import describe_sequence, joint_sequence, t2i_prompt_ids, text_block_length
from fastface.sampling import (
    IMAGE_STREAM,
    TEXT_STREAM,
    check_pair_decoding,
    decode_step,
    initial_image_state,
    pair_text_state,
    sample_next_token,
    step_confidence_temperature,
    step_noise,
    text_logit_bias,
)


@dataclass
class GenerationStats:
    """What the last ``generate_image_tokens`` call did."""

    steps: int = 0  # scheduled steps
    steps_run: int = 0  # forward passes actually run (< steps only with threshold decoding)
    masked_per_step: list = field(default_factory=list)  # still-masked positions over the batch, per step
    positions_run: int = 0  # segment positions run through the layers, summed over rows and steps
    cuda_graph: bool = False


@dataclass
class _Prefix:
    """A prompt batch after prefill: its keys/values, sequence-level routing and validity."""

    kv: StaticKVCache  # [Bp, nh, P + extra, hd] per layer, positions [0, P) filled
    routes: list  # per layer (weights [Bp, 2] float32, experts [Bp, 2] int64)
    valid: torch.Tensor  # [Bp, P] bool
    next_position: torch.Tensor  # [Bp] rotary position of the token after the prompt


@dataclass
class _StepBuffers:
    """Per-(R, P, S, group, dtype, device) state of a segment step loop, reused across requests."""

    kv: StaticKVCache  # [R, nh, P + S, hd] per layer: the prompt at [0, P), the segment at [P, P + S)
    ids: torch.Tensor  # [R, S] the segment's ids
    mask: torch.Tensor  # [R, 1, S, P + S] additive (0 / -inf)
    groups: torch.Tensor  # [R * S] expert group of each segment token
    task: torch.Tensor  # [R]
    key: tuple = ()


@dataclass
class _Segment:
    """What one segment decoding loop decodes: the segment's decoded positions, the head's columns and the ids."""

    positions: slice  # decoded positions within the segment
    columns: slice  # LM head columns (codebook or text)
    offset: int  # unified id = decoded value + offset
    stream: int  # noise stream (``sampling.step_noise``)
    logit_bias: torch.Tensor | None = None  # added to the head's logits (text: banned specials)


def _active_positions(previous: torch.Tensor, start: int, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """Segment positions [rows, A] a ``kv_refresh`` step runs: per row, those masked at the start of the last step
    that ran it (``previous`` [B, n] for the cond rows, ``uncond`` [B, n] for the uncond rows when they run;
    decoded positions start at ``start``), in order. A row with fewer than A repeats its first one (a duplicate
    computes the same keys/values again, so a row's tokens do not depend on the rest of the batch)."""
    previous = previous if uncond is None else torch.cat([previous, uncond])
    counts = previous.sum(1)
    A = max(int(counts.max()), 1)
    order = torch.argsort(previous.to(torch.int8), dim=1, descending=True, stable=True)[:, :A]
    pad = torch.arange(A, device=previous.device)[None, :] >= counts[:, None]
    return torch.where(pad, order[:, :1], order) + start


class _RowsKV:
    """The first ``rows`` rows of a ``StaticKVCache`` whose segment is written whole, or, with ``active``
    [rows, A], only at those segment positions (the rest of the cache is read as it is)."""

    def __init__(self, kv: StaticKVCache, rows: int, active: torch.Tensor | None):
        self.kv, self.rows, self.active = kv, rows, active

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.kv.keys[layer][: self.rows], self.kv.values[layer][: self.rows]
        start = self.kv.start
        if self.active is None:
            end = start + k.shape[2]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            return keys[:, :, :end], values[:, :, :end]
        index = (self.active + start)[:, None, :, None].expand_as(k)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        return keys, values


def _serialised(method):
    """Run an engine method under the engine's lock (see "Threads" in the module docstring)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Engine:
    """Fast exact decoding loops over a ``FaceTransformer``.

    Parameters
    ----------
    model : FaceTransformer, in eval mode; only its modules are called, its parameters never read or changed
    backend : "auto" | "reference" | "torch" | "cpp" | "triton" -- kernels for the grouped MoE and the decode step
        (``fastface.backends`` resolves it per op, device and dtype)
    cuda_graphs : capture the per-step segment forward as a CUDA graph on CUDA devices (eager fallback)
    """

    def __init__(self, model, *, backend: str = "auto", cuda_graphs: bool = True):
        self.model = model
        self.config = model.config
        self.backend = backends.validate_choice(backend)
        self._lock = threading.Lock()  # held by each decoding call: the buffers below are shared across calls
        self.cuda_graphs = cuda_graphs
        self.last_stats = GenerationStats()
        self._uncond_cache: dict = {}  # kind -> (weights key, _Prefix of that unconditional prompt)
        self._buffers: dict = {}  # (R, P, S, group, dtype, device) -> _StepBuffers
        self._graphs: dict = {}  # the same keys -> captured CUDA graph state, or False
        c = self.config
        self._codebook = slice(c.image_token_offset, c.image_token_offset + c.codebook_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _weights_key(self):
        return (self.dtype, self.device, self.model.weights_version())

    # ------------------------------------------------------------------------------------------- prefill
    def _prefill(self, ids, group: int, cond_mask, e_sem, e_id, extra: int, timers,
                 text_block=None) -> tuple[_Prefix, torch.Tensor]:
        """Run prompts ids [Bp, P] through every block, deciding the sequence-level routing.

        Keys/values go into a static cache with room for ``extra`` more positions. Returns (prefix, hidden
        [Bp, P, H] after the last block).
        """
        model, c = self.model, self.config
        Bp, P = ids.shape
        task = torch.full((Bp,), group, dtype=torch.long, device=ids.device)
        positions = default_positions(ids, pad_id=c.pad_id, text_block=text_block)
        cos, sin = model.rotary(positions)
        kv = StaticKVCache(c.num_layers, Bp, c.num_heads, P + extra, c.head_dim, dtype=self.dtype, device=ids.device)
        mask = omni_attention_mask(ids, pad_id=c.pad_id, soi_id=c.soi_id, eoi_id=c.eoi_id, text_block=text_block)
        ctx = BlockContext(mask=mask[:, None], cos=cos, sin=sin,
                           groups=task.repeat_interleave(P), task=task, cond_mask=cond_mask, e_sem=e_sem, e_id=e_id,
                           kv=kv, backend=self.backend)
        with timers.section("prefill", ids.device):
            x, _, routes = model.blocks(ids, ctx)
        kv.start = P
        valid = token_valid(ids, pad_id=c.pad_id, text_block=text_block)
        return _Prefix(kv, routes, valid, positions[:, -1] + 1), x

    def _uncond_prefix(self, timers, kind: str = "t2i") -> _Prefix:
        """Keys/values of an unconditional prompt, computed once per model state and shared by every uncond row:
        "t2i" the empty prompt; "describe" ``<mmu> <soi> <mask>… <eoi> <bos>`` (a fully masked image, no
        embeddings); "joint" ``<t2i> <bos>`` and a fully masked caption block."""
        key = self._weights_key()
        cached = self._uncond_cache.get(kind)
        if cached is None or cached[0] != key:
            c, dev = self.config, self.device
            if kind == "t2i":
                ids = t2i_prompt_ids([[]], c).to(dev)
                prefix, _ = self._prefill(ids, GROUP_GENERATION, self._t2i_cond_mask(ids), None, None, 0, timers)
            elif kind == "describe":
                ids = self._describe_prefix(torch.full((1, c.image_tokens), c.mask_token_id, device=dev))
                zeros = (torch.zeros(1, c.sem_dim, dtype=self.dtype, device=dev),
                         torch.zeros(1, c.id_dim, dtype=self.dtype, device=dev))
                prefix, _ = self._prefill(ids, GROUP_UNDERSTANDING, torch.ones_like(ids, dtype=torch.bool), *zeros,
                                          0, timers)
            else:
                T = text_block_length(c)
                ids, in_block = joint_sequence(torch.full((1, T), c.mask_token_id, device=dev),
                                               torch.zeros(1, 0, dtype=torch.long, device=dev), c)
                ids, in_block = ids[:, : T + 2], in_block[:, : T + 2]
                cond = default_cond_mask(ids, torch.ones(1, dtype=torch.long, device=dev), pad_id=c.pad_id,
                                         soi_id=c.soi_id, text_block=in_block)
                prefix, _ = self._prefill(ids, GROUP_GENERATION, cond, None, None, 0, timers, text_block=in_block)
            self._uncond_cache[kind] = (key, prefix)
        return self._uncond_cache[kind][1]

    def _describe_prefix(self, image_ids):
        """Unified image ids [B, N] -> ``<mmu> <soi> img <eoi> <bos>`` [B, N + 4], the prefix of a describe row."""
        return describe_sequence(image_ids, image_ids[:, :0], self.config)[0]

    def _t2i_cond_mask(self, ids):
        return ids != self.model.config.pad_id  # a t2i prompt holds no <soi>: its non-pad tokens are the condition

    # ------------------------------------------------------------------------------------ text to image
    def _step_buffers(self, R: int, P: int, S: int | None = None, group: int = GROUP_GENERATION) -> _StepBuffers:
        c = self.config
        S = c.image_tokens + 2 if S is None else S
        key = (R, P, S, group, self.dtype, self.device)
        buf = self._buffers.get(key)
        if buf is None:
            dev = self.device
            buf = _StepBuffers(
                kv=StaticKVCache(c.num_layers, R, c.num_heads, P + S, c.head_dim, dtype=self.dtype, device=dev),
                ids=torch.empty(R, S, dtype=torch.long, device=dev),
                # additive mask (0 / -inf): the same result as the boolean mask, 20% faster in SDPA on the CPU
                mask=torch.zeros(R, 1, S, P + S, dtype=self.dtype, device=dev),
                groups=torch.full((R * S,), group, dtype=torch.long, device=dev),
                task=torch.full((R,), group, dtype=torch.long, device=dev),
                key=key,
            )
            self._buffers[key] = buf
        return buf

    def _segment_state(self, parts: list[_Prefix], B: int, S: int, group: int, e_sem=None, e_id=None):
        """Copy prefixes (each of 1 or B rows, expanded to B) into the step cache of a segment of S positions.

        Rows j*B .. (j+1)*B - 1 read parts[j]. The segment rows see their valid prompt keys and the whole segment;
        the sequence-level routing of each row is its prefix's, folded with ``e_sem``/``e_id`` [R, ·].
        Returns (buffers, cos, sin, mixtures).
        """
        c, model, device = self.config, self.model, self.device
        P = parts[0].valid.shape[1]
        buf = self._step_buffers(B * len(parts), P, S, group)
        for i in range(c.num_layers):
            for dst, src in ((buf.kv.keys[i], "keys"), (buf.kv.values[i], "values")):
                for j, part in enumerate(parts):
                    dst[j * B : (j + 1) * B, :, :P] = getattr(part.kv, src)[i][:, :, :P].expand(B, -1, -1, -1)
        valid = torch.cat([p.valid.expand(B, -1) for p in parts])  # [R, P]
        next_pos = torch.cat([p.next_position.expand(B) for p in parts])  # [R]
        buf.mask[:, 0, :, :P] = torch.zeros((), dtype=self.dtype, device=device).masked_fill(
            ~valid, float("-inf"))[:, None, :]
        positions = next_pos[:, None] + torch.arange(S, device=device)  # [R, S]
        cos, sin = model.rotary(positions)  # [R, 1, S, hd]
        routes = [(torch.cat([p.routes[i][0].expand(B, -1) for p in parts]),
                   torch.cat([p.routes[i][1].expand(B, -1) for p in parts])) for i in range(c.num_layers)]
        mixtures = model.seq_mixtures(routes, buf.task, e_sem, e_id)
        return buf, cos, sin, mixtures

    def _decode_segment(self, buf, cos, sin, mixtures, P, seg: _Segment, tokens, masked, *, B, guided, seeds,
                        steps, region=None, options, confidence_temperature, compounding=False, callback=None,
                        timers=OFF, stats=None, graph=None, guidance_steps=None, uncond_refresh=None,
                        kv_refresh=None):
        """The step loop of one segment: write the current ids, run the segment, the head at still-masked
        positions, the decode step. Returns (tokens, masked).

        Opt-in, faster than exact (``sampling.generate_image_tokens`` says what each means): ``guidance_steps``
        (guided steps, the first that many), ``uncond_refresh`` (the uncond rows run every that many guided steps,
        their last logits guiding the others), ``kv_refresh`` (the whole segment runs every that many steps; in
        between each row runs only the positions masked at the start of the last step that ran it, every other
        position's keys/values as that step left them).
        """
        model, device, c = self.model, self.device, self.config
        R, n = buf.ids.shape[0], tokens.shape[1]
        width = seg.columns.stop - seg.columns.start
        # written at masked rows only; in the model's dtype (the reference loop's logits are, and the decode step
        # reads bfloat16), float32 where a bias is added
        dtype = torch.float32 if seg.logit_bias is not None else self.dtype
        logits_full = torch.zeros(R, n, width, dtype=dtype, device=device)
        hidden = None  # [R, S, H]: the last hidden state of every segment position (kv_refresh)
        previous = previous_uncond = masked  # masked at the start of the last step that ran the cond / uncond rows
        with timers.hooks(model):
            for step in range(steps):
                if not bool(masked.any()):
                    break  # threshold decoding finished early
                guided_now = guided and (guidance_steps is None or step < guidance_steps)
                uncond_now = guided_now and (uncond_refresh is None or step % uncond_refresh == 0)
                rows_run = 2 * B if uncond_now else B
                active = None
                if kv_refresh is not None and step % kv_refresh != 0 and hidden is not None:
                    active = _active_positions(previous, seg.positions.start, previous_uncond if uncond_now else None)
                if stats is not None:
                    stats.steps_run += 1
                    stats.masked_per_step.append(int(masked.sum()))
                    stats.positions_run += rows_run * (buf.ids.shape[1] if active is None else active.shape[1])
                previous = masked
                if uncond_now:
                    previous_uncond = masked
                ids = torch.where(masked, torch.full_like(tokens, c.mask_token_id), tokens + seg.offset)
                buf.ids[:B, seg.positions] = ids
                if uncond_now:
                    buf.ids[B:, seg.positions] = ids
                if graph is not None:
                    graph["cos"].copy_(cos)  # static inputs of the captured graph
                    graph["sin"].copy_(sin)
                    graph["graph"].replay()
                    x = graph["out"]
                elif active is not None:
                    x = hidden[:rows_run]
                    x.scatter_(1, active[..., None].expand(-1, -1, x.shape[-1]),
                               self._segment_forward(buf, cos, sin, mixtures, P, rows=rows_run, active=active))
                else:
                    x = self._segment_forward(buf, cos, sin, mixtures, P, rows=rows_run if rows_run < R else None)
                    if kv_refresh is not None:
                        if hidden is None:
                            hidden = x.new_empty(R, *x.shape[1:])
                        hidden[:rows_run] = x
                with timers.section("lm_head", device):
                    # still-masked positions only: cond rows, then the same positions of the uncond rows
                    rows = masked.repeat(2, 1) if uncond_now else masked  # [rows_run, n]
                    logits = model.head(x[:, seg.positions][rows], seg.columns)
                    logits_full[:rows_run][rows] = logits if seg.logit_bias is None else logits.float() + seg.logit_bias
                with timers.section("noise", device):
                    u = step_noise(seeds, step, n, device, stream=seg.stream)
                with timers.section("sampler", device):
                    # guided steps read the uncond rows' logits from the last step that ran them
                    step_options = options if guided_now else {**options, "guidance": 0.0}
                    tokens, masked = decode_step(
                        logits_full if guided_now else logits_full[:B], tokens, masked, u, region=region, step=step,
                        steps=steps, confidence_temperature=step_confidence_temperature(
                            confidence_temperature, step, steps, compounding=compounding),
                        backend=self.backend, **step_options)
                if callback is not None:
                    callback(step, tokens, masked)
        return tokens, masked

    def _segment_forward(self, buf: _StepBuffers, cos, sin, mixtures, P: int, *, rows: int | None = None,
                         active: torch.Tensor | None = None):
        """The image segment buf.ids [R, S] through every block -> hidden [R, S, H] (before ln_f).

        ``rows``: only the first that many rows; ``active`` [rows, A]: only those segment positions of each row
        (-> hidden [rows, A, H]), their keys/values written at their places, every other key/value as cached.
        """
        buf.kv.start = P  # the segment is rewritten at the same place every step
        if rows is None and active is None:
            ctx = BlockContext(mask=buf.mask, cos=cos, sin=sin, groups=buf.groups, task=buf.task, kv=buf.kv,
                               seq=mixtures, backend=self.backend)
            return self.model.blocks(buf.ids, ctx)[0]
        rows = buf.ids.shape[0] if rows is None else rows
        ids, mask = buf.ids[:rows], buf.mask[:rows]
        cos, sin = cos[:rows], sin[:rows]
        if active is not None:
            ids = ids.gather(1, active)
            mask = mask.gather(2, active[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
            cos = cos.gather(2, active[:, None, :, None].expand(-1, cos.shape[1], -1, cos.shape[-1]))
            sin = sin.gather(2, active[:, None, :, None].expand(-1, sin.shape[1], -1, sin.shape[-1]))
        L = ids.shape[1]
        seq = [SeqMixture(m.scale[:rows], [b[:rows] for b in m.biases],
                          None if m.noise is None else m.noise[:rows]) for m in mixtures]
        ctx = BlockContext(mask=mask, cos=cos, sin=sin, groups=buf.groups[: rows * L], task=buf.task[:rows],
                           kv=_RowsKV(buf.kv, rows, active), seq=seq, backend=self.backend)
        return self.model.blocks(ids, ctx)[0]

    @_serialised
    @torch.no_grad()
    def generate_image_tokens(
        self,
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
        e_sem: torch.Tensor | None = None,
        e_id: torch.Tensor | None = None,
        callback=None,
        timers: Timers | None = None,
        tokens: torch.Tensor | None = None,
        region: torch.Tensor | None = None,
        guidance_steps: int | None = None,
        uncond_refresh: int | None = None,
        kv_refresh: int | None = None,
    ) -> torch.Tensor:
        """Codebook ids [B, N] int64 of one image per prompt; same contract as the reference sampler.

        Parameters
        ----------
        prompt_ids : LongTensor [B, P] left-padded t2i prompts (``fastface.prompts.t2i_prompt_ids``)
        steps, guidance, seeds, sample_temperature, confidence_temperature, schedule, threshold,
        confidence_compounding : as ``fastface.sampling.generate_image_tokens`` (``threshold``: opt-in
            confidence-threshold decoding; ``confidence_compounding``: Show-o's quirk, off by default)
        e_sem, e_id : accepted for parity with the reference; the generation group's sequence experts (copy,
            zero, noise, copy) read neither
        callback : called as callback(step, tokens [B, N], masked [B, N]) after each step
        timers : ``Timers`` to accumulate the time per section into
        tokens, region : an edit (``fastface.sampling.generate_image_tokens``): only ``region`` [B, N] is re-decoded
        guidance_steps, uncond_refresh : opt-in, faster than exact, as the reference sampler
        kv_refresh : opt-in, faster than exact, engine only: every ``kv_refresh`` steps the whole image segment runs;
            in between only the positions masked at the previous step, the others' keys/values reused
            (dKV-cache style); 1 is exact
        """
        timers = timers or OFF
        check_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                       confidence_temperature=confidence_temperature, schedule=schedule, threshold=threshold,
                       confidence_compounding=confidence_compounding, guidance_steps=guidance_steps,
                       uncond_refresh=uncond_refresh, kv_refresh=kv_refresh)
        c, device = self.config, self.device
        prompt_ids = prompt_ids.to(device)
        B, P = prompt_ids.shape
        N, offset = c.image_tokens, c.image_token_offset
        tokens, masked, region = initial_image_state(c, B, device, tokens, region)
        guided = guidance != 0

        # ---- prefill: cond prompts now, the empty prompt once per model; both copied into the step cache
        cond, _ = self._prefill(prompt_ids, GROUP_GENERATION, self._t2i_cond_mask(prompt_ids), None, None, 0, timers)
        parts = [cond, self._uncond_prefix(timers)] if guided else [cond]
        buf, cos, sin, mixtures = self._segment_state(parts, B, N + 2, GROUP_GENERATION)
        buf.ids[:, 0] = c.soi_id
        buf.ids[:, -1] = c.eoi_id

        # ---- the decoding loop
        stats = GenerationStats(steps=steps)
        approximate = (guidance_steps, uncond_refresh, kv_refresh) != (None, None, None)  # shapes change per step
        graph = (self._graph_for(buf, cos, sin, mixtures, P)
                 if device.type == "cuda" and self.cuda_graphs and not approximate else None)
        stats.cuda_graph = graph is not None
        seg = _Segment(positions=slice(1, N + 1), columns=self._codebook, offset=offset, stream=IMAGE_STREAM)
        options = dict(guidance=guidance, sample_temperature=sample_temperature, schedule=schedule,
                       threshold=threshold)
        tokens, _ = self._decode_segment(buf, cos, sin, mixtures, P, seg, tokens, masked, B=B, guided=guided,
                                         seeds=seeds, steps=steps, region=region, options=options,
                                         confidence_temperature=confidence_temperature,
                                         compounding=confidence_compounding, callback=callback, timers=timers,
                                         stats=stats, graph=graph, guidance_steps=guidance_steps,
                                         uncond_refresh=uncond_refresh, kv_refresh=kv_refresh)
        self.last_stats = stats
        return tokens

    # ------------------------------------------------------------------------------- image to text (diffusion)
    @_serialised
    @torch.no_grad()
    def describe_ids(
        self,
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
        callback=None,
        timers: Timers | None = None,
    ) -> torch.Tensor:
        """Caption blocks [B, T] decoded in parallel; same contract as ``fastface.sampling.describe_ids``.

        Exact optimisations carried over from text-to-image: the image prefix ``<mmu> <soi> img <eoi> <bos>`` never
        attends to the block, so its keys/values and sequence-level routing are computed once per request; the
        unconditional prefix (a fully masked image) once per model; each step runs only the block; the head runs
        at still-masked block positions on the text columns only; cond and uncond rows in one batch.
        """
        timers = timers or OFF
        check_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                       confidence_temperature=confidence_temperature, schedule=schedule)
        c, device = self.config, self.device
        image_tokens = image_tokens.to(device)
        B, T = image_tokens.shape[0], text_block_length(c)
        guided = guidance != 0
        ids = self._describe_prefix(image_tokens + c.image_token_offset)
        e_sem = None if e_sem is None else e_sem.to(device=device, dtype=self.dtype)
        e_id = None if e_id is None else e_id.to(device=device, dtype=self.dtype)
        cond, _ = self._prefill(ids, GROUP_UNDERSTANDING, torch.ones_like(ids, dtype=torch.bool), e_sem, e_id, 0,
                                timers)
        parts = [cond, self._uncond_prefix(timers, "describe")] if guided else [cond]
        if guided:
            e_sem = None if e_sem is None else torch.cat([e_sem, torch.zeros_like(e_sem)])
            e_id = None if e_id is None else torch.cat([e_id, torch.zeros_like(e_id)])
        buf, cos, sin, mixtures = self._segment_state(parts, B, T, GROUP_UNDERSTANDING, e_sem, e_id)
        seg = _Segment(positions=slice(0, T), columns=slice(0, c.text_vocab_size), offset=0, stream=TEXT_STREAM,
                       logit_bias=text_logit_bias(c, device))
        block = torch.zeros(B, T, dtype=torch.long, device=device)
        masked = torch.ones(B, T, dtype=torch.bool, device=device)
        options = dict(guidance=guidance, sample_temperature=sample_temperature, schedule=schedule)
        block, _ = self._decode_segment(buf, cos, sin, mixtures, ids.shape[1], seg, block, masked, B=B,
                                        guided=guided, seeds=seeds, steps=steps, options=options,
                                        confidence_temperature=confidence_temperature, callback=callback,
                                        timers=timers)
        return block

    # ------------------------------------------------------------------------------------------ joint
    @_serialised
    @torch.no_grad()
    def generate_pair_ids(
        self,
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
        callback=None,
        timers: Timers | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption blocks [B, T], image codebook ids [B, N]); same contract as ``fastface.sampling.generate_pair_ids``.

        The cond rows run the whole sequence every step (the block changes, and with it the sequence-level
        routing); the unconditional rows' prefix (a fully masked block) is the same for every request and step, so
        its keys/values are computed once per model and those rows run only the image segment. The head runs at
        still-masked positions on the text or codebook columns only.
        """
        timers = timers or OFF
        check_pair_decoding(steps=steps, guidance=guidance, sample_temperature=sample_temperature,
                            confidence_temperature=confidence_temperature,
                            text_sample_temperature=text_sample_temperature,
                            text_confidence_temperature=text_confidence_temperature, schedule=schedule)
        c, model, device = self.config, self.model, self.device
        B, N, T, V = len(seeds), c.image_tokens, text_block_length(c), c.text_vocab_size
        mask_id, off = c.mask_token_id, c.image_token_offset
        block, block_masked = pair_text_state(c, B, device, text, decode_text)
        tokens = torch.zeros(B, N, dtype=torch.long, device=device)
        masked = torch.ones(B, N, dtype=torch.bool, device=device)
        guided = guidance != 0
        bias = text_logit_bias(c, device)
        # the cond rows' layout is fixed: one mask and rotary table for every step
        ids, in_block = joint_sequence(torch.full_like(block, mask_id), torch.full_like(tokens, mask_id), c)
        L = ids.shape[1]
        full_mask = omni_attention_mask(ids, pad_id=c.pad_id, soi_id=c.soi_id, eoi_id=c.eoi_id,
                                        text_block=in_block)[:, None]
        full_cos, full_sin = model.rotary(torch.arange(L, device=device).expand(B, L))
        task = torch.full((B,), GROUP_GENERATION, dtype=torch.long, device=device)
        text_cols, image_cols = slice(2, 2 + T), slice(T + 3, T + 3 + N)
        uncond = None
        if guided:
            uncond = self._segment_state([self._uncond_prefix(timers, "joint")], B, N + 2, GROUP_GENERATION)
            uncond[0].ids[:, 0] = c.soi_id
            uncond[0].ids[:, -1] = c.eoi_id
        logits_img = torch.zeros(2 * B if guided else B, N, c.codebook_size, dtype=torch.float32, device=device)
        logits_txt = torch.zeros(B, T, V, dtype=torch.float32, device=device)
        with timers.hooks(model):
            for step in range(steps):
                block_ids = torch.where(block_masked, torch.full_like(block, mask_id), block)
                image_ids = torch.where(masked, torch.full_like(tokens, mask_id), tokens + off)
                ids, _ = joint_sequence(block_ids, image_ids, c)
                cond_mask = default_cond_mask(ids, task, pad_id=c.pad_id, soi_id=c.soi_id, text_block=in_block)
                ctx = BlockContext(mask=full_mask, cos=full_cos, sin=full_sin, groups=task.repeat_interleave(L),
                                   task=task, cond_mask=cond_mask, backend=self.backend)
                x = model.blocks(ids, ctx)[0]
                with timers.section("lm_head", device):
                    logits_img[:B][masked] = model.head(x[:, image_cols][masked], self._codebook).float()
                    if guided:
                        buf, cos, sin, mixtures = uncond
                        buf.ids[:, 1:-1] = image_ids
                        xu = self._segment_forward(buf, cos, sin, mixtures, T + 2)
                        logits_img[B:][masked] = model.head(xu[:, 1:-1][masked], self._codebook).float()
                    decoding_text = decode_text and bool(block_masked.any())
                    if decoding_text:
                        logits_txt[block_masked] = model.head(x[:, text_cols][block_masked],
                                                              slice(0, V)).float() + bias
                with timers.section("sampler", device):
                    if decoding_text:
                        u_text = step_noise(seeds, step, T, device, stream=TEXT_STREAM)
                        block, block_masked = ops.masked_decode_step(
                            logits_txt, block, block_masked, u_text, step=step, steps=steps,
                            sample_temperature=text_sample_temperature,
                            confidence_temperature=text_confidence_temperature, schedule=schedule,
                            backend=self.backend)
                    u = step_noise(seeds, step, N, device)
                    tokens, masked = ops.masked_decode_step(
                        logits_img, tokens, masked, u, step=step, steps=steps, guidance=guidance,
                        sample_temperature=sample_temperature, confidence_temperature=confidence_temperature,
                        schedule=schedule, backend=self.backend)
                if callback is not None:
                    callback(step, block, tokens)
        return torch.where(block_masked, torch.full_like(block, mask_id), block), tokens

    # ---------------------------------------------------------------------------------------- CUDA graphs
    def _graph_for(self, buf: _StepBuffers, cos, sin, mixtures, P):
        """Capture the segment forward for this buffer set (CUDA only). Returns None when capture fails.

        The graph reads buf.ids, the cache's prompt part, buf.mask and the static cos/sin/mixture tensors in place,
        so a new request only refills them. A kernel that synchronises with the host (argument validation reading a
        value) makes capture fail; the engine then runs eagerly, with a warning once.
        """
        key = buf.key
        state = self._graphs.get(key)
        if state is False:
            return None
        if state is not None:
            for dst, src in zip(state["mixtures"], mixtures):
                dst.scale.copy_(src.scale)
                for a, b in zip(dst.biases, src.biases):
                    a.copy_(b)
            return state
        try:
            static = dict(cos=cos.clone(), sin=sin.clone(),
                          mixtures=[SeqMixture(m.scale.clone(), [b.clone() for b in m.biases]) for m in mixtures])
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside the graph (allocations, autotuning)
                for _ in range(2):
                    self._segment_forward(buf, static["cos"], static["sin"], static["mixtures"], P)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._segment_forward(buf, static["cos"], static["sin"], static["mixtures"], P)
            state = dict(graph=graph, out=out, **static)
        except Exception as exc:  # capture is an optimisation: any failure means eager, never a wrong result
            warnings.warn(f"fastface: CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            self._graphs[key] = False
            return None
        self._graphs[key] = state
        return state

    # -------------------------------------------------------------------------------------- understanding
    @_serialised
    @torch.no_grad()
    def generate_answer_ids(
        self,
        prompt_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        top_p: float | None = None,
        temperature: float = 1.0,
        seeds: list[int] | None = None,
        e_sem: torch.Tensor | None = None,
        e_id: torch.Tensor | None = None,
        allowed_vocab: int | None = None,
        timers: Timers | None = None,
    ) -> list[list[int]]:
        """Answers after left-padded mmu prompts [B, L]; same contract as ``sampling.generate_answer_ids``.

        Returns the new ids per row, without the <eos>.
        """
        timers = timers or OFF
        model, c = self.model, self.config
        device = self.device
        prompt_ids = prompt_ids.to(device)
        B, L0 = prompt_ids.shape
        task = torch.full((B,), GROUP_UNDERSTANDING, dtype=torch.long, device=device)
        cond_mask = prompt_ids != c.pad_id
        generators = None
        if top_p is not None:
            seeds = list(range(B)) if seeds is None else seeds
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        prefix, x = self._prefill(prompt_ids, GROUP_UNDERSTANDING, cond_mask, e_sem, e_id, max_new_tokens, timers)
        cols = slice(0, allowed_vocab if allowed_vocab is not None else c.vocab_size)
        with timers.section("lm_head", device):
            logits = model.head(x[:, -1], cols)  # [B, V'] last position only
        mixtures = model.seq_mixtures(prefix.routes, task, e_sem, e_id)
        valid = torch.ones(B, L0 + max_new_tokens, dtype=torch.bool, device=device)
        valid[:, :L0] = prefix.valid
        position = prefix.next_position.clone()  # [B]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        answers: list[list[int]] = [[] for _ in range(B)]
        with timers.hooks(model):
            for t in range(max_new_tokens):
                with timers.section("sampler", device):
                    nxt = sample_next_token(logits, top_p=top_p, temperature=temperature, generators=generators)
                    nxt = torch.where(done, torch.full_like(nxt, c.eos_id), nxt)
                    for b, tok in enumerate(nxt.tolist()):
                        if not done[b] and tok != c.eos_id:
                            answers[b].append(tok)
                    done |= nxt == c.eos_id
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                start = L0 + t
                valid[:, start] = nxt != c.pad_id  # a <pad> sample is fed but never attended to, as in the KV cache
                cos, sin = model.rotary(position[:, None])  # [B, 1, 1, hd]
                prefix.kv.start = start
                ctx = BlockContext(mask=valid[:, None, None, : start + 1], cos=cos, sin=sin, groups=task, task=task,
                                   kv=prefix.kv, seq=mixtures, backend=self.backend)  # every valid key, itself
                x = model.blocks(nxt[:, None], ctx)[0]
                position += 1
                with timers.section("lm_head", device):
                    logits = model.head(x[:, -1], cols)
        return answers


__all__ = ["Engine", "GenerationStats", "Timers", "SECTIONS"]
