"""Faster-than-exact image decoding (opt-in): guidance on the first steps only, and key/value reuse between refreshes.

Each option is checked against an independent construction on the reference loop (a full forward every step):
``guidance_steps`` against the reference sampler's own option; ``kv_refresh`` against the reference loop with
every block's inputs at the reused positions frozen to what they were when those positions last ran (forward
pre-hooks), which is what reusing their keys/values means.
"""

import warnings

import pytest
import torch

import fastface
from fastface.config import FaceConfig
from fastface.engine import Engine
from fastface.model import FaceTransformer
from fastface.prompts import t2i_prompt_ids
from fastface.sampling import generate_image_tokens

CFG = FaceConfig.from_name("tiny")
PROMPTS = [[9, 10, 11], [12], [], [13, 14, 15, 16, 17, 18, 19], [20, 21]]


@pytest.fixture(scope="module")
def model():
    m = FaceTransformer(CFG).eval()
    m.reset_parameters(5)
    with torch.no_grad():  # attention strong enough that a position's logits follow its context (at the default
        for layer in m.layers:  # init they barely do, and reused keys/values would change nothing)
            layer.attn.qkv.weight.mul_(8)
            layer.attn.out.weight.mul_(8)
        m.lm_head.weight.mul_(8)  # logits sharp enough that tokens are not uniform noise
    m.set_backend("reference")
    return m


def prompts(n):
    return t2i_prompt_ids(PROMPTS[:n], CFG)


class FrozenPositions:
    """Forward pre-hooks on every block: positions in ``frozen`` [2B, L] get the block input they had when their row
    last ran them (stored per layer), so their keys/values are the ones computed then. A forward of the cond rows
    alone (B rows) reads and writes the first B rows."""

    def __init__(self, model):
        self.frozen, self.stored = None, {}
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(model.layers)]

    def _hook(self, i):
        def hook(module, args):
            x = args[0]
            R = x.shape[0]
            if self.frozen is not None:
                x = torch.where(self.frozen[:R, :, None], self.stored[i][:R], x)
            if i not in self.stored:
                self.stored[i] = x.new_zeros(self.rows, *x.shape[1:])
            self.stored[i][:R] = x
            return (x, *args[1:])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_with_reuse(model, ids, *, steps, guidance, seeds, kv_refresh, guidance_steps=None, uncond_refresh=None,
                         **kw):
    """The reference loop, with the positions that a ``kv_refresh`` step does not run frozen at every block."""
    B, P, N = ids.shape[0], ids.shape[1], CFG.image_tokens
    hooks = FrozenPositions(model)
    hooks.rows = 2 * B

    def uncond_runs(step):
        return guidance != 0 and (guidance_steps is None or step < guidance_steps) and (
            uncond_refresh is None or step % uncond_refresh == 0)

    start = torch.ones(B, N, dtype=torch.bool)  # masked at the start of the step just run
    start_uncond = start  # masked at the start of the last step that ran the uncond rows

    def callback(step, tokens, masked):
        nonlocal start, start_uncond
        if uncond_runs(step):
            start_uncond = start
        nxt = step + 1
        if nxt % kv_refresh == 0:
            hooks.frozen = None
        else:
            frozen = torch.zeros(2 * B, P + N + 2, dtype=torch.bool)
            frozen[:, P] = frozen[:, P + N + 1] = True  # <soi>, <eoi>: run at refreshes only
            frozen[:B, P + 1 : P + 1 + N] = ~start  # decoded before the last step that ran the row began
            frozen[B:, P + 1 : P + 1 + N] = ~start_uncond
            hooks.frozen = frozen
        start = masked.clone()

    try:
        return generate_image_tokens(model, ids, steps=steps, guidance=guidance, seeds=seeds, callback=callback,
                                     guidance_steps=guidance_steps, uncond_refresh=uncond_refresh,
                                     backend="reference", **kw)
    finally:
        hooks.remove()


@pytest.mark.parametrize("guidance", [0.0, 2.5])
@pytest.mark.parametrize("B,steps", [(1, 3), (4, 6)])
def test_exact_settings_give_exact_tokens(model, guidance, B, steps):
    ids, seeds = prompts(B), list(range(3, 3 + B))
    kw = dict(steps=steps, guidance=guidance, seeds=seeds)
    want = generate_image_tokens(model, ids, backend="reference", **kw)
    engine = Engine(model)
    for fast in (dict(kv_refresh=1), dict(guidance_steps=steps), dict(kv_refresh=1, guidance_steps=steps + 4)):
        assert torch.equal(engine.generate_image_tokens(ids, **kw, **fast), want), fast


@pytest.mark.parametrize("guidance_steps,uncond_refresh", [(0, None), (1, None), (3, None), (None, 2), (None, 3),
                                                           (4, 3)])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_guidance_options_equal_reference_loop(model, guidance_steps, uncond_refresh, backend):
    ids, seeds = prompts(4), [11, 12, 13, 14]
    kw = dict(steps=6, guidance=3.0, seeds=seeds, guidance_steps=guidance_steps, uncond_refresh=uncond_refresh)
    want = generate_image_tokens(model, ids, backend="reference", **kw)
    got = Engine(model, backend=backend).generate_image_tokens(ids, **kw)
    assert torch.equal(got, want)
    if guidance_steps == 0:  # no guided step at all: plain unguided decoding
        unguided = generate_image_tokens(model, ids, backend="reference", steps=6, guidance=0.0, seeds=seeds)
        assert torch.equal(got, unguided)
    exact = generate_image_tokens(model, ids, backend="reference", steps=6, guidance=3.0, seeds=seeds)
    assert not torch.equal(got, exact)  # the option changes what is drawn: the check above can fail


@pytest.mark.parametrize("guidance,guidance_steps,uncond_refresh", [(0.0, None, None), (2.0, None, None),
                                                                    (2.0, 2, None), (2.0, None, 2), (2.0, 5, 3)])
@pytest.mark.parametrize("kv_refresh", [2, 3, 100])
def test_kv_refresh_equals_reference_with_frozen_positions(model, guidance, guidance_steps, uncond_refresh,
                                                           kv_refresh):
    ids, seeds = prompts(5), [21, 22, 23, 24, 25]
    kw = dict(steps=7, guidance=guidance, seeds=seeds, guidance_steps=guidance_steps, uncond_refresh=uncond_refresh)
    want = reference_with_reuse(model, ids, kv_refresh=kv_refresh, **kw)
    engine = Engine(model)
    got = engine.generate_image_tokens(ids, kv_refresh=kv_refresh, **kw)
    assert torch.equal(got, want)
    exact = engine.generate_image_tokens(ids, **kw)
    if kv_refresh == 100:  # reuse is an approximation: the oracle is not the exact loop
        assert not torch.equal(got, exact)


def test_kv_refresh_runs_only_the_changing_positions(model):
    B, steps, N, S = 3, 7, CFG.image_tokens, CFG.image_tokens + 2
    engine = Engine(model)
    masked_at_start = [torch.ones(B, N, dtype=torch.bool)]
    engine.generate_image_tokens(prompts(B), steps=steps, guidance=2.0, seeds=[1, 2, 3], kv_refresh=3,
                                 guidance_steps=5, uncond_refresh=2,
                                 callback=lambda s, t, m: masked_at_start.append(m.clone()))
    want, last_uncond = 0, None
    for step in range(steps):
        uncond = step < 5 and step % 2 == 0
        if step % 3 == 0:
            want += (2 * B if uncond else B) * S
        else:
            counts = [int(masked_at_start[step - 1].sum(1).max())]
            if uncond:
                counts.append(int(masked_at_start[last_uncond].sum(1).max()))
            want += (2 * B if uncond else B) * max(counts)
        if uncond:
            last_uncond = step
    assert engine.last_stats.positions_run == want
    assert want < steps * 2 * B * S


@pytest.mark.parametrize("fast", [dict(kv_refresh=3), dict(kv_refresh=2, threshold=0.4), dict(guidance_steps=2)])
def test_fast_options_keep_a_prompt_independent_of_its_batch(model, fast):
    """Threshold decoding leaves rows with different numbers of masked positions; padding rows by repeating one of
    their own positions keeps every row's tokens what they are alone."""
    ids, seeds = prompts(5), [31, 32, 33, 34, 35]
    engine = Engine(model)
    batched = engine.generate_image_tokens(ids, steps=6, guidance=2.0, seeds=seeds, **fast)
    for b in range(5):
        alone = engine.generate_image_tokens(ids[b : b + 1], steps=6, guidance=2.0, seeds=seeds[b : b + 1], **fast)
        assert torch.equal(alone[0], batched[b]), b


def test_kv_refresh_in_an_edit_keeps_outside_tokens(model):
    ids, seeds = prompts(2), [5, 6]
    engine = Engine(model)
    original = engine.generate_image_tokens(ids, steps=4, guidance=2.0, seeds=seeds)
    region = torch.zeros(2, CFG.image_tokens, dtype=torch.bool)
    region[0, :5] = True
    region[1, 3:12] = True
    edited = engine.generate_image_tokens(ids, steps=4, guidance=2.0, seeds=seeds, tokens=original, region=region,
                                          kv_refresh=4)
    assert torch.equal(edited[~region], original[~region])
    assert ((edited >= 0) & (edited < CFG.codebook_size)).all()


def test_bad_fast_options(model):
    engine, ids = Engine(model), prompts(1)
    for bad in (dict(kv_refresh=0), dict(kv_refresh=2.5), dict(guidance_steps=-1), dict(guidance_steps=True),
                dict(uncond_refresh=0)):
        name = next(iter(bad))
        with pytest.raises((ValueError, TypeError), match=name):
            engine.generate_image_tokens(ids, steps=2, seeds=[0], **bad)
        if name != "kv_refresh":
            with pytest.raises((ValueError, TypeError), match=name):
                generate_image_tokens(model, ids, steps=2, seeds=[0], **bad)


def test_pipeline_fast_options(tiny_checkpoint):
    pipe = fastface.load(tiny_checkpoint)
    exact = pipe.generate_tokens(["a face"], steps=3)
    assert torch.equal(pipe.generate_tokens(["a face"], steps=3, kv_refresh=1, guidance_steps=3), exact)
    fast = pipe.generate_tokens(["a face"], steps=3, kv_refresh=2, guidance_steps=1)
    assert fast.shape == exact.shape
    ref = fastface.load(tiny_checkpoint, backend="reference")
    with pytest.raises(ValueError, match="kv_refresh=2 reuses the engine's cached keys/values"):
        ref.generate_tokens(["a face"], steps=3, kv_refresh=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ref.generate_tokens(["a face"], steps=3, guidance_steps=1),
                           pipe.generate_tokens(["a face"], steps=3, guidance_steps=1))


def test_cli_fast_options(tiny_checkpoint, tmp_path, capsys):
    from fastface import cli

    out = tmp_path / "t.npy"
    argv = ["generate", "w1", "--steps", "4", "--model", str(tiny_checkpoint), "--tokens", str(out), "--quiet"]
    assert cli.main([*argv, "--guidance-steps", "2", "--kv-refresh", "2"]) == 0, capsys.readouterr().err
    assert cli.main([*argv, "--kv-refresh", "2", "--backend", "reference"]) == 2
    err = capsys.readouterr().err
    assert "kv_refresh=2 reuses the engine's cached keys/values" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--kv-refresh", "0"])
    assert exc.value.code == 2 and "must be > 0" in capsys.readouterr().err
