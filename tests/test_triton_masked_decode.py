"""Triton masked-decode step (kernels/masked_decode.py) against the reference sampler: exactly the same tokens and mask.

Runs under TRITON_INTERPRET=1 on a CPU (skipped when Triton cannot run here). The interpreter runs one program
at a time, so shapes stay small; "many rows" means a few thousand sampled rows over the file.
"""

import math

import pytest
import torch

from fastface import ops
from fastface.backends import available, triton_usable
from fastface.ops.masked_decode import masked_decode_step_reference, scheduled_mask_len
from fastface.testing import make_decode_inputs

pytestmark = pytest.mark.skipif(not triton_usable("cpu"), reason="Triton not usable here (set TRITON_INTERPRET=1)")

if triton_usable("cpu"):
    from fastface.kernels.masked_decode import masked_decode_step


def _both(logits, tokens, masked, u, **kw):
    got = masked_decode_step(logits, tokens, masked, u, **kw)
    want = masked_decode_step_reference(logits, tokens, masked, u, **kw)
    return got, want


def assert_same_step(got, want, masked, tokens, where=""):
    (got_tokens, got_masked), (want_tokens, want_masked) = got, want
    assert got_tokens.dtype == torch.int64 and got_masked.dtype == torch.bool
    bad = (got_tokens != want_tokens).nonzero().tolist()
    assert not bad, f"{where}: {len(bad)} tokens differ, first at {bad[:5]}: got {got_tokens[tuple(bad[0])]}, " \
                    f"expected {want_tokens[tuple(bad[0])]}"
    bad = (got_masked != want_masked).nonzero().tolist()
    assert not bad, f"{where}: {len(bad)} mask entries differ, first at {bad[:5]}"
    assert torch.equal(got_tokens[~masked], tokens[~masked]), f"{where}: a known token changed"


SHAPES = [(1, 1, 1), (3, 7, 2), (1, 67, 33), (3, 7, 257), (2, 5, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("B,N,V", SHAPES)
def test_step_matches_reference(B, N, V, guidance, dtype):
    logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, dtype=dtype, seed=B * 1000 + N + V)
    kw = dict(step=1, steps=4, guidance=guidance, confidence_temperature=4.5)
    assert_same_step(*_both(logits, tokens, masked, u, **kw), masked, tokens, f"B={B} N={N} V={V}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("V,block_v", [(17, 16), (33, 16), (257, 32), (1000, 128)])
def test_two_pass_rows(V, block_v, guidance, dtype):
    """Rows longer than the block: online max/total, then the blockwise cumsum search."""
    logits, tokens, masked, u = make_decode_inputs(2, 24, V, guidance=guidance, dtype=dtype, seed=V,
                                                   masked_fraction=0.9)
    kw = dict(step=0, steps=3, guidance=guidance, sample_temperature=1.3, confidence_temperature=4.5)
    got = masked_decode_step(logits, tokens, masked, u, block_v=block_v, **kw)
    assert_same_step(got, masked_decode_step_reference(logits, tokens, masked, u, **kw), masked, tokens)


def test_two_pass_sample_at_block_edges():
    """u1 driving the sample to the first and last columns and across block boundaries."""
    B, N, V = 1, 40, 64
    logits = torch.zeros(B, N, V)  # uniform rows: cumsum[j] = (j + 1) / V exactly
    tokens = torch.zeros(B, N, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    u = torch.rand(2, B, N, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    u[0, 0, :] = torch.tensor([1e-6, 1 - 1e-6, 15.5 / 64, 16.5 / 64, 31.5 / 64, 32.5 / 64, 63.5 / 64] + [0.5] * 33)
    for block_v in (16, 32, None):
        got = masked_decode_step(logits, tokens, masked, u, step=0, steps=2, block_v=block_v)
        want = masked_decode_step_reference(logits, tokens, masked, u, step=0, steps=2)
        assert_same_step(got, want, masked, tokens, f"block_v={block_v}")
        assert got[0][0, :7].tolist() == [0, 63, 15, 16, 31, 32, 63]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_every_step_of_a_schedule(schedule):
    steps = 6
    for step in range(steps):  # fresh inputs at every step, the last one included
        logits, tokens, masked, u = make_decode_inputs(3, 13, 45, guidance=1.5, seed=step, masked_fraction=0.8)
        kw = dict(step=step, steps=steps, guidance=1.5, schedule=schedule, sample_temperature=0.8,
                  confidence_temperature=3.0)
        got, want = _both(logits, tokens, masked, u, **kw)
        assert_same_step(got, want, masked, tokens, f"step {step}")
        expected_len = scheduled_mask_len(13, masked.sum(-1), step, steps, schedule)
        assert torch.equal(got[1].sum(-1), expected_len)
        assert not bool((got[1] & ~masked).any()), "a known position was re-masked"
    assert not bool(got[1].any()), "positions still masked after the last step"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_many_rows(guidance, dtype):
    """About a thousand sampled rows with temperatures: exact, or a boundary case worth a look."""
    logits, tokens, masked, u = make_decode_inputs(4, 160, 24, guidance=guidance, dtype=dtype, seed=7,
                                                   masked_fraction=0.8)
    kw = dict(step=2, steps=8, guidance=guidance, sample_temperature=0.7, confidence_temperature=4.5)
    assert_same_step(*_both(logits, tokens, masked, u, **kw), masked, tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_full_decoding_loop(guidance, dtype):
    """A whole decode from all-masked, logits depending on the tokens so far: both loops stay identical."""
    B, N, V, steps = 2, 16, 40, 6
    gen = torch.Generator().manual_seed(3)
    R = 2 * B if guidance else B
    base = torch.randn(R, N, V, generator=gen) * 2
    mix = torch.randn(V, V, generator=gen) * 0.3

    def model(tokens, masked):  # [R, N, V]: each position sees the mean embedding of the known tokens
        known = torch.where(masked, torch.zeros_like(tokens), tokens)
        ctx = (mix[known] * (~masked)[..., None]).mean(1, keepdim=True)  # [B, 1, V]
        ctx = torch.cat([ctx, ctx * 0.5]) if guidance else ctx
        return (base + ctx).to(dtype)

    state = {name: (torch.zeros(B, N, dtype=torch.long), torch.ones(B, N, dtype=torch.bool))
             for name in ("triton", "reference")}
    for step in range(steps):
        u = torch.rand(2, B, N, generator=gen).clamp(1e-6, 1 - 1e-6)
        kw = dict(step=step, steps=steps, guidance=guidance, confidence_temperature=4.5)
        prev_tokens, prev_masked = state["triton"]
        state["triton"] = masked_decode_step(model(*state["triton"]), *state["triton"], u, **kw)
        state["reference"] = masked_decode_step_reference(model(*state["reference"]), *state["reference"], u, **kw)
        assert_same_step(state["triton"], state["reference"], prev_masked, prev_tokens, f"step {step}")
    assert not bool(state["triton"][1].any())


def test_fully_known_and_fully_masked():
    logits, tokens, _, u = make_decode_inputs(3, 7, 33, seed=1)
    for masked in (torch.zeros(3, 7, dtype=torch.bool), torch.ones(3, 7, dtype=torch.bool)):
        for step in (0, 3):
            got, want = _both(logits, tokens, masked, u, step=step, steps=4)
            assert_same_step(got, want, masked, tokens, f"all masked={bool(masked[0, 0])} step={step}")
    got = masked_decode_step(logits, tokens, torch.zeros(3, 7, dtype=torch.bool), u, step=0, steps=4)
    assert torch.equal(got[0], tokens) and not bool(got[1].any())


def test_mixed_known_counts_per_sequence():
    """Sequences with 0, 1, 2 and all unknown positions side by side (mask_len clipping per sequence)."""
    logits, tokens, _, u = make_decode_inputs(4, 9, 17, guidance=1.0, seed=4)
    masked = torch.zeros(4, 9, dtype=torch.bool)
    masked[1, 4] = True
    masked[2, [0, 8]] = True
    masked[3] = True
    for step in range(3):
        got, want = _both(logits, tokens, masked, u, step=step, steps=3, guidance=1.0)
        assert_same_step(got, want, masked, tokens, f"step {step}")


def test_zero_probability_tokens_never_drawn():
    logits, tokens, masked, u = make_decode_inputs(2, 30, 64, seed=5, masked_fraction=1.0)
    logits[..., 1::2] = -math.inf  # odd codebook ids impossible
    got, want = _both(logits, tokens, masked, u, step=0, steps=2)
    assert_same_step(got, want, masked, tokens)
    assert bool((got[0] % 2 == 0).all())


def test_ties_go_to_the_lower_position():
    """Identical rows and noise: equal confidences everywhere, the stable order decides."""
    B, N, V = 2, 11, 5
    logits = torch.randn(1, 1, V).expand(B, N, V).contiguous()
    u = torch.full((2, B, N), 0.37)
    masked = torch.ones(B, N, dtype=torch.bool)
    tokens = torch.zeros(B, N, dtype=torch.long)
    got, want = _both(logits, tokens, masked, u, step=0, steps=3)
    assert_same_step(got, want, masked, tokens)
    mask_len = int(got[1][0].sum())
    assert mask_len > 0 and bool(got[1][:, :mask_len].all()) and not bool(got[1][:, mask_len:].any())


def test_strided_logits_and_out_buffers():
    """Logits as the model hands them over (a slice of a wider tensor); results written into given buffers."""
    B, N, V = 2, 6, 19
    wide = torch.randn(2 * B, N + 3, V + 7) * 3
    logits = wide[:, 2 : 2 + N, 4 : 4 + V]  # [R, N, V], not contiguous
    _, tokens, masked, u = make_decode_inputs(B, N, V, seed=6)
    out = (torch.empty(B, N, dtype=torch.long), torch.empty(B, N, dtype=torch.bool))
    kw = dict(step=0, steps=2, guidance=2.0)
    got = masked_decode_step(logits, tokens, masked, u, out=out, **kw)
    assert got[0] is out[0] and got[1] is out[1]
    assert_same_step(got, masked_decode_step_reference(logits.contiguous(), tokens, masked, u, **kw), masked, tokens)


def test_in_place_step():
    """out=(tokens, masked): the step overwrites its own inputs and still equals the reference."""
    logits, tokens, masked, u = make_decode_inputs(3, 70, 21, guidance=1.0, seed=10)
    kw = dict(step=1, steps=4, guidance=1.0)
    want = masked_decode_step_reference(logits, tokens, masked, u, **kw)
    prev_tokens, prev_masked = tokens.clone(), masked.clone()
    got = masked_decode_step(logits, tokens, masked, u, out=(tokens, masked), **kw)
    assert got[0] is tokens and got[1] is masked
    assert_same_step(got, want, prev_masked, prev_tokens)


def test_through_ops_backend():
    logits, tokens, masked, u = make_decode_inputs(2, 9, 33, guidance=2.0, dtype=torch.bfloat16, seed=8)
    kw = dict(step=0, steps=4, guidance=2.0, confidence_temperature=4.5)
    got = ops.masked_decode_step(logits, tokens, masked, u, backend="triton", **kw)
    assert_same_step(got, masked_decode_step_reference(logits, tokens, masked, u, **kw), masked, tokens)


@pytest.mark.skipif(not available("masked_decode_step", "cpp"), reason="cpp backend has no masked_decode_step here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_cpp_agree(dtype):
    logits, tokens, masked, u = make_decode_inputs(3, 67, 257, guidance=2.0, dtype=dtype, seed=9)
    kw = dict(step=1, steps=5, guidance=2.0, confidence_temperature=4.5)
    got = ops.masked_decode_step(logits, tokens, masked, u, backend="triton", **kw)
    assert_same_step(got, ops.masked_decode_step(logits, tokens, masked, u, backend="cpp", **kw), masked, tokens)


def test_rejects_bad_shapes():
    logits, tokens, masked, u = make_decode_inputs(2, 5, 7, seed=0)
    with pytest.raises(ValueError):
        masked_decode_step(logits, tokens, masked, u, step=0, steps=2, guidance=1.0)  # guidance needs 2B rows
    with pytest.raises(TypeError):
        masked_decode_step(logits.half(), tokens, masked, u, step=0, steps=2)
    with pytest.raises(ValueError):
        masked_decode_step(logits, tokens, masked, u, step=2, steps=2)
