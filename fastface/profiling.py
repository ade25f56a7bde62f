"""Wall-clock time per section of a decoding run (prefill, attention, moe, seq_moe, lm_head, sampler, noise).

The engine brackets its own phases with ``Timers.section``; the model's sublayers are timed by forward hooks on
the model's modules (``Timers.hooks``), so the model carries no timing code. Disabled timers cost one attribute
check per section. CPU ops are synchronous, so ``perf_counter`` brackets are exact there; on CUDA each section
synchronises first (timing changes the run; use it to profile only).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

SECTIONS = ("prefill", "attention", "moe", "seq_moe", "lm_head", "sampler", "noise")
# sublayer name in each block -> section (a dense block's MLP counts as "moe"; absent sublayers are skipped)
_HOOKED = {"attn": "attention", "moe": "moe", "mlp": "moe", "seq_moe": "seq_moe"}


class Timers:
    """Seconds per section, accumulated over every run they are passed to."""

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
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float):
        if self.enabled:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def hooks(self, model):
        """Time the attention, token-MoE and sequence-MoE sublayers of every block of ``model`` while inside."""
        if not self.enabled:
            yield
            return
        handles, started = [], {}
        device = next(model.parameters()).device
        sync = device.type == "cuda"

        def before(name):
            def hook(module, args):
                if sync:
                    torch.cuda.synchronize(device)
                started[id(module)] = time.perf_counter()
            return hook

        def after(name):
            def hook(module, args, output):
                if sync:
                    torch.cuda.synchronize(device)
                self.add(name, time.perf_counter() - started.pop(id(module)))
            return hook

        for layer in model.layers:
            for attr, name in _HOOKED.items():
                module = getattr(layer, attr, None)
                if module is None:
                    continue
                handles.append(module.register_forward_pre_hook(before(name)))
                handles.append(module.register_forward_hook(after(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


OFF = Timers(enabled=False)
