"""The generation engine: the reference decoding loops, made fast without changing their tokens.

Legend: B requests, R rows of the transformer batch (B, or 2B with guidance: rows 0..B-1 cond, B..2B-1 uncond),
P prompt length (``max_text_len``), S = N + 2 image segment (<soi> img_1 … img_N <eoi>), N image tokens,
K codebook size, H hidden, nh heads, hd head dim, M still-masked positions of a step (over the batch).

Text to image (``Engine.generate_image_tokens``), exact with respect to
``fastface.sampling.generate_image_tokens`` (same tokens for the same (seed, prompts); every step does the same
arithmetic on the rows it keeps):

* the prompt never attends to image tokens (omni-attention), so its keys/values and the sequence-level MoE
  routing (decided from the prompt) are computed once per request (``_prefill``); each step runs only the image
  segment through the layers, its rows attending to the cached valid prompt keys and to the whole segment;
* the unconditional (empty) prompt is the same for every request: its keys/values are computed once per model
  and copied into the uncond rows; cond and uncond rows run in one batch;
* the LM head runs only at still-masked positions and only on the codebook columns, and the sampler only at
  those positions (the reference computes and discards the rest);
* buffers (keys/values, attention mask, rotary tables) are allocated once per batch size and reused; on CUDA the
  segment forward is captured as a CUDA graph when the kernels allow it (eager otherwise).

Opt-in, not exact: ``threshold`` (confidence-threshold parallel decoding) also accepts every masked token whose
sampled probability reaches the threshold, so fewer steps are needed; the loop ends when nothing is masked.

Understanding (``Engine.generate_answer_ids``), exact with respect to ``fastface.sampling.generate_answer_ids``:
one prefill over the left-padded prompts, then one token per row per step against preallocated key/value
buffers (no concatenation), LM head at the last position on the allowed columns only.

Precision: the engine runs in the model's dtype (``Pipeline(dtype="bfloat16")`` casts the transformer); the
sampler always works in float32.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastface import backends, ops
from fastface.config import EOI_ID, EOS_ID, GROUP_GENERATION, GROUP_UNDERSTANDING, PAD_ID, SEQ_EXPERTS, SOI_ID
from fastface.model import (
    apply_rotary,
    default_positions,
    omni_attention_mask,
    rotary_tables,
)
from fastface.prompts import t2i_prompt_ids
from fastface.sampling import SCHEDULES, sample_next_token, scheduled_mask_len, step_noise

SECTIONS = ("prefill", "attention", "moe", "seq_moe", "lm_head", "sampler", "noise")


class Timers:
    """Wall-clock seconds per section of the engine (attention, moe, seq_moe, lm_head, sampler, …).

    Disabled timers cost one attribute check per section. CPU ops are synchronous, so ``perf_counter`` brackets
    are exact there; on CUDA each section synchronises first (timing changes the run; use it to profile only).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str, device: torch.device | None = None):
        if not self.enabled:
            yield
            return
        sync = device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float):
        if self.enabled:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds


_OFF = Timers(enabled=False)


@dataclass
class GenerationStats:
    """What the last ``generate_image_tokens`` call did."""

    steps: int = 0  # scheduled steps
    steps_run: int = 0  # forward passes actually run (< steps only with threshold decoding)
    masked_per_step: list = field(default_factory=list)  # still-masked positions over the batch, per step
    cuda_graph: bool = False


@dataclass
class _Prefix:
    """Keys/values of a prompt batch after prefill: per layer [Bp, nh, P, hd], plus routing and validity."""

    keys: list
    values: list
    routes: list  # per layer (weights [Bp, 2] float32, experts [Bp, 2] int64)
    valid: torch.Tensor  # [Bp, P] bool
    next_position: torch.Tensor  # [Bp] rotary position of the token after the prompt


class Engine:
    """Fast exact decoding loops over a ``FaceTransformer``'s weights.

    Parameters
    ----------
    model : FaceTransformer, in eval mode; its parameters are read, never changed
    backend : "auto" | "reference" | "cpp" | "triton" -- kernels for the grouped MoE and the decode step
    moe : "auto" | "kernel" | "dense" -- "kernel": ``ops.grouped_moe`` with ``backend`` (token-exact with the
        reference in fp32); "dense": every expert of the group as two large matmuls (``_moe_dense``); "auto":
        dense for bfloat16 weights on the CPU with backend "auto", the kernel otherwise
    cuda_graphs : capture the per-step segment forward as a CUDA graph on CUDA devices (eager fallback)
    """

    def __init__(self, model, *, backend: str = "auto", moe: str = "auto", cuda_graphs: bool = True):
        self.model = model
        self.config = model.config
        self.backend = backends.validate_choice(backend)
        self.cuda_graphs = cuda_graphs
        self.last_stats = GenerationStats()
        self._uncond_cache: tuple | None = None  # (key, _Prefix of the empty prompt)
        self._buffers: dict = {}  # (R, dtype, device) -> preallocated step buffers
        self._graphs: dict = {}  # (R, dtype, device) -> captured CUDA graph state or False
        self._dense_cache: dict = {}  # (layer, group) -> (weights key, dense expert matrices)
        if moe not in ("auto", "kernel", "dense"):
            raise ValueError(f"moe must be 'auto', 'kernel' or 'dense', got {moe!r}")
        self.moe = moe
        c = self.config
        # sequence-level experts that pass h through (copy, and noise at inference) vs output 0 (zero);
        # "semantic"/"identity" pass h through plus an embedding term when one is given
        self._expert_names = {g: SEQ_EXPERTS[g] for g in SEQ_EXPERTS}
        self._codebook = slice(c.image_token_offset, c.image_token_offset + c.codebook_size)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    @property
    def _dense_moe(self) -> bool:
        if self.moe != "auto":
            return self.moe == "dense"
        return self.dtype == torch.bfloat16 and self.device.type == "cpu" and self.backend == "auto"

    def _weights_key(self):
        return (self.dtype, self.device, tuple(p._version for p in self.model.parameters()))

    # --------------------------------------------------------------------------------------- one block
    def _attention_moe(self, layer, x, cos, sin, k_buf, v_buf, start, attn_mask, group_flat, timers):
        """Attention and token-MoE sublayers of one block over new rows x [R, L, H].

        The rows' keys/values are written to k_buf/v_buf [R, nh, Lmax, hd] at [start, start + L) and the rows
        attend to keys [0, start + L) under attn_mask [R, 1, L, start + L] (bool). Returns x [R, L, H].
        """
        R, L, H = x.shape
        nh, hd = self.config.num_heads, self.config.head_dim
        dev = x.device
        with timers.section("attention", dev):
            qkv = F.linear(layer.ln_attn(x), layer.attn.qkv.weight).view(R, L, 3, nh, hd).permute(2, 0, 3, 1, 4)
            q, k = apply_rotary(qkv[:2], cos, sin)  # [R, nh, L, hd] each; q and k in one pass of each op
            v = qkv[2]
            end = start + L
            k_buf[:, :, start:end] = k
            v_buf[:, :, start:end] = v
            y = F.scaled_dot_product_attention(q, k_buf[:, :, :end], v_buf[:, :, :end], attn_mask=attn_mask)
            x = x + F.linear(y.transpose(1, 2).reshape(R, L, H), layer.attn.out.weight)
        with timers.section("moe", dev):
            h = layer.ln_moe(x).reshape(R * L, H)
            if self._dense_moe:
                y = self._moe_dense(layer, h, group_flat)
            else:
                m = layer.moe
                y = ops.grouped_moe(h, group_flat, m.router_weight, m.gate_up_proj, m.down_proj,
                                    top_k=self.config.top_k, shared_gate_up_proj=m.shared_gate_up_proj,
                                    shared_down_proj=m.shared_down_proj, normalize_topk=self.config.normalize_topk,
                                    backend=self.backend)
            x = x + y.view(R, L, H)
        return x

    def _dense_weights(self, layer, g: int):
        """Group g's experts as two matrices: W1 [2D, H] (every gate, then every up) and W2 [H, D], D = E*F + S*Fs."""
        key = (id(layer), g)
        version = self._weights_key()
        hit = self._dense_cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        m = layer.moe
        E, F2, H = m.gate_up_proj.shape[1:]
        Fe = F2 // 2
        gates = [m.gate_up_proj[g, :, :Fe].reshape(E * Fe, H)]
        ups = [m.gate_up_proj[g, :, Fe:].reshape(E * Fe, H)]
        downs = [m.down_proj[g].permute(1, 0, 2).reshape(H, E * Fe)]
        if m.shared_gate_up_proj is not None:
            S, Fs2 = m.shared_gate_up_proj.shape[1:3]
            Fs = Fs2 // 2
            gates.append(m.shared_gate_up_proj[g, :, :Fs].reshape(S * Fs, H))
            ups.append(m.shared_gate_up_proj[g, :, Fs:].reshape(S * Fs, H))
            downs.append(m.shared_down_proj[g].permute(1, 0, 2).reshape(H, S * Fs))
        w1 = torch.cat(gates + ups).contiguous()  # [2D, H]
        w2 = torch.cat(downs, dim=1).contiguous()  # [H, D]
        self._dense_cache[key] = (version, (w1, w2, E, Fe))
        return w1, w2, E, Fe

    def _moe_dense(self, layer, h, group_flat):
        """The grouped MoE as two large matmuls over every expert of the batch's group (h [T, H] -> [T, H]).

        Every token runs all E routed experts and its top-k routing weight scales each expert's activation
        before the down projection (down is linear, so this is the same function); unselected experts get
        weight 0. Twice the routed-expert FLOPs of a sorted dispatch, but no gather/scatter and two matmuls
        that the CPU's bf16 matrix units run at full rate: one face-s layer over 2064 tokens (batch 4 with guidance)
        takes 21 ms against 75 ms for the cpp kernel and 52 ms for the reference (bf16, one thread, one run). The
        arithmetic order differs from the reference's, so "auto" uses it for bfloat16 only.
        """
        from fastface.moe import route

        g = int(group_flat[0])  # the engine batches one task at a time: one group
        m = layer.moe
        w1, w2, E, Fe = self._dense_weights(layer, g)
        D = w2.shape[1]
        gu = F.linear(h, w1)  # [T, 2D]
        a = F.silu(gu[:, :D]) * gu[:, D:]  # [T, D]
        weights, experts = route(h.float() @ m.router_weight[g].float().t(), self.config.top_k,
                                 self.config.normalize_topk)  # [T, K]
        scale = torch.zeros(h.shape[0], E, dtype=torch.float32, device=h.device).scatter_(1, experts, weights)
        a[:, : E * Fe].view(-1, E, Fe).mul_(scale.to(a.dtype)[:, :, None])
        return F.linear(a, w2)

    def _block(self, i, x, cos, sin, k_buf, v_buf, start, attn_mask, group_flat, seq, timers):
        """Block ``i`` with its sequence-level routing fixed: seq = (coefs, adds) from ``_seq_terms``."""
        layer = self.model.layers[i]
        x = self._attention_moe(layer, x, cos, sin, k_buf, v_buf, start, attn_mask, group_flat, timers)
        with timers.section("seq_moe", x.device):
            h = layer.ln_seq(x)
            coefs, adds = seq
            # the operation order of SeqMoE.forward: out = 0 + w0 * e0(h), then out + w1 * e1(h); a term whose
            # expert is Zero for every row adds exactly 0 and is skipped
            terms = [c * (h if a is None else h + a) for c, a in zip(coefs, adds) if c is not None]
            if terms:
                out = terms[0]
                for t in terms[1:]:
                    out = out + t
                x = x + out
        return x

    def _seq_terms(self, route, group: int, e_sem, e_id, layer):
        """Fixed sequence-level routing -> (coefs [2] of [R, 1, 1], adds [2] of [R, 1, H] or None).

        Expert output e(h): copy/noise -> h; zero -> 0 (coefficient 0); semantic/identity -> h + W e when the
        embedding is given, else h. ``route`` = (weights [R, 2] float32, experts [R, 2] int64).
        """
        weights, experts = route
        names = self._expert_names[group]
        dt = self.dtype
        sem = layer.seq_moe.sem_proj(e_sem.to(dt)) if e_sem is not None else None  # [R, H]
        ident = layer.seq_moe.id_proj(e_id.to(dt)) if e_id is not None else None
        coefs, adds = [], []  # coefs[k] None: expert k is Zero for every row
        for k in range(experts.shape[1]):
            w = weights[:, k].to(dt)  # the reference multiplies by weights[b, k].to(h.dtype)
            kinds = [names[int(e)] for e in experts[:, k].tolist()]
            keep = torch.tensor([kd != "zero" for kd in kinds], device=w.device)
            coefs.append(torch.where(keep, w, torch.zeros_like(w))[:, None, None] if any(kd != "zero" for kd in kinds)
                         else None)
            add = None
            for kind, emb in (("semantic", sem), ("identity", ident)):
                if emb is None:
                    continue
                rows = torch.tensor([kd == kind for kd in kinds], device=w.device)
                if bool(rows.any()):
                    term = torch.where(rows[:, None], emb, torch.zeros_like(emb))
                    add = term if add is None else add + term
            adds.append(None if add is None else add[:, None, :])
        return coefs, adds

    # ------------------------------------------------------------------------------------------- prefill
    def _prefill(self, ids, group: int, cond_mask, e_sem, e_id, extra: int, timers) -> tuple[_Prefix, torch.Tensor]:
        """Run prompts ids [Bp, P] through every layer, deciding the sequence-level routing.

        Keys/values are written into buffers with room for ``extra`` more positions. Returns (prefix, x [Bp, P, H]
        after the last layer).
        """
        model, c = self.model, self.config
        Bp, P = ids.shape
        nh, hd = c.num_heads, c.head_dim
        task = torch.full((Bp,), group, dtype=torch.long, device=ids.device)
        attn_mask = omni_attention_mask(ids)[:, None]  # [Bp, 1, P, P]
        positions = default_positions(ids)
        cos, sin = rotary_tables(positions, hd, c.rope_theta)
        group_flat = task.repeat_interleave(P)
        x = model.embed(ids)
        keys, values, routes = [], [], []
        with timers.section("prefill", ids.device):
            for layer in model.layers:
                k_buf = torch.empty(Bp, nh, P + extra, hd, dtype=x.dtype, device=x.device)
                v_buf = torch.empty_like(k_buf)
                x = self._attention_moe(layer, x, cos, sin, k_buf, v_buf, 0, attn_mask, group_flat, _OFF)
                # the routing is decided here, from this layer's sequence-MoE input over the condition
                s, route = layer.seq_moe(layer.ln_seq(x), task, cond_mask, e_sem, e_id)
                x = x + s
                keys.append(k_buf)
                values.append(v_buf)
                routes.append(route)
        prefix = _Prefix(keys, values, routes, ids != PAD_ID, positions[:, -1] + 1)
        return prefix, x

    def _uncond_prefix(self, timers) -> _Prefix:
        """Keys/values of the empty prompt, computed once per model state and shared by every uncond row."""
        key = self._weights_key()
        if self._uncond_cache is None or self._uncond_cache[0] != key:
            ids = t2i_prompt_ids([[]], self.config).to(self.device)
            prefix, _ = self._prefill(ids, GROUP_GENERATION, self._t2i_cond_mask(ids), None, None, 0, timers)
            self._uncond_cache = (key, prefix)
        return self._uncond_cache[1]

    @staticmethod
    def _t2i_cond_mask(ids):
        return ids != PAD_ID  # a t2i prompt holds no <soi>: its non-pad tokens are the condition

    # ------------------------------------------------------------------------------------ text to image
    def _step_buffers(self, R: int, P: int):
        """Per-(R, dtype, device) buffers reused across requests: keys/values, ids, mask, tables."""
        c = self.config
        key = (R, P, self.dtype, self.device)
        buf = self._buffers.get(key)
        if buf is None:
            S, nh, hd = c.image_tokens + 2, c.num_heads, c.head_dim
            kw = dict(dtype=self.dtype, device=self.device)
            buf = dict(
                keys=[torch.empty(R, nh, P + S, hd, **kw) for _ in range(c.num_layers)],
                values=[torch.empty(R, nh, P + S, hd, **kw) for _ in range(c.num_layers)],
                ids=torch.empty(R, S, dtype=torch.long, device=self.device),
                # additive mask (0 / -inf): the same result as the boolean mask, 20% faster in SDPA on the CPU
                mask=torch.zeros(R, 1, S, P + S, **kw),
                group=torch.full((R * S,), GROUP_GENERATION, dtype=torch.long, device=self.device),
            )
            self._buffers[key] = buf
        return buf

    def _segment_forward(self, buf, cos, sin, seq_terms, P, timers):
        """The image segment ids buf["ids"] [R, S] through every layer -> hidden x [R, S, H] (before ln_f)."""
        x = self.model.embed(buf["ids"])
        for i in range(self.config.num_layers):
            x = self._block(i, x, cos, sin, buf["keys"][i], buf["values"][i], P, buf["mask"], buf["group"],
                            seq_terms[i], timers)
        return x

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
        e_sem: torch.Tensor | None = None,
        e_id: torch.Tensor | None = None,
        callback=None,
        timers: Timers | None = None,
    ) -> torch.Tensor:
        """Codebook ids [B, N] int64 of one image per prompt; same contract as the reference sampler.

        Parameters
        ----------
        prompt_ids : LongTensor [B, P] left-padded t2i prompts (``fastface.prompts.t2i_prompt_ids``)
        steps, guidance, seeds, sample_temperature, confidence_temperature, schedule : as
            ``fastface.sampling.generate_image_tokens``
        threshold : float in (0, 1] or None -- confidence-threshold decoding: a masked position whose sampled
            token has probability >= threshold is accepted even when the schedule would keep it masked (at least
            the scheduled number are accepted); decoding stops once nothing is masked. None: the exact schedule.
        e_sem, e_id : accepted for parity with the reference; the generation group's sequence experts (copy,
            zero, noise, copy) read neither
        callback : called as callback(step, tokens [B, N], masked [B, N]) after each step
        timers : ``Timers`` to accumulate the time per section into
        """
        timers = timers or _OFF
        c, model = self.config, self.model
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if threshold is not None and not (0 < threshold <= 1):
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
        device = self.device
        prompt_ids = prompt_ids.to(device)
        B, P = prompt_ids.shape
        N, K, offset = c.image_tokens, c.codebook_size, c.image_token_offset
        S = N + 2
        guided = guidance != 0
        R = 2 * B if guided else B

        # ---- prefill: cond prompts now, the empty prompt once per model; both copied into the step buffers
        buf = self._step_buffers(R, P)
        cond, _ = self._prefill(prompt_ids, GROUP_GENERATION, self._t2i_cond_mask(prompt_ids), None, None, 0, timers)
        parts = [cond]
        if guided:
            parts.append(self._uncond_prefix(timers))
        for i in range(c.num_layers):
            buf["keys"][i][:B, :, :P] = cond.keys[i]
            buf["values"][i][:B, :, :P] = cond.values[i]
            if guided:  # one uncond prompt, expanded over the B uncond rows
                buf["keys"][i][B:, :, :P] = parts[1].keys[i].expand(B, -1, -1, -1)
                buf["values"][i][B:, :, :P] = parts[1].values[i].expand(B, -1, -1, -1)
        valid = torch.cat([p.valid.expand(B, -1) for p in parts])  # [R, P]
        next_pos = torch.cat([p.next_position.expand(B) for p in parts])  # [R]
        # segment rows see the valid prompt keys and the whole segment
        buf["mask"][:, 0, :, :P] = torch.zeros((), dtype=self.dtype, device=device).masked_fill(
            ~valid, float("-inf"))[:, None, :]
        positions = next_pos[:, None] + torch.arange(S, device=device)  # [R, S]
        cos, sin = rotary_tables(positions, c.head_dim, c.rope_theta)  # [R, 1, S, hd]
        seq_terms = []
        for i, layer in enumerate(model.layers):
            w = torch.cat([p.routes[i][0].expand(B, -1) for p in parts])
            e = torch.cat([p.routes[i][1].expand(B, -1) for p in parts])
            seq_terms.append(self._seq_terms((w, e), GROUP_GENERATION, None, None, layer))
        buf["ids"][:, 0] = SOI_ID
        buf["ids"][:, -1] = EOI_ID
        head_w = model.lm_head.weight[self._codebook]  # [K, H] codebook rows only

        # ---- the decoding loop
        tokens = torch.zeros(B, N, dtype=torch.long, device=device)
        masked = torch.ones(B, N, dtype=torch.bool, device=device)
        stats = GenerationStats(steps=steps)
        use_op = threshold is None and backends.resolve("masked_decode_step", self.backend, device.type) != "reference"
        full_logits = torch.zeros(R, N, K, dtype=torch.float32, device=device) if use_op else None
        log_threshold = math.log(threshold) if threshold is not None else None
        graph = self._graph_for(buf, cos, sin, seq_terms, P) if device.type == "cuda" and self.cuda_graphs else None
        stats.cuda_graph = graph is not None
        for step in range(steps):
            if not bool(masked.any()):
                break  # threshold decoding finished early
            stats.steps_run += 1
            stats.masked_per_step.append(int(masked.sum()))
            image_ids = torch.where(masked, torch.full_like(tokens, c.mask_token_id), tokens + offset)
            buf["ids"][:B, 1:-1] = image_ids
            if guided:
                buf["ids"][B:, 1:-1] = image_ids
            if graph is not None:
                graph["cos"].copy_(cos)  # static inputs of the captured graph
                graph["sin"].copy_(sin)
                graph["graph"].replay()
                x = graph["out"]
            else:
                x = self._segment_forward(buf, cos, sin, seq_terms, P, timers)
            with timers.section("lm_head", device):
                # hidden rows of the still-masked image positions only: cond rows, then the same positions of
                # the uncond rows
                hx = x[:, 1:-1]  # [R, N, H]
                rows = masked.repeat(2, 1) if guided else masked  # [R, N]
                h = model.ln_f(hx[rows])  # [R_M, H]
                logits = F.linear(h, head_w)  # [R_M, K] codebook columns only
            with timers.section("noise", device):
                u = step_noise(seeds, step, N, device)
            with timers.section("sampler", device):
                if use_op:
                    full_logits[rows] = logits.float()
                    tokens, masked = ops.masked_decode_step(
                        full_logits, tokens, masked, u, step=step, steps=steps, guidance=guidance,
                        sample_temperature=sample_temperature, confidence_temperature=confidence_temperature,
                        schedule=schedule, backend=self.backend)
                else:
                    tokens, masked = _decode_step_compact(
                        logits, tokens, masked, u, step=step, steps=steps, guidance=guidance,
                        sample_temperature=sample_temperature, confidence_temperature=confidence_temperature,
                        schedule=schedule, log_threshold=log_threshold)
            if callback is not None:
                callback(step, tokens, masked)
        self.last_stats = stats
        return tokens

    # ---------------------------------------------------------------------------------------- CUDA graphs
    def _graph_for(self, buf, cos, sin, seq_terms, P):
        """Capture the segment forward for this buffer set (CUDA only). Returns None when capture fails.

        The graph reads buf["ids"], buf["keys"/"values"] (prompt part), buf["mask"] and the static cos/sin/seq
        tensors in place, so a new request only refills them. A kernel that synchronises with the host (argument
        validation reading a value) makes capture fail; the engine then runs eagerly, with a warning once.
        """
        key = (buf["ids"].shape[0], P, self.dtype, self.device)
        state = self._graphs.get(key)
        if state is False:
            return None
        if state is not None:
            for dst, src in zip(state["seq"], seq_terms):
                for a, b in zip(dst[0], src[0]):
                    a.copy_(b)
                for a, b in zip(dst[1], src[1]):
                    if a is not None:
                        a.copy_(b)
            return state
        try:
            static = dict(cos=cos.clone(), sin=sin.clone(), seq=[([t.clone() for t in co],
                                                                   [None if a is None else a.clone() for a in ad])
                                                                  for co, ad in seq_terms])
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside the graph (allocations, autotuning)
                for _ in range(2):
                    self._segment_forward(buf, static["cos"], static["sin"], static["seq"], P, _OFF)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._segment_forward(buf, static["cos"], static["sin"], static["seq"], P, _OFF)
            state = dict(graph=graph, out=out, **static)
        except Exception as exc:  # capture is an optimisation: any failure means eager, never a wrong result
            warnings.warn(f"fastface: CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            self._graphs[key] = False
            return None
        self._graphs[key] = state
        return state

    # -------------------------------------------------------------------------------------- understanding
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
        timers = timers or _OFF
        model, c = self.model, self.config
        device = self.device
        prompt_ids = prompt_ids.to(device)
        B, L0 = prompt_ids.shape
        hd = c.head_dim
        task = torch.full((B,), GROUP_UNDERSTANDING, dtype=torch.long, device=device)
        cond_mask = prompt_ids != PAD_ID
        generators = None
        if top_p is not None:
            seeds = list(range(B)) if seeds is None else seeds
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        prefix, x = self._prefill(prompt_ids, GROUP_UNDERSTANDING, cond_mask, e_sem, e_id, max_new_tokens, timers)
        cols = slice(0, allowed_vocab if allowed_vocab is not None else c.vocab_size)
        head_w = model.lm_head.weight[cols]  # [V', H]
        with timers.section("lm_head", device):
            logits = F.linear(model.ln_f(x[:, -1]), head_w)  # [B, V'] last position only
        seq_terms = [self._seq_terms(prefix.routes[i], GROUP_UNDERSTANDING, e_sem, e_id, layer)
                     for i, layer in enumerate(model.layers)]
        valid = torch.ones(B, L0 + max_new_tokens, dtype=torch.bool, device=device)
        valid[:, :L0] = prefix.valid
        position = prefix.next_position.clone()  # [B]
        group_flat = task
        done = torch.zeros(B, dtype=torch.bool, device=device)
        answers: list[list[int]] = [[] for _ in range(B)]
        for t in range(max_new_tokens):
            with timers.section("sampler", device):
                nxt = sample_next_token(logits, top_p=top_p, temperature=temperature, generators=generators)
                nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
                for b, tok in enumerate(nxt.tolist()):
                    if not done[b] and tok != EOS_ID:
                        answers[b].append(tok)
                done |= nxt == EOS_ID
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            start = L0 + t
            valid[:, start] = nxt != PAD_ID  # a <pad> sample is fed but never attended to, as in the KV cache
            cos, sin = rotary_tables(position[:, None], hd, c.rope_theta)  # [B, 1, 1, hd]
            mask = valid[:, None, None, : start + 1]  # [B, 1, 1, start + 1]: every valid key, itself included
            x = model.embed(nxt[:, None])
            for i in range(c.num_layers):
                x = self._block(i, x, cos, sin, prefix.keys[i], prefix.values[i], start, mask, group_flat,
                                seq_terms[i], timers)
            position += 1
            with timers.section("lm_head", device):
                logits = F.linear(model.ln_f(x[:, -1]), head_w)
        return answers


def _decode_step_compact(logits, tokens, masked, u, *, step, steps, guidance, sample_temperature,
                         confidence_temperature, schedule, log_threshold=None):
    """``masked_decode_step_reference`` computed only at the still-masked positions.

    logits [R_M, K]: rows of the masked positions of ``masked`` [B, N] in row-major order, cond rows first, then
    (with guidance) the uncond rows of the same positions. The arithmetic per position is the reference's, op for
    op, so the tokens are the same. ``log_threshold``: also accept masked positions with log p(sample) >= it.
    """
    B, N = tokens.shape
    M = logits.shape[0] // (2 if guidance != 0 else 1)
    z = logits.float()
    if guidance != 0:
        z = (1 + guidance) * z[:M] - guidance * z[M:]  # as sampling.guided_logits
    z = z / sample_temperature  # [M, K]
    z_max = z.max(dim=-1, keepdim=True).values
    e = torch.exp(z - z_max)
    c = torch.cumsum(e, dim=-1)  # [M, K], non-decreasing
    total = c[:, -1:]
    threshold = u[0][masked].unsqueeze(-1) * total  # [M, 1]
    # count of c[j] <= threshold == smallest j with c[j] > threshold: a binary search per row, not a K-wide compare
    sampled = torch.searchsorted(c, threshold, right=True).squeeze(-1).clamp(max=z.shape[-1] - 1)
    log_p_m = (z.gather(-1, sampled[:, None]) - z_max - total.log()).squeeze(-1)  # [M]

    log_p = torch.zeros(B, N, dtype=torch.float32, device=tokens.device)
    log_p[masked] = log_p_m
    ratio = (step + 1) / steps
    gumbel = -torch.log(-torch.log(u[1].float()))
    conf = log_p + confidence_temperature * (1.0 - ratio) * gumbel
    conf = torch.where(masked, conf, torch.full_like(conf, math.inf))
    mask_len = scheduled_mask_len(N, masked.sum(dim=-1), step, steps, schedule)  # [B]
    order = torch.sort(conf, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    new_masked = rank < mask_len[:, None]
    if log_threshold is not None:
        new_masked &= ~(masked & (log_p >= log_threshold))
    new_tokens = tokens.clone()
    new_tokens[masked] = sampled
    return new_tokens, new_masked


__all__ = ["Engine", "GenerationStats", "Timers", "SECTIONS"]
