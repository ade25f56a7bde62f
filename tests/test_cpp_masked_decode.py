"""C++ masked-token decoding step (csrc/masked_decode.cpp) against the reference sampler: exact tokens and mask."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("fastface._C", reason="fastface._C is not built (python setup.py build_ext --inplace)")

from fastface import _cpp, ops  # noqa: E402
from fastface._cpp import _C  # noqa: E402
from fastface.ops.masked_decode import masked_decode_step_reference, scheduled_mask_len  # noqa: E402
from fastface.testing import make_decode_inputs  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def assert_same_step(got, want, what=""):
    """Tokens and mask equal, with a report of the first differing positions."""
    for name, a, b in (("tokens", got[0], want[0]), ("masked", got[1], want[1])):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}"
        bad = (a != b).nonzero()
        assert bad.numel() == 0, (f"{what} {name}: {bad.shape[0]} / {a.numel()} positions differ, first (b, i) "
                                  f"{bad[:5].tolist()}: got {a[tuple(bad[:5].T)].tolist()}, "
                                  f"expected {b[tuple(bad[:5].T)].tolist()}")


def both(logits, tokens, masked, u, **kw):
    return _cpp.masked_decode_step(logits, tokens, masked, u, **kw), \
        masked_decode_step_reference(logits, tokens, masked, u, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance", [0.0, 1.7])
@pytest.mark.parametrize("B,N,V", [(1, 1, 1), (1, 7, 2), (3, 7, 33), (3, 129, 1000), (1, 129, 8192)])
def test_step_equals_reference(B, N, V, guidance, dtype):
    steps = 6
    for step in range(steps):  # every step of the schedule, the last included
        for schedule in ("cosine", "linear"):
            seed = 1000 * step + (schedule == "linear")
            logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, dtype=dtype, seed=seed)
            kw = dict(step=step, steps=steps, guidance=guidance, sample_temperature=0.8 if step % 2 else 1.0,
                      confidence_temperature=4.5, schedule=schedule)
            got, want = both(logits, tokens, masked, u, **kw)
            assert_same_step(got, want, f"step {step} {schedule}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_full_decoding_loop(guidance, dtype):
    """A whole T-step decode from all-masked, fresh logits each step: cpp and reference stay in lockstep."""
    B, N, V, steps = 3, 129, 257, 8
    gen = torch.Generator().manual_seed(7)
    tokens = torch.zeros(B, N, dtype=torch.long)
    masked = torch.ones(B, N, dtype=torch.bool)
    for step in range(steps):
        R = 2 * B if guidance else B
        logits = (torch.randn(R, N, V, generator=gen) * 2).to(dtype)
        u = torch.rand(2, B, N, generator=gen).clamp(1e-7, 1 - 1e-7)
        kw = dict(step=step, steps=steps, guidance=guidance, confidence_temperature=4.5)
        got, want = both(logits, tokens, masked, u, **kw)
        assert_same_step(got, want, f"step {step}")
        # sampler properties: known tokens never change; the scheduled count stays masked
        assert torch.equal(got[0][~masked], tokens[~masked])
        expected_len = scheduled_mask_len(N, masked.sum(-1), step, steps)
        assert torch.equal(got[1].sum(-1), expected_len)
        assert not bool((got[1] & ~masked).any()), "a known position was re-masked"
        tokens, masked = got
    assert not bool(masked.any())
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V


def test_many_rows_exact():
    """Thousands of rows per call over several seeds: boundary disagreements would show up here."""
    for seed in range(6):
        logits, tokens, masked, u = make_decode_inputs(16, 256, 61, guidance=2.0, masked_fraction=0.9, seed=seed)
        got, want = both(logits, tokens, masked, u, step=seed % 4, steps=4, guidance=2.0, confidence_temperature=3.0)
        assert_same_step(got, want, f"seed {seed}")


def test_fully_known_sequences():
    logits, tokens, masked, u = make_decode_inputs(3, 33, 40, guidance=1.0, seed=3)
    masked[1] = False  # sequence 1 fully known
    masked[2] = False
    masked[2, 5] = True  # sequence 2 has a single unknown position: it becomes known
    got, want = both(logits, tokens, masked, u, step=0, steps=4, guidance=1.0)
    assert_same_step(got, want)
    assert torch.equal(got[0][1], tokens[1]) and not bool(got[1][1].any())
    assert not bool(got[1][2].any())
    masked[:] = False
    got, want = both(logits, tokens, masked, u, step=1, steps=4, guidance=1.0)
    assert_same_step(got, want)
    assert torch.equal(got[0], tokens)


def test_sampler_frequencies():
    """Observed sample frequencies match softmax(logits / tau); a -inf logit is never drawn."""
    V, n = 6, 40_000
    row = torch.tensor([0.5, -1.0, 2.0, -math.inf, 0.0, 1.0])
    tau = 1.3
    logits = row.expand(1, n, V).contiguous()
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(2, 1, n, generator=gen).clamp(1e-7, 1 - 1e-7)
    tokens, _ = _cpp.masked_decode_step(logits, torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.bool),
                                        u, step=0, steps=2, sample_temperature=tau)
    freq = torch.bincount(tokens[0], minlength=V).double() / n
    p = torch.softmax(row.double() / tau, -1)
    assert freq[3] == 0
    assert torch.allclose(freq, p, atol=4 * math.sqrt(0.25 / n)), (freq, p)


def test_builtin_math_agrees_almost_always():
    """Without torch's own exp/log the kernel uses double-evaluated ones: same tokens on (nearly) every row."""
    if _C.reference_math() != "vml":
        pytest.skip("already on the built-in exp/log")
    try:
        assert _cpp.set_decode_math("builtin") == "builtin"
        logits, tokens, masked, u = make_decode_inputs(8, 256, 1000, guidance=2.0, masked_fraction=1.0, seed=11)
        got, want = both(logits, tokens, masked, u, step=2, steps=8, guidance=2.0)
        assert (got[0] != want[0]).float().mean() <= 1e-3
        assert (got[1] != want[1]).float().mean() <= 1e-2
    finally:
        _cpp.set_decode_math("auto")


@pytest.fixture
def portable_paths():
    _C.set_simd_kernels(False)
    yield
    _C.set_simd_kernels(True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_path_equals_reference(portable_paths, dtype):
    """The scalar code CPUs without AVX2 run gives the same tokens and mask."""
    for B, N, V, guidance in [(3, 7, 33, 0.0), (2, 129, 1000, 1.7), (1, 5, 1, 2.0)]:
        logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, dtype=dtype, seed=N)
        got, want = both(logits, tokens, masked, u, step=1, steps=4, guidance=guidance, sample_temperature=0.7)
        assert_same_step(got, want, f"B={B} N={N} V={V}")


def test_ops_dispatch():
    logits, tokens, masked, u = make_decode_inputs(2, 17, 50, guidance=2.0, seed=5)
    kw = dict(step=1, steps=4, guidance=2.0)
    assert_same_step(ops.masked_decode_step(logits, tokens, masked, u, backend="cpp", **kw),
                     ops.masked_decode_step(logits, tokens, masked, u, backend="reference", **kw))


# ------------------------------------------------------------------------------------- the raw binding's checks


def raw_args(B=2, N=5, V=7, guidance=0.0):
    logits, tokens, masked, u = make_decode_inputs(B, N, V, guidance=guidance, seed=0)
    return dict(logits=logits.numpy(), tokens=tokens.numpy(), masked=masked.numpy(), u=u.numpy(), step=0, steps=4,
                guidance=guidance, sample_temperature=1.0, confidence_temperature=1.0, schedule="cosine")


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
def test_raw_binding_rejects_bad_arguments(change, error, match):
    args = raw_args()
    change(args)
    with pytest.raises(error, match=match):
        _C.masked_decode_step(**args)


def test_raw_binding_accepts_empty_and_masked_garbage():
    args = raw_args()
    args["tokens"][args["masked"]] = 10**12  # values at masked positions are ignored
    _C.masked_decode_step(**args)
    empty = raw_args(B=0, N=0)
    tokens, masked = _C.masked_decode_step(**empty)
    assert tokens.shape == (0, 0) and masked.shape == (0, 0)
