"""Backend choice, in one place.

Backends: ``reference`` (plain PyTorch, the oracle), ``cpp`` (fastface._C, CPU), ``triton``
(fastface.kernels; on a CPU it needs ``TRITON_INTERPRET=1``). ``auto`` picks the fastest available for
the op and the device: triton on CUDA, cpp on CPU, else the reference. ``FASTFACE_BACKEND`` overrides
``auto``. A backend that is asked for but missing falls back to one that computes the same result, with a
warning once per (op, backend) -- never a skipped step.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

BACKENDS = ("reference", "cpp", "triton")
CHOICES = ("auto", *BACKENDS)

# op name -> backend -> "module:function"; every function takes the op's arguments (see fastface.ops)
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "grouped_moe": {
        "reference": "fastface.moe:grouped_moe_reference",
        "cpp": "fastface._cpp:grouped_moe",
        "triton": "fastface.kernels.grouped_moe:grouped_moe",
    },
    "masked_decode_step": {
        "reference": "fastface.sampling:masked_decode_step_reference",
        "cpp": "fastface._cpp:masked_decode_step",
        "triton": "fastface.kernels.masked_decode:masked_decode_step",
    },
    "d3diff_loss": {
        "reference": "fastface.loss:d3diff_loss_reference",
        "cpp": "fastface._cpp:d3diff_loss",
        "triton": "fastface.kernels.d3diff:d3diff_loss",
    },
}


@functools.cache
def _load(spec: str):
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@functools.cache
def triton_usable(device_type: str) -> bool:
    """Triton kernels run on CUDA devices, or anywhere under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device_type == "cuda"


def available(op: str, backend: str, device_type: str = "cpu") -> bool:
    """Whether ``backend`` can run ``op`` for tensors on ``device_type``."""
    if backend == "reference":
        return True
    if backend == "cpp" and device_type != "cpu":
        return False
    if backend == "triton" and not triton_usable(device_type):
        return False
    return _load(IMPLEMENTATIONS[op][backend]) is not None


def validate_choice(backend: str) -> str:
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


def default_backend() -> str:
    """The override from FASTFACE_BACKEND, or 'auto'."""
    env = os.environ.get("FASTFACE_BACKEND", "auto")
    if env not in CHOICES:
        raise ValueError(f"FASTFACE_BACKEND must be one of {CHOICES}, got {env!r}")
    return env


_warned: set[tuple[str, str]] = set()


def resolve(op: str, backend: str, device_type: str = "cpu") -> str:
    """The backend that will run ``op``: the one asked for, or the best available fallback."""
    validate_choice(backend)
    if backend == "auto":
        backend = default_backend()
    if backend == "auto":
        order = ("triton", "reference") if device_type == "cuda" else ("cpp", "reference")
        return next(b for b in order if available(op, b, device_type))
    if available(op, backend, device_type):
        return backend
    fallback = "cpp" if device_type == "cpu" and available(op, "cpp", device_type) else "reference"
    if (op, backend) not in _warned:
        _warned.add((op, backend))
        warnings.warn(f"fastface: backend {backend!r} is not available for {op} on {device_type}; "
                      f"using {fallback!r}, which computes the same result", RuntimeWarning, stacklevel=3)
    return fallback


def implementation(op: str, backend: str, device_type: str = "cpu"):
    """(resolved backend name, callable) for ``op``."""
    name = resolve(op, backend, device_type)
    return name, _load(IMPLEMENTATIONS[op][name])


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16).

    Without them, bfloat16 matmuls (torch's and the C++ kernels') widen to float32 in software and run
    several times slower than float32 itself.
    """
    try:
        from fastface import _C

        f = _C.cpu_features()
        return bool(f.get("avx512_bf16") or f.get("amx_bf16"))
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return True  # unknown: do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


def warn_if_slow_bf16(dtype: str) -> None:
    """Warn once when bfloat16 is asked for on a CPU that would run it slower than float32."""
    if dtype == "bfloat16" and not cpu_has_bf16_matmul() and ("bf16", "cpu") not in _warned:
        _warned.add(("bf16", "cpu"))
        warnings.warn("fastface: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX); bfloat16 runs "
                      "several times slower than float32 here -- use dtype='float32' (--dtype float32) for speed",
                      RuntimeWarning, stacklevel=3)
