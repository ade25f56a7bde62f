"""What a ``fastface serve`` process accepts: batching, queue and request bounds (no web framework imported)."""

from __future__ import annotations

from dataclasses import dataclass

from fastface.checks import MAX_STEPS, check_float, check_int


@dataclass(frozen=True)
class ServerSettings:
    """Bounds of one server. Every request field has a bound; a request past one gets 413 or 422 naming it."""

    model_name: str = "face-s"  # what /v1/models lists and requests may name
    max_batch: int = 16  # rows (images or answers) per engine call
    max_wait_ms: float = 10.0  # how long the oldest queued request waits for others to join its batch
    max_queue: int = 256  # rows waiting at most; beyond that, 429
    max_n: int = 16  # images per request
    max_steps: int = 64  # decoding steps per request (the library's own bound is MAX_STEPS)
    max_prompt_chars: int = 2000  # characters of a prompt or question (tokens are bounded by the model)
    max_body_bytes: int = 8 * 2**20  # request body
    api_key: str | None = None  # when set, /v1/ routes need "Authorization: Bearer <key>"

    def __post_init__(self):
        for name, hi in (("max_batch", 4096), ("max_queue", 1 << 20), ("max_n", 4096), ("max_steps", MAX_STEPS),
                         ("max_prompt_chars", 1 << 20), ("max_body_bytes", 1 << 30)):
            check_int(name, getattr(self, name), 1, hi)
        check_float("max_wait_ms", self.max_wait_ms, lo=0)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string")
