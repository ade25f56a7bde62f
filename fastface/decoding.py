"""Which loop decodes: the reference loops or the engine, decided here and nowhere else.

``backend="reference"`` runs the reference loops of ``fastface.sampling`` (a full forward of the model every
step, the oracle); every other backend runs ``fastface.engine.Engine``, which returns the same tokens faster.
The pipeline and the benchmark both decode through a ``Decoder``.

Threads: a ``Decoder`` (and so a ``Pipeline``) may be called from several threads at once. The reference loops keep
no state between calls; the engine serialises its calls on its own lock (``fastface.engine``). Either way each call
returns exactly what it returns alone.
"""

from __future__ import annotations

import threading

from fastface import backends
from fastface.sampling import describe_ids, generate_answer_ids, generate_image_tokens, generate_pair_ids


class Decoder:
    """The decoding loops of one model under one backend.

    Parameters
    ----------
    model : FaceTransformer in eval mode
    backend : "auto" | "reference" | "torch" | "cpp" | "triton"
    """

    def __init__(self, model, backend: str = "auto"):
        self.model = model
        self.backend = backends.validate_choice(backend)
        self._engine = None
        self._engine_lock = threading.Lock()

    @property
    def uses_engine(self) -> bool:
        return self.backend != "reference"

    @property
    def engine(self):
        """The engine (created on first use); None when this decoder runs the reference loops."""
        if self._engine is None and self.uses_engine:
            from fastface.engine import Engine

            with self._engine_lock:  # two threads asking at once get one engine
                if self._engine is None:
                    self._engine = Engine(self.model, backend=self.backend)
        return self._engine

    @property
    def last_stats(self):
        """``GenerationStats`` of the engine's last image run (None for the reference loops)."""
        return self._engine.last_stats if self._engine is not None else None

    def image_tokens(self, prompt_ids, *, timers=None, kv_refresh=None, **kwargs):
        """Codebook ids [B, N]; keyword arguments as ``fastface.sampling.generate_image_tokens``, and the engine's
        ``kv_refresh``."""
        if self.uses_engine:
            return self.engine.generate_image_tokens(prompt_ids, timers=timers, kv_refresh=kv_refresh, **kwargs)
        if kv_refresh is not None:
            raise ValueError(f"kv_refresh={kv_refresh!r} reuses the engine's cached keys/values; the reference loop "
                             "recomputes every position every step: use a backend other than 'reference'")
        self.model.set_backend("reference")
        return generate_image_tokens(self.model, prompt_ids, backend="reference", **kwargs)

    def answer_ids(self, prompt_ids, *, timers=None, **kwargs):
        """New ids per row; keyword arguments as ``fastface.sampling.generate_answer_ids``."""
        if self.uses_engine:
            return self.engine.generate_answer_ids(prompt_ids, timers=timers, **kwargs)
        self.model.set_backend("reference")
        return generate_answer_ids(self.model, prompt_ids, **kwargs)

    def describe_ids(self, image_tokens, *, timers=None, **kwargs):
        """Caption blocks [B, T]; keyword arguments as ``fastface.sampling.describe_ids``."""
        if self.uses_engine:
            return self.engine.describe_ids(image_tokens, timers=timers, **kwargs)
        self.model.set_backend("reference")
        return describe_ids(self.model, image_tokens, backend="reference", **kwargs)

    def pair_ids(self, *, timers=None, **kwargs):
        """(caption blocks [B, T], image ids [B, N]); keyword arguments as ``fastface.sampling.generate_pair_ids``."""
        if self.uses_engine:
            return self.engine.generate_pair_ids(timers=timers, **kwargs)
        self.model.set_backend("reference")
        return generate_pair_ids(self.model, backend="reference", **kwargs)
