"""The op ``fastface.ops.masked_decode_step`` (fastface/ops/masked_decode.py): its reference, tested as a sampler,
and every backend against it -- exactly the same tokens and mask.

Legend: B sequences, R logits rows (B, or 2B with guidance), N image tokens, V codebook size.

Backends (``fastface.backends``), one row each:
  reference  fastface/ops/masked_decode.py:masked_decode_step_reference -- the oracle
  torch      fastface/torch_backend.py:masked_decode_step_compact -- the sampler's work only at still-masked
             positions, op for op the reference's arithmetic (exact)
  cpp        csrc/masked_decode.cpp through fastface._cpp (CPU); skipped when fastface._C is not built
  triton     fastface/kernels/masked_decode.py, here on CPU tensors under TRITON_INTERPRET=1 (skipped otherwise). The
             interpreter runs one program per position, so its rows stay small; rows of the cases it would take
             minutes on are skipped with that reason.

The opt-in ``threshold`` is implemented by reference and torch only (``backends.OPTIONS``); asked of another backend,
the op runs one that has it.

Sections: the contract, every backend side by side (exactness, then the step as a sampler, then dispatch and argument
checks); the threshold option; then what belongs to one backend: cpp (the built-in math, the portable path, the raw
binding's checks), triton (two-pass rows and block edges, strided inputs and out buffers, the launcher's checks).
"""

import math

import numpy as np
import pytest
import torch

from fastface import backends, ops
from fastface.ops.masked_decode import masked_decode_step_reference, scheduled_mask_len
from fastface.sampling import step_noise
from fastface.testing import backend_marks, backend_rows, make_decode_inputs
from fastface.torch_backend import masked_decode_step_compact

try:
    from fastface import _C, _cpp
except ImportError:  # the cpp rows skip
    _C = _cpp = None

TRITON = backends.triton_usable("cpu")
if TRITON:
    from fastface.kernels.masked_decode import masked_decode_step as triton_masked_decode_step

MARKS = backend_marks("cpu")
needs_cpp, needs_triton = MARKS["cpp"][0], MARKS["triton"][0]


def rows(*names):
    return backend_rows(*names, marks=MARKS)


ALL = rows("reference", "torch", "cpp", "triton")
KERNELS = rows("torch", "cpp", "triton")  # every backend but the oracle
THRESHOLD = backends.OPTIONS[("masked_decode_step", "threshold")]  # the backends that implement it
DTYPES = (torch.float32, torch.bfloat16)


def step_fn(backend):
    """The backend's implementation called directly (no registry, so no fallback can stand in for it)."""
    if backend == "reference":
        return masked_decode_step_reference
    if backend == "torch":
        return masked_decode_step_compact
    if backend == "cpp":
        return _cpp.masked_decode_step
    return triton_masked_decode_step


def both(backend, logits, tokens, masked, u, **kw):
    return step_fn(backend)(logits, tokens, masked, u, **kw), masked_decode_step_reference(logits, tokens, masked, u,
                                                                                           **kw)


def skip_if_slow_interpreted(backend, reason="too slow under TRITON_INTERPRET (one program per position)"):
    if backend == "triton":
        pytest.skip(reason)


def assert_same_step(got, want, masked=None, tokens=None, where=""):
    """Tokens and mask equal (dtypes, shapes and values), with a report of the first differing positions; with
    ``masked`` and ``tokens`` (the step's inputs), also that no known token changed."""
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.bool, f"{where}: {got[0].dtype}, {got[1].dtype}"
    for name, a, b in (("tokens", got[0], want[0]), ("masked", got[1], want[1])):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where} {name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}"
        bad = (a != b).nonzero()
        assert bad.numel() == 0, (f"{where} {name}: {bad.shape[0]} / {a.numel()} positions differ, first (b, i) "
                                  f"{bad[:5].tolist()}: got {a[tuple(bad[:5].T)].tolist()}, "
                                  f"expected {b[tuple(bad[:5].T)].tolist()}")
    if masked is not None:
        assert torch.equal(got[0][~masked], tokens[~masked]), f"{where}: a known token changed"


# ====================================================================================================================
# the contract: every backend's step is the reference's step
# ====================================================================================================================

# "every step": every step of a 6-step schedule, both schedules, temperatures changing; "one step": step 1 of 4
STEP_CASES = [
    *[("every step", B, N, V, g, dtype) for B, N, V in [(1, 1, 1), (1, 7, 2), (3, 7, 33), (3, 129, 1000),
                                                       (1, 129, 8192)] for g in (0.0, 1.7) for dtype in DTYPES],
    *[("one step", B, N, V, g, dtype) for B, N, V in [(1, 1, 1), (3, 7, 2), (1, 67, 33), (3, 7, 257), (2, 5, 1000)]
      for g in (0.0, 2.0) for dtype in DTYPES],
]


def _step_case_id(case):
    mode, B, N, V, g, dtype = case
    return f"{mode.replace(' ', '_')}-{B}x{N}x{V}-g{g}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", STEP_CASES, ids=_step_case_id)
@pytest.mark.parametrize("backend", KERNELS)
def test_step_equals_reference(backend, case):
    mode, B, N, V, guidance, dtype = case
    if mode == "one step":
        logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, dtype=dtype, seed=B * 1000 + N + V)
        kw = dict(step=1, steps=4, guidance=guidance, confidence_temperature=4.5)
        assert_same_step(*both(backend, logits, tokens, masked, u, **kw), masked, tokens, f"B={B} N={N} V={V}")
        return
    if N > 100:
        skip_if_slow_interpreted(backend)
    steps = 6
    for step in range(steps):  # every step of the schedule, the last included
        for schedule in ("cosine", "linear"):
            seed = 1000 * step + (schedule == "linear")
            logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, dtype=dtype, seed=seed)
            kw = dict(step=step, steps=steps, guidance=guidance, sample_temperature=0.8 if step % 2 else 1.0,
                      confidence_temperature=4.5, schedule=schedule)
            assert_same_step(*both(backend, logits, tokens, masked, u, **kw), masked, tokens,
                             f"step {step} {schedule}")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("backend", KERNELS)
def test_every_step_of_a_schedule(backend, schedule):
    steps = 6
    for step in range(steps):  # fresh inputs at every step, the last one included
        logits, tokens, masked, u = make_decode_inputs(3, 13, 45, guidance=1.5, seed=step, masked_fraction=0.8)
        kw = dict(step=step, steps=steps, guidance=1.5, schedule=schedule, sample_temperature=0.8,
                  confidence_temperature=3.0)
        got, want = both(backend, logits, tokens, masked, u, **kw)
        assert_same_step(got, want, masked, tokens, f"step {step}")
        expected_len = scheduled_mask_len(13, masked.sum(-1), step, steps, schedule)
        assert torch.equal(got[1].sum(-1), expected_len)
        assert not bool((got[1] & ~masked).any()), "a known position was re-masked"
    assert not bool(got[1].any()), "positions still masked after the last step"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("logits_kind", ["fresh", "feedback"])
@pytest.mark.parametrize("backend", KERNELS)
def test_full_decoding_loop(backend, logits_kind, guidance, dtype):
    """A whole decode from all-masked: the backend's loop and the reference's stay in lockstep, known tokens never
    change, the scheduled count stays masked, nothing is masked at the end.

    fresh: new random logits every step (B=3, N=129, V=257, 8 steps); feedback: logits depending on the tokens so
    far, each loop feeding its own state (a toy model: B=2, N=16, V=40, 6 steps).
    """
    if logits_kind == "fresh":
        skip_if_slow_interpreted(backend)
        B, N, V, steps, seed, eps = 3, 129, 257, 8, 7, 1e-7
    else:
        B, N, V, steps, seed, eps = 2, 16, 40, 6, 3, 1e-6
    gen = torch.Generator().manual_seed(seed)
    R = 2 * B if guidance else B
    if logits_kind == "feedback":
        base = torch.randn(R, N, V, generator=gen) * 2
        mix = torch.randn(V, V, generator=gen) * 0.3

    def model(tokens, masked):  # [R, N, V]: each position sees the mean embedding of the known tokens
        known = torch.where(masked, torch.zeros_like(tokens), tokens)
        ctx = (mix[known] * (~masked)[..., None]).mean(1, keepdim=True)  # [B, 1, V]
        ctx = torch.cat([ctx, ctx * 0.5]) if guidance else ctx
        return (base + ctx).to(dtype)

    fn = step_fn(backend)
    start = (torch.zeros(B, N, dtype=torch.long), torch.ones(B, N, dtype=torch.bool))
    state = {"got": start, "want": start}
    for step in range(steps):
        if logits_kind == "fresh":
            logits = (torch.randn(R, N, V, generator=gen) * 2).to(dtype)
        u = torch.rand(2, B, N, generator=gen).clamp(eps, 1 - eps)
        kw = dict(step=step, steps=steps, guidance=guidance, confidence_temperature=4.5)
        tokens, masked = state["got"]
        got = fn(logits if logits_kind == "fresh" else model(tokens, masked), tokens, masked, u, **kw)
        want_in = state["want"]
        want = masked_decode_step_reference(logits if logits_kind == "fresh" else model(*want_in), *want_in, u, **kw)
        assert_same_step(got, want, masked, tokens, f"step {step}")
        # sampler properties: the scheduled count stays masked; no known position is masked again
        assert torch.equal(got[1].sum(-1), scheduled_mask_len(N, masked.sum(-1), step, steps))
        assert not bool((got[1] & ~masked).any()), "a known position was re-masked"
        state = {"got": got, "want": want}
    tokens, masked = state["got"]
    assert not bool(masked.any())
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V


@pytest.mark.parametrize("case", ["six-seeds", "temperatures-g0.0-float32", "temperatures-g0.0-bfloat16",
                                  "temperatures-g3.0-float32", "temperatures-g3.0-bfloat16"])
@pytest.mark.parametrize("backend", KERNELS)
def test_many_rows_exact(backend, case):
    """Thousands of rows: boundary disagreements would show up here (six seeds of 16 x 256 rows at guidance 2; or
    about a thousand sampled rows with temperatures)."""
    if case == "six-seeds":
        skip_if_slow_interpreted(backend, "4096 programs a call, six calls: minutes under TRITON_INTERPRET")
        for seed in range(6):
            logits, tokens, masked, u = make_decode_inputs(16, 256, 61, guidance=2.0, masked_fraction=0.9, seed=seed)
            got, want = both(backend, logits, tokens, masked, u, step=seed % 4, steps=4, guidance=2.0,
                             confidence_temperature=3.0)
            assert_same_step(got, want, masked, tokens, f"seed {seed}")
        return
    _, g, dtype = case.split("-")
    guidance, dtype = float(g[1:]), getattr(torch, dtype)
    logits, tokens, masked, u = make_decode_inputs(4, 160, 24, guidance=guidance, dtype=dtype, seed=7,
                                                   masked_fraction=0.8)
    kw = dict(step=2, steps=8, guidance=guidance, sample_temperature=0.7, confidence_temperature=4.5)
    assert_same_step(*both(backend, logits, tokens, masked, u, **kw), masked, tokens)


@pytest.mark.parametrize("backend", ALL)
def test_fully_known_sequences(backend):
    logits, tokens, masked, u = make_decode_inputs(3, 33, 40, guidance=1.0, seed=3)
    masked[1] = False  # sequence 1 fully known
    masked[2] = False
    masked[2, 5] = True  # sequence 2 has a single unknown position: it becomes known
    got, want = both(backend, logits, tokens, masked, u, step=0, steps=4, guidance=1.0)
    assert_same_step(got, want, masked, tokens)
    assert torch.equal(got[0][1], tokens[1]) and not bool(got[1][1].any())
    assert not bool(got[1][2].any())
    masked[:] = False
    got, want = both(backend, logits, tokens, masked, u, step=1, steps=4, guidance=1.0)
    assert_same_step(got, want, masked, tokens)
    assert torch.equal(got[0], tokens)


@pytest.mark.parametrize("backend", ALL)
def test_fully_known_and_fully_masked(backend):
    logits, tokens, _, u = make_decode_inputs(3, 7, 33, seed=1)
    for masked in (torch.zeros(3, 7, dtype=torch.bool), torch.ones(3, 7, dtype=torch.bool)):
        for step in (0, 3):
            got, want = both(backend, logits, tokens, masked, u, step=step, steps=4)
            assert_same_step(got, want, masked, tokens, f"all masked={bool(masked[0, 0])} step={step}")
    got = step_fn(backend)(logits, tokens, torch.zeros(3, 7, dtype=torch.bool), u, step=0, steps=4)
    assert torch.equal(got[0], tokens) and not bool(got[1].any())


@pytest.mark.parametrize("backend", KERNELS)
def test_mixed_known_counts_per_sequence(backend):
    """Sequences with 0, 1, 2 and all unknown positions side by side (mask_len clipping per sequence)."""
    logits, tokens, _, u = make_decode_inputs(4, 9, 17, guidance=1.0, seed=4)
    masked = torch.zeros(4, 9, dtype=torch.bool)
    masked[1, 4] = True
    masked[2, [0, 8]] = True
    masked[3] = True
    for step in range(3):
        got, want = both(backend, logits, tokens, masked, u, step=step, steps=3, guidance=1.0)
        assert_same_step(got, want, masked, tokens, f"step {step}")


# threshold rows for the backends that implement it (asked of another, the op runs one of those: see the threshold
# section)
NEVER_READ_ROWS = [pytest.param(b, t, marks=MARKS[b], id=f"{b}-threshold{t}") for b in MARKS for t in (None, 0.2)
                   if t is None or b in THRESHOLD]


@pytest.mark.parametrize("guidance", [0.0, 2.5])
@pytest.mark.parametrize("B,N,V,steps", [(1, 1, 5, 1), (3, 16, 33, 4), (2, 129, 7, 8)])
@pytest.mark.parametrize("backend, threshold", NEVER_READ_ROWS)
def test_logits_at_known_positions_are_never_read(backend, threshold, guidance, B, N, V, steps):
    """A whole loop through the op, logits at known positions replaced by huge noise: the reference step on clean
    logits, position for position."""
    if N > 100:
        skip_if_slow_interpreted(backend)
    assert backends.resolve("masked_decode_step", backend, "cpu", options=() if threshold is None else
                            ("threshold",)) == backend
    gen = torch.Generator().manual_seed(B * N + V)
    tokens = torch.zeros(B, N, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    for step in range(steps):
        R = 2 * B if guidance else B
        logits = torch.randn(R, N, V, generator=gen) * 3
        u = step_noise(list(range(B)), step, N)
        kw = dict(step=step, steps=steps, guidance=guidance, sample_temperature=0.8, confidence_temperature=3.0,
                  schedule="cosine", threshold=threshold)
        want = masked_decode_step_reference(logits, tokens, masked, u, **kw)
        known_rows = masked.repeat(2, 1) if guidance else masked
        noisy = logits.clone()
        noisy[~known_rows] = torch.randn(int((~known_rows).sum()), V, generator=gen) * 1e4  # never read
        got = ops.masked_decode_step(noisy, tokens, masked, u, backend=backend, **kw)
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[0][masked], want[0][masked]) and torch.equal(got[0][~masked], tokens[~masked])
        tokens, masked = got


# ---- the step as a sampler (every backend) ----------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("B,N,V,steps", [(1, 1, 5, 1), (3, 16, 33, 4), (2, 129, 7, 8)])
@pytest.mark.parametrize("backend", ALL)
def test_full_loop_invariants(backend, guidance, schedule, B, N, V, steps):
    if N > 100:
        skip_if_slow_interpreted(backend)
    gen = torch.Generator().manual_seed(B * N + V)
    tokens = torch.zeros(B, N, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    for step in range(steps):
        R = 2 * B if guidance else B
        logits = torch.randn(R, N, V, generator=gen) * 2
        u = step_noise(list(range(B)), step, N)
        new_tokens, new_masked = ops.masked_decode_step(logits, tokens, masked, u, step=step, steps=steps,
                                                        guidance=guidance, schedule=schedule, backend=backend)
        assert torch.equal(new_tokens[~masked], tokens[~masked]), "known tokens never change"
        assert not bool((new_masked & ~masked).any()), "a known position is never masked again"
        want = scheduled_mask_len(N, masked.sum(1), step, steps, schedule)
        assert new_masked.sum(1).tolist() == want.tolist(), "each step leaves the scheduled number masked"
        assert bool(((new_tokens >= 0) & (new_tokens < V)).all())
        tokens, masked = new_tokens, new_masked
    assert not bool(masked.any()), "no position is masked after the last step"


FREQUENCY_CASES = {
    # V, draws, logits row (generator seed 0 draws it, then the noise), the temperatures tau
    "V12-tau1.0-0.5": (12, 20_000, None, (1.0, 0.5)),
    "V6-tau1.3": (6, 40_000, torch.tensor([0.5, -1.0, 2.0, -math.inf, 0.0, 1.0]), (1.3,)),
}


@pytest.mark.parametrize("case", FREQUENCY_CASES)
@pytest.mark.parametrize("backend", ALL)
def test_sampling_frequencies_match_softmax(backend, case):
    """Observed frequencies of the inverse-CDF sample against softmax(logits / tau) over many draws; a token of
    probability zero (a -inf logit) is never drawn."""
    skip_if_slow_interpreted(backend, "20,000-40,000 sampled rows: minutes under TRITON_INTERPRET (its rows equal the "
                                      "reference's, test_step_equals_reference)")
    V, draws, row, taus = FREQUENCY_CASES[case]
    gen = torch.Generator().manual_seed(0)
    if row is None:
        row = torch.randn(V, generator=gen) * 1.5
        row[3] = -math.inf  # zero probability: never drawn
    for tau in taus:
        logits = row.expand(1, draws, V).contiguous()
        u = torch.rand(2, 1, draws, generator=gen).clamp(1e-7, 1 - 1e-7)
        tokens, _ = step_fn(backend)(logits, torch.zeros(1, draws, dtype=torch.long),
                                     torch.ones(1, draws, dtype=torch.bool), u, step=0, steps=2,
                                     sample_temperature=tau)
        freq = torch.bincount(tokens[0], minlength=V).double() / draws
        p = torch.softmax(row.double() / tau, 0)
        assert freq[3] == 0, "a zero-probability token was drawn"
        cos = torch.nn.functional.cosine_similarity(freq, p, dim=0)
        assert cos > 0.99, f"frequencies differ from softmax (cosine {cos:.4f})"
        assert (freq - p).abs().max() < 0.02
        assert torch.allclose(freq, p, atol=4 * math.sqrt(0.25 / draws)), (freq, p)  # 4 sigma of a frequency


@pytest.mark.parametrize("backend", ALL)
def test_zero_probability_tokens_never_drawn(backend):
    logits, tokens, masked, u = make_decode_inputs(2, 30, 64, seed=5, masked_fraction=1.0)
    logits[..., 1::2] = -math.inf  # odd codebook ids impossible
    got, want = both(backend, logits, tokens, masked, u, step=0, steps=2)
    assert_same_step(got, want, masked, tokens)
    assert bool((got[0] % 2 == 0).all())


@pytest.mark.parametrize("backend", ALL)
def test_guidance_combination_and_lowest_confidence_remasked(backend):
    B, N, V = 1, 6, 4
    cond = torch.randn(B, N, V)
    uncond = torch.randn(B, N, V)
    u = torch.rand(2, B, N).clamp(1e-6, 1 - 1e-6)
    masked = torch.ones(B, N, dtype=torch.bool)
    tokens = torch.zeros(B, N, dtype=torch.long)
    w = 1.5
    fn = step_fn(backend)
    a = fn(torch.cat([cond, uncond]), tokens, masked, u, step=0, steps=3, guidance=w, confidence_temperature=0.0)
    b = fn((1 + w) * cond - w * uncond, tokens, masked, u, step=0, steps=3, confidence_temperature=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # with no Gumbel noise the positions left masked are exactly those with the lowest log p of the sample
    logits = (1 + w) * cond - w * uncond
    logp = torch.log_softmax(logits, -1).gather(-1, a[0][..., None]).squeeze(-1)
    k = int(a[1].sum())
    lowest = set(torch.argsort(logp[0])[:k].tolist())
    assert set(torch.nonzero(a[1][0]).squeeze(1).tolist()) == lowest


@pytest.mark.parametrize("backend", ALL)
def test_ties_go_to_the_lower_position(backend):
    """Identical rows and noise: equal confidences everywhere, the stable order decides."""
    B, N, V = 2, 11, 5
    logits = torch.randn(1, 1, V).expand(B, N, V).contiguous()
    u = torch.full((2, B, N), 0.37)
    masked = torch.ones(B, N, dtype=torch.bool)
    tokens = torch.zeros(B, N, dtype=torch.long)
    got, want = both(backend, logits, tokens, masked, u, step=0, steps=3)
    assert_same_step(got, want, masked, tokens)
    mask_len = int(got[1][0].sum())
    assert mask_len > 0 and bool(got[1][:, :mask_len].all()) and not bool(got[1][:, mask_len:].any())


def test_schedule_counts():
    n = torch.tensor([256, 10, 1, 0])
    assert scheduled_mask_len(256, n, 0, 16).tolist() == [math.floor(256 * math.cos(math.pi / 2 / 16)), 9, 0, 0]
    assert scheduled_mask_len(256, n, 15, 16).tolist() == [0, 0, 0, 0]


# ---- dispatch and argument checks -------------------------------------------------------------------------------


THROUGH_OPS = {
    "2x17x50-float32": (make_decode_inputs(2, 17, 50, guidance=2.0, seed=5), dict(step=1, steps=4, guidance=2.0)),
    "2x9x33-bfloat16": (make_decode_inputs(2, 9, 33, guidance=2.0, dtype=torch.bfloat16, seed=8),
                        dict(step=0, steps=4, guidance=2.0, confidence_temperature=4.5)),
}


@pytest.mark.parametrize("case", THROUGH_OPS)
@pytest.mark.parametrize("backend", ALL)
def test_through_ops(backend, case):
    """``ops.masked_decode_step(backend=...)`` runs that backend (no fallback) and gives the reference's step."""
    (logits, tokens, masked, u), kw = THROUGH_OPS[case]
    assert backends.resolve("masked_decode_step", backend, "cpu") == backend
    got = ops.masked_decode_step(logits, tokens, masked, u, backend=backend, **kw)
    assert_same_step(got, ops.masked_decode_step(logits, tokens, masked, u, backend="reference", **kw))
    assert_same_step(got, masked_decode_step_reference(logits, tokens, masked, u, **kw), masked, tokens)


@needs_cpp
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_and_cpp_agree(dtype):
    logits, tokens, masked, u = make_decode_inputs(3, 67, 257, guidance=2.0, dtype=dtype, seed=9)
    kw = dict(step=1, steps=5, guidance=2.0, confidence_temperature=4.5)
    got = ops.masked_decode_step(logits, tokens, masked, u, backend="triton", **kw)
    assert_same_step(got, ops.masked_decode_step(logits, tokens, masked, u, backend="cpp", **kw), masked, tokens)


@pytest.mark.parametrize("backend", [pytest.param("auto", id="auto"), *ALL])
def test_decode_step_validation(backend):
    """The contract checks once, before any backend runs: whichever is asked for, a bad argument raises."""
    logits, tokens, masked, u = make_decode_inputs(2, 5, 7, guidance=1.0)
    kw = dict(step=0, steps=4, guidance=1.0, backend=backend)
    ops.masked_decode_step(logits, tokens, masked, u, **kw)
    with pytest.raises(ValueError, match="logits"):
        ops.masked_decode_step(logits[:2], tokens, masked, u, **kw)
    with pytest.raises(ValueError, match="step"):
        ops.masked_decode_step(logits, tokens, masked, u, **dict(kw, step=4))
    with pytest.raises(ValueError, match="steps"):
        ops.masked_decode_step(logits, tokens, masked, u, **dict(kw, steps=0, step=0))
    with pytest.raises(ValueError, match="guidance"):
        ops.masked_decode_step(logits, tokens, masked, u, **dict(kw, guidance=float("nan")))
    with pytest.raises(ValueError, match="u must"):
        ops.masked_decode_step(logits, tokens, masked, u * 0, **kw)
    with pytest.raises(TypeError, match="masked"):
        ops.masked_decode_step(logits, tokens, masked.long(), u, **kw)
    bad = tokens.clone()
    bad[~masked] = 7
    if (~masked).any():
        with pytest.raises(ValueError, match="tokens"):
            ops.masked_decode_step(logits, bad, masked, u, **kw)
    with pytest.raises(TypeError, match="logits"):
        ops.masked_decode_step(logits.double(), tokens, masked, u, **kw)
    with pytest.raises(ValueError, match="threshold"):
        ops.masked_decode_step(logits, tokens, masked, u, threshold=1.5, **kw)
    banned = logits.clone()
    banned[:, :, 3] = -math.inf  # banned in both rows: (1 + w) * -inf - w * -inf would be NaN, then token 0
    with pytest.raises(ValueError, match=r"-inf \(first at row 0, position 0\) with guidance 1.0.*-1e30"):
        ops.masked_decode_step(banned, tokens, masked, u, **kw)
    banned[:, :, 3] = -1e30  # the finite ban: never drawn
    got, _ = ops.masked_decode_step(banned, tokens, masked, u, **kw)
    assert not bool((got[masked] == 3).any())
    unguided = dict(kw, guidance=0.0)
    banned = logits[:2].clone()
    banned[:, :, 3] = -math.inf  # without guidance -inf is how a token is banned
    got, _ = ops.masked_decode_step(banned, tokens, masked, u, **unguided)
    assert not bool((got[masked] == 3).any())


# ====================================================================================================================
# the threshold option (reference and torch; the op runs one of them when another backend is asked)
# ====================================================================================================================


@pytest.mark.parametrize("backend", ALL)
def test_threshold_falls_back_to_a_backend_that_has_it(backend):
    logits, tokens, masked, u = make_decode_inputs(3, 40, 16, guidance=1.5, seed=12, masked_fraction=0.9)
    kw = dict(step=1, steps=6, guidance=1.5, threshold=0.25)
    resolved = backends.resolve("masked_decode_step", backend, "cpu", options=("threshold",))
    assert resolved in THRESHOLD and (resolved == backend or backend not in THRESHOLD)
    got = ops.masked_decode_step(logits, tokens, masked, u, backend=backend, **kw)
    assert_same_step(got, masked_decode_step_reference(logits, tokens, masked, u, **kw), masked, tokens)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("backend", rows(*THRESHOLD))
def test_threshold_accepts_every_confident_sample(backend, guidance):
    """On top of the schedule, every masked position whose sample has probability >= threshold is accepted: the
    mask is the scheduled one less those positions (so at least the scheduled number is accepted)."""
    logits, tokens, masked, u = make_decode_inputs(3, 50, 12, guidance=guidance, seed=13, masked_fraction=0.9)
    kw = dict(step=1, steps=8, guidance=guidance, sample_temperature=0.9)
    plain = step_fn(backend)(logits, tokens, masked, u, **kw)
    got = step_fn(backend)(logits, tokens, masked, u, threshold=0.5, **kw)
    assert torch.equal(got[0], plain[0]), "the threshold changes which positions are accepted, not the samples"
    B = tokens.shape[0]
    guided = logits.float() if guidance == 0 else (1 + guidance) * logits[:B].float() - guidance * logits[B:].float()
    p = torch.softmax(guided / 0.9, -1).gather(-1, got[0][..., None]).squeeze(-1)  # [B, N] probability of the sample
    confident = masked & (p >= 0.5)
    assert 0 < int(confident.sum()) < int(masked.sum()), "a case with some confident and some unsure samples"
    assert torch.equal(got[1], plain[1] & ~confident)
    assert bool((got[1].sum(1) <= scheduled_mask_len(50, masked.sum(1), 1, 8)).all())
    assert torch.equal(got[0][~masked], tokens[~masked]) and not bool((got[1] & ~masked).any())


# ====================================================================================================================
# cpp: the built-in math, the portable path, the raw binding's checks
# ====================================================================================================================


@needs_cpp
def test_cpp_builtin_math_agrees_almost_always():
    """Without torch's own exp/log the kernel uses double-evaluated ones: same tokens on (nearly) every row."""
    if _C.reference_math() != "vml":
        pytest.skip("already on the built-in exp/log")
    try:
        assert _cpp.set_decode_math("builtin") == "builtin"
        logits, tokens, masked, u = make_decode_inputs(8, 256, 1000, guidance=2.0, masked_fraction=1.0, seed=11)
        got, want = both("cpp", logits, tokens, masked, u, step=2, steps=8, guidance=2.0)
        assert (got[0] != want[0]).float().mean() <= 1e-3
        assert (got[1] != want[1]).float().mean() <= 1e-2
    finally:
        _cpp.set_decode_math("auto")


@pytest.fixture
def portable_paths():
    _C.set_simd_kernels(False)
    yield
    _C.set_simd_kernels(True)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_portable_path_equals_reference(portable_paths, dtype):
    """The scalar code CPUs without AVX2 run gives the same tokens and mask."""
    for B, N, V, guidance in [(3, 7, 33, 0.0), (2, 129, 1000, 1.7), (1, 5, 1, 2.0)]:
        logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, dtype=dtype, seed=N)
        got, want = both("cpp", logits, tokens, masked, u, step=1, steps=4, guidance=guidance, sample_temperature=0.7)
        assert_same_step(got, want, masked, tokens, f"B={B} N={N} V={V}")


def raw_args(B=2, N=5, V=7, guidance=0.0):
    logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, seed=0)
    return dict(logits=logits.numpy(), tokens=tokens.numpy(), masked=masked.numpy(), u=u.numpy(), step=0, steps=4,
                guidance=guidance, sample_temperature=1.0, confidence_temperature=1.0, schedule="cosine")


@needs_cpp
@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(logits=a["logits"].astype(np.float64)), TypeError, "logits must have dtype"),
    (lambda a: a.update(tokens=a["tokens"].astype(np.int32)), TypeError, "tokens must have dtype"),
    (lambda a: a.update(u=a["u"].astype(np.float64)), TypeError, "u must have dtype"),
    (lambda a: a.update(logits=np.asfortranarray(a["logits"])), ValueError, "logits must be C-contiguous"),
    (lambda a: a.update(tokens=a["tokens"][:, ::2]), ValueError, "tokens must be C-contiguous|shape"),
    (lambda a: a.update(logits=a["logits"][:1]), ValueError, "logits must have shape"),
    (lambda a: a.update(guidance=2.0), ValueError, "logits must have shape"),
    (lambda a: a.update(masked=a["masked"][:, :3].copy()), ValueError, "masked must have shape"),
    (lambda a: a.update(u=a["u"][:1].copy()), ValueError, "u must have shape"),
    (lambda a: a.update(logits=a["logits"][0]), ValueError, "logits must have 3 dims"),
    (lambda a: a.update(step=4), ValueError, "step=4 out of range"),
    (lambda a: a.update(step=-1), ValueError, "step=-1 out of range"),
    (lambda a: a.update(steps=-3), ValueError, "steps must be >= 1"),
    (lambda a: a.update(sample_temperature=0.0), ValueError, "sample_temperature"),
    (lambda a: a.update(confidence_temperature=-1.0), ValueError, "confidence_temperature"),
    (lambda a: a.update(guidance=math.nan), ValueError, "guidance must be finite"),
    (lambda a: a.update(schedule="exp"), ValueError, "schedule"),
    (lambda a: a["u"].__setitem__((1, 0, 0), 1.0), ValueError, "u must lie strictly inside"),
    (lambda a: a["u"].__setitem__((0, 1, 2), 0.0), ValueError, "u must lie strictly inside"),
    (lambda a: (a["masked"].__setitem__((0, 1), False), a["tokens"].__setitem__((0, 1), 7)), ValueError,
     r"tokens at known positions must lie in \[0, 7\)"),
    (lambda a: (a["masked"].__setitem__((1, 1), False), a["tokens"].__setitem__((1, 1), -1)), ValueError,
     "tokens at known positions"),
    (lambda a: a.update(logits=[[[0.0]]]), TypeError, "logits must be a numpy array"),
])
def test_cpp_raw_binding_rejects_bad_arguments(change, error, match):
    args = raw_args()
    change(args)
    with pytest.raises(error, match=match):
        _C.masked_decode_step(**args)


@needs_cpp
def test_cpp_raw_binding_accepts_empty_and_masked_garbage():
    args = raw_args()
    args["tokens"][args["masked"]] = 10**12  # values at masked positions are ignored
    _C.masked_decode_step(**args)
    empty = raw_args(B=0, N=0)
    tokens, masked = _C.masked_decode_step(**empty)
    assert tokens.shape == (0, 0) and masked.shape == (0, 0)


# ====================================================================================================================
# triton: two-pass rows and block edges, strided inputs and out buffers, the launcher's checks
# ====================================================================================================================


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("V,block_v", [(17, 16), (33, 16), (257, 32), (1000, 128)])
def test_triton_two_pass_rows(V, block_v, guidance, dtype):
    """Rows longer than the block: online max/total, then the blockwise cumsum search."""
    logits, tokens, masked, u = make_decode_inputs(2, 24, V, guidance=guidance, dtype=dtype, seed=V,
                                                   masked_fraction=0.9)
    kw = dict(step=0, steps=3, guidance=guidance, sample_temperature=1.3, confidence_temperature=4.5)
    got = triton_masked_decode_step(logits, tokens, masked, u, block_v=block_v, **kw)
    assert_same_step(got, masked_decode_step_reference(logits, tokens, masked, u, **kw), masked, tokens)


@needs_triton
def test_triton_two_pass_sample_at_block_edges():
    """u1 driving the sample to the first and last columns and across block boundaries."""
    B, N, V = 1, 40, 64
    logits = torch.zeros(B, N, V)  # uniform rows: cumsum[j] = (j + 1) / V exactly
    tokens = torch.zeros(B, N, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    u = torch.rand(2, B, N, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    u[0, 0, :] = torch.tensor([1e-6, 1 - 1e-6, 15.5 / 64, 16.5 / 64, 31.5 / 64, 32.5 / 64, 63.5 / 64] + [0.5] * 33)
    for block_v in (16, 32, None):
        got = triton_masked_decode_step(logits, tokens, masked, u, step=0, steps=2, block_v=block_v)
        want = masked_decode_step_reference(logits, tokens, masked, u, step=0, steps=2)
        assert_same_step(got, want, masked, tokens, f"block_v={block_v}")
        assert got[0][0, :7].tolist() == [0, 63, 15, 16, 31, 32, 63]


@needs_triton
def test_triton_strided_logits_and_out_buffers():
    """Logits as the model hands them over (a slice of a wider tensor); results written into given buffers."""
    B, N, V = 2, 6, 19
    wide = torch.randn(2 * B, N + 3, V + 7) * 3
    logits = wide[:, 2 : 2 + N, 4 : 4 + V]  # [R, N, V], not contiguous
    _, tokens, masked, u = make_decode_inputs(B, N, V, seed=6)
    out = (torch.empty(B, N, dtype=torch.long), torch.empty(B, N, dtype=torch.bool))
    kw = dict(step=0, steps=2, guidance=2.0)
    got = triton_masked_decode_step(logits, tokens, masked, u, out=out, **kw)
    assert got[0] is out[0] and got[1] is out[1]
    assert_same_step(got, masked_decode_step_reference(logits.contiguous(), tokens, masked, u, **kw), masked, tokens)


@needs_triton
def test_triton_in_place_step():
    """out=(tokens, masked): the step overwrites its own inputs and still equals the reference."""
    logits, tokens, masked, u = make_decode_inputs(3, 70, 21, guidance=1.0, seed=10)
    kw = dict(step=1, steps=4, guidance=1.0)
    want = masked_decode_step_reference(logits, tokens, masked, u, **kw)
    prev_tokens, prev_masked = tokens.clone(), masked.clone()
    got = triton_masked_decode_step(logits, tokens, masked, u, out=(tokens, masked), **kw)
    assert got[0] is tokens and got[1] is masked
    assert_same_step(got, want, prev_masked, prev_tokens)


@needs_triton
def test_triton_rejects_bad_shapes():
    logits, tokens, masked, u = make_decode_inputs(2, 5, 7, seed=0)
    with pytest.raises(ValueError):
        triton_masked_decode_step(logits, tokens, masked, u, step=0, steps=2, guidance=1.0)  # guidance needs 2B rows
    with pytest.raises(TypeError):
        triton_masked_decode_step(logits.half(), tokens, masked, u, step=0, steps=2)
    with pytest.raises(ValueError):
        triton_masked_decode_step(logits, tokens, masked, u, step=2, steps=2)
