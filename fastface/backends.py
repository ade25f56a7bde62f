"""Backend choice, in one place.

Backends: ``reference`` (plain PyTorch, the oracle), ``torch`` (fast PyTorch paths, ``fastface.torch_backend``),
``cpp`` (fastface._C, CPU), ``triton`` (fastface.kernels; on a CPU it needs ``TRITON_INTERPRET=1``). ``auto``
picks the fastest available for the op, the device and the dtype (``_auto_order``, with the measured reason beside
each rule). ``FASTFACE_BACKEND`` overrides ``auto``. A backend that is asked for but missing falls back to one that
computes the same result, with a warning once per (op, backend) -- never a skipped step. Every other module asks
here; nothing else decides which implementation runs.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "torch", "cpp", "triton")
CHOICES = ("auto", *BACKENDS)

# op name -> backend -> "module:function"; every function takes the op's arguments (see fastface.ops)
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "grouped_moe": {
        "reference": "fastface.ops.moe:grouped_moe_reference",
        "torch": "fastface.torch_backend:grouped_moe_sorted",
        "cpp": "fastface._cpp:grouped_moe",
        "triton": "fastface.kernels.grouped_moe:grouped_moe",
    },
    "masked_decode_step": {
        "reference": "fastface.ops.masked_decode:masked_decode_step_reference",
        "torch": "fastface.torch_backend:masked_decode_step_compact",
        "cpp": "fastface._cpp:masked_decode_step",
        "triton": "fastface.kernels.masked_decode:masked_decode_step",
    },
    "attention": {
        "reference": "fastface.ops.attention:attention_reference",
        "cpp": "fastface._cpp:attention",
    },
    "rotary": {
        "reference": "fastface.ops.attention:rotary_reference",
        "cpp": "fastface._cpp:rotary",
    },
    "int8_linear": {
        "reference": "fastface.ops.int8:int8_linear_reference",
        "cpp": "fastface._cpp:int8_linear",
    },
    "d3diff_loss": {
        "reference": "fastface.ops.d3diff:d3diff_loss_reference",
        "cpp": "fastface._cpp:d3diff_loss",
        "triton": "fastface.kernels.d3diff:d3diff_loss",
    },
}

# opt-in options of an op that only some backends implement: (op, option) -> backends that have it
OPTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("masked_decode_step", "threshold"): ("reference", "torch"),
}

# backends that compute no gradient (forward-only kernels): training takes another path
FORWARD_ONLY: dict[str, tuple[str, ...]] = {
    "grouped_moe": ("cpp", "torch"),
    "attention": ("cpp",),
    "rotary": ("cpp",),
    "int8_linear": ("cpp",),  # ops.int8_linear refuses gradients itself: quantised weights are not trained
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
    spec = IMPLEMENTATIONS[op].get(backend)
    return spec is not None and _load(spec) is not None


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


def _auto_order(op: str, device_type: str, dtype) -> tuple[str, ...]:
    """Backends ``auto`` tries for ``op``, best first."""
    cuda = device_type == "cuda"
    if op == "grouped_moe":
        if cuda:
            return ("triton", "reference")
        if dtype == torch.bfloat16:
            # bf16 on the CPU: each routed expert on its own tokens through torch's matmul (the CPU's bf16 matrix
            # units), the routed FLOPs only. One layer over 2064 tokens (batch 4 with guidance), 2 threads, a 2-core
            # EPYC with AVX512-BF16: face-s 8.2 ms against 8.6 ms for the cpp kernel; the moe-507m shape 115 vs
            # 119 ms (both near the bf16 GEMM peak; before the cpp kernel's accumulators stayed in registers: 7.3 vs
            # 10.4 and 108 vs 117 ms); every expert densely (the earlier rule) took 1.4x and 2.0x the
            # sorted dispatch's time at the two shapes (side by side, cores shared with another job). Not token-exact
            # with the reference (another arithmetic order): bf16 only.
            return ("torch", "cpp", "reference")
        return ("cpp", "reference")  # float32: the C++ kernel, token-exact with the reference
    if op == "attention":
        # the C++ kernel where the CPU has AVX-512 (elsewhere its portable loop is slower than torch's SDPA)
        return ("cpp", "reference") if not cuda and cpu_has_avx512() else ("reference",)
    if op == "int8_linear":
        return ("cpp", "reference") if not cuda else ("reference",)  # bitwise the reference's on every CPU path
    if op == "rotary":
        return ("cpp", "reference") if not cuda else ("reference",)  # bitwise the reference's, one pass
    if op == "masked_decode_step":
        # the fused kernel; without one, the compact PyTorch step (sampler work only at still-masked positions)
        return ("triton", "torch", "reference") if cuda else ("cpp", "torch", "reference")
    return ("triton", "reference") if cuda else ("cpp", "reference")


def resolve(op: str, backend: str, device_type: str = "cpu", *, dtype=None, grad: bool = False,
            options: tuple[str, ...] = ()) -> str:
    """The backend that will run ``op``: the one asked for, or the best available one that computes the same.

    ``dtype``: the op's input dtype (``auto`` depends on it); ``grad``: gradients are needed (forward-only
    kernels are skipped); ``options``: opt-in options in use that only some backends implement.
    """
    validate_choice(backend)
    if backend == "auto":
        backend = default_backend()

    def usable(b):
        if grad and b in FORWARD_ONLY.get(op, ()):
            return False
        if any(b not in OPTIONS.get((op, o), BACKENDS) for o in options):
            return False
        return available(op, b, device_type)

    if backend == "auto":
        return next(b for b in _auto_order(op, device_type, dtype) if usable(b))
    if usable(backend):
        return backend
    if grad and backend in FORWARD_ONLY.get(op, ()) or options:
        # a documented detour, not a missing install: training needs gradients, an option lives elsewhere
        return next(b for b in ("torch", "reference") if usable(b))
    fallback = "cpp" if device_type == "cpu" and usable("cpp") else "reference"
    if (op, backend) not in _warned:
        _warned.add((op, backend))
        warnings.warn(f"fastface: backend {backend!r} is not available for {op} on {device_type}; "
                      f"using {fallback!r}, which computes the same result", RuntimeWarning, stacklevel=3)
    return fallback


def implementation(op: str, backend: str, device_type: str = "cpu", **kwargs):
    """(resolved backend name, callable) for ``op``; keyword arguments as ``resolve``."""
    name = resolve(op, backend, device_type, **kwargs)
    return name, _load(IMPLEMENTATIONS[op][name])


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (F, BW, VL, DQ), as the C++ kernels see it (False without them built)."""
    try:
        from fastface import _C

        return bool(_C.cpu_features().get("avx512"))
    except ImportError:
        return False


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


def math_dtype(dtype: str, backend: str, device: str = "cpu") -> str:
    """The dtype a transformer asked to run in ``dtype`` with ``backend`` computes in.

    ``auto`` on a CPU without bf16 matrix instructions runs float32 math on bfloat16 weights: the upcast is exact
    (bf16 -> fp32 loses nothing) and bf16 matmuls would widen in software, several times slower. It says so once.
    Every other case computes as asked (an explicit backend runs bf16 even where it is slow: ``warn_if_slow_bf16``).
    """
    if dtype == "bfloat16" and backend == "auto" and device == "cpu" and not cpu_has_bf16_matmul():
        if ("bf16-auto", "cpu") not in _warned:
            _warned.add(("bf16-auto", "cpu"))
            warnings.warn("fastface: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX): backend 'auto' "
                          "runs float32 math on the bfloat16 weights (an exact upcast; bf16 math would be several "
                          "times slower here); name a backend (e.g. backend='torch') to run bf16 anyway",
                          RuntimeWarning, stacklevel=3)
        return "float32"
    return dtype


def warn_if_slow_bf16(dtype: str) -> None:
    """Warn once when bfloat16 is asked for on a CPU that would run it slower than float32."""
    if dtype == "bfloat16" and not cpu_has_bf16_matmul() and ("bf16", "cpu") not in _warned:
        _warned.add(("bf16", "cpu"))
        warnings.warn("fastface: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX); bfloat16 runs "
                      "several times slower than float32 here -- use dtype='float32' (--dtype float32) for speed",
                      RuntimeWarning, stacklevel=3)
