"""The one learning-rate schedule: linear warm-up, peak, cosine decay to the floor, and the clock override."""

import math

import pytest

from fastface.lr_schedule import lr_at


@pytest.mark.parametrize("warmup, total, min_ratio", [(1, 1, 0.1), (3, 10, 0.1), (50, 100, 0.1), (200, 6000, 0.02),
                                                      (7, 13, 0.01), (0, 9, 0.0)])
def test_warmup_peak_end_and_monotone_decay(warmup, total, min_ratio):
    lr = 3e-3
    values = [lr_at(s, lr=lr, warmup=warmup, total=total, min_ratio=min_ratio) for s in range(total + 5)]
    for s in range(warmup):  # linear warm-up: lr / warmup, 2 lr / warmup, ..., lr
        assert values[s] == pytest.approx(lr * (s + 1) / warmup, rel=1e-12)
    if warmup:
        assert values[warmup - 1] == pytest.approx(lr, rel=1e-12)
    assert values[warmup] == pytest.approx(lr, rel=1e-12), "the decay starts at the peak"
    assert max(values) == pytest.approx(lr, rel=1e-12)
    decay = values[warmup:]
    assert all(b <= a for a, b in zip(decay, decay[1:])), "never rises after the warm-up"
    for s in range(max(total, warmup + 1), total + 5):  # the floor, held after the last step
        assert values[s] == pytest.approx(lr * min_ratio, rel=1e-12, abs=1e-18)


def test_midpoint_is_half_way_between_peak_and_floor():
    # warmup 10, total 110: step 60 is half-way through the cosine
    assert lr_at(60, lr=1.0, warmup=10, total=110, min_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5, rel=1e-12)
    assert lr_at(35, lr=1.0, warmup=10, total=110, min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)


def test_transformer_trainer_values_unchanged():
    """The formula fastface.train used before the schedule moved here, evaluated the same way."""
    def before(step, lr, warmup, total, min_ratio=0.1):
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    for warmup, total in [(50, 100), (3, 30), (2, 6), (1, 4), (100, 3450)]:
        for step in range(total + 2):
            assert lr_at(step, lr=1e-3, warmup=warmup, total=total) == before(step, 1e-3, warmup, total)


def test_time_fraction_moves_the_decay_on_never_back():
    kw = dict(lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(20, **kw, time_fraction=0.0) == lr_at(20, **kw), "a clock behind the steps changes nothing"
    assert lr_at(20, **kw, time_fraction=60 / 110) == pytest.approx(lr_at(60, **kw), rel=1e-12)
    assert lr_at(20, **kw, time_fraction=1.5) == pytest.approx(0.1, rel=1e-12), "budget spent: the floor"
    assert lr_at(4, **kw, time_fraction=0.9) == lr_at(4, **kw), "the warm-up follows the steps"
